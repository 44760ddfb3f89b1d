"""CPU implementations written in PyTorch (not C++), one module per op, named after it.

Used where PyTorch already is the right CPU implementation (attention: SDPA's
fused, vectorised CPU kernel; MoE: oneDNN GEMMs per touched expert), so a
hand-written C++ loop would only be slower. An op's ``OpSpec.cpu`` names its
module here; the registry runs it under the CPU key of ``torch.ops.dspark.<op>``.
"""
