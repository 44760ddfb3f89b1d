"""CPU implementations written in PyTorch (not C++), one module per op, named after it.

Used where PyTorch already is the right CPU implementation (attention: SDPA's
fused, vectorised CPU kernel), so a hand-written C++ loop would only be slower.
They are registered under the CPU key of ``torch.ops.dspark.<op>`` by
``_registration.py``; ``_backend.PYTORCH_CPU_OPS`` lists the ops whose cpu backend
is PyTorch code.
"""
