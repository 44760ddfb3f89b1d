"""grouped_gemm on the CPU: one oneDNN GEMM per non-empty expert segment (bf16 as it is
with fp32 accumulation, fp16 / fp32 in fp32)."""

from __future__ import annotations

import torch

from ._gemm import compute_dtype, mm_into


def grouped_gemm(a, w, expert_offsets):
    out = torch.empty((a.shape[0], w.shape[1]), dtype=a.dtype, device=a.device)
    grouped_gemm_out(a, w, expert_offsets, out)
    return out


def grouped_gemm_out(a, w, expert_offsets, out):
    offs = expert_offsets.tolist()
    cdt = compute_dtype(a.dtype)
    for e in range(w.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            res = torch.empty((hi - lo, w.shape[1]), dtype=cdt, device=a.device)
            mm_into(res, a[lo:hi].to(cdt), w[e])
            out[lo:hi] = res
    out[offs[-1]:] = 0
