"""The CPU GEMM helpers the PyTorch MoE implementations share."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The CPU GEMMs' operand dtype: bf16 as it is (oneDNN accumulates in fp32, AMX /
    AVX512-BF16 where present; no copy of the weights), fp16 and fp32 in fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def mm_into(out, a, w):
    """``out = a @ w^T`` with ``w`` converted to ``out``'s dtype only where it must be."""
    torch.mm(a, w.t() if w.dtype == out.dtype else w.t().to(out.dtype), out=out)


