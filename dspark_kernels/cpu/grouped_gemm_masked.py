"""grouped_gemm_masked on the CPU: one GEMM per expert over its first masked_m rows."""

from __future__ import annotations

import torch

from ._gemm import compute_dtype, mm_into


def grouped_gemm_masked(a, w, masked_m):
    """One GEMM per expert with tokens over its first ``masked_m[e]`` rows (the padding rows
    of ``a`` are never read); the output's padding rows are zeroed, nothing else twice."""
    num_experts, max_m, _ = a.shape
    out = torch.empty((num_experts, max_m, w.shape[1]), dtype=a.dtype, device=a.device)
    cdt = compute_dtype(a.dtype)
    for e, m in enumerate(masked_m.tolist()):
        m = min(max(m, 0), max_m)
        if m:
            if cdt == a.dtype:
                mm_into(out[e, :m], a[e, :m], w[e])
            else:
                res = torch.empty((m, w.shape[1]), dtype=cdt, device=a.device)
                mm_into(res, a[e, :m].to(cdt), w[e])
                out[e, :m] = res
        out[e, m:] = 0
    return out
