"""token_logprobs in Triton: one program per output entry; a non-padding entry makes
verify_tree's row-statistics pass over its row (``_row_stats``: min-p, top-k, top-p
thresholds, the log-sum-exp from the int64 fixed-point row mass of
docs/verification.md#order-independent-sums) and reads one logit."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._filters import _filter_active, _min_p_log_at, min_p_log_tensor, scale_logit
from .verify_block import _log_prob
from .verify_tree import _row_stats

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _token_logprobs_kernel(
    t_ptr, t_stride_row, t_stride_col, num_rows, tok_ptr, row_ptr, out_ptr, W,
    temp_ptr, topk_ptr, topp_ptr, lmp_ptr, V,
    HAS_TEMP: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, HAS_MINP: tl.constexpr,
    BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)
    b = e // W
    r = tl.load(row_ptr + e).to(tl.int64)
    x = tl.load(tok_ptr + e).to(tl.int64)
    lp = tl.full([], _NEG_INF, tl.float32)
    if (r >= 0) & (r < num_rows) & (x >= 0) & (x < V):
        if HAS_TEMP:
            t = tl.load(temp_ptr + b).to(tl.float32)
        else:
            t = tl.zeros([], tl.float32)
        t = tl.where(t > 0.0, t, 1.0)  # greedy requests: the raw logits' distribution
        k, k_on, p, p_on = _filter_active(topk_ptr, topp_ptr, b, V, HAS_TOPK, HAS_TOPP)
        lmp = _min_p_log_at(lmp_ptr, b, HAS_MINP)
        t_row = t_ptr + r * t_stride_row
        thr, lse = _row_stats(t_row, t_stride_col, V, t, k, k_on, p, p_on, lmp, HAS_TOPK, HAS_TOPP, BLOCK, RADIX_BITS)
        lx = tl.load(t_row + x * t_stride_col).to(tl.float32)
        lp = _log_prob(scale_logit(lx, t), thr, lse)
    tl.store(out_ptr + e, lp)


def token_logprobs(
    target_logits: torch.Tensor,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    temperature: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton backend of ``dspark_kernels.token_logprobs`` (arguments already validated).
    No host synchronisation; rows outside ``[0, T)`` read nothing (``-inf``)."""
    out = torch.empty(tuple(tokens.shape), dtype=torch.float32, device=tokens.device)
    if out.numel() == 0:
        return out
    num_rows, vocab = target_logits.shape
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    dummy = out
    _token_logprobs_kernel[(out.numel(),)](
        target_logits, target_logits.stride(0), target_logits.stride(1), num_rows,
        tokens.contiguous(), rows.contiguous(), out, tokens.shape[1],
        temperature.to(torch.float32) if temperature is not None else dummy,
        top_k if top_k is not None else rows, top_p.to(torch.float32) if top_p is not None else dummy,
        min_p_log_tensor(min_p) if min_p is not None else dummy, vocab,
        HAS_TEMP=temperature is not None, HAS_TOPK=top_k is not None, HAS_TOPP=top_p is not None,
        HAS_MINP=min_p is not None,
        BLOCK=min(256 if not interp else 4096, max(16, triton.next_power_of_2(vocab))),
        RADIX_BITS=4 if not interp else 8, num_warps=8 if not interp else 1,
    )
    return out
