"""Triton kernels of dspark_kernels.

Each module holds the kernels of one op (``verify_block.py``) or shared device
helpers (``philox.py``: the random stream of docs/randomness.md). Importing this
package imports triton; callers check ``dspark_kernels._backend.triton_available()``
first. On machines without a GPU the kernels run under ``TRITON_INTERPRET=1``
(set it before triton is imported); the interpreter computes bf16 wrongly, so
interpreter tests use fp32 / fp16 only.
"""
