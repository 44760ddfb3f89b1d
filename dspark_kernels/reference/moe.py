"""MoE ops, the executable spec (DESIGN.md §5 "MoE grouped GEMM"): plain loops, float32.

* ``moe_align``: the vLLM ``moe_align_block_size`` layout, written as a Python loop.
* ``grouped_gemm``: one ``a[seg] @ w[e]^T`` per expert segment, in float32.
* ``grouped_gemm_masked``: one ``a[e, :masked_m[e]] @ w[e]^T`` per expert (the
  expert-parallel layout), in float32; the rest of each expert's rows are 0.
* ``fused_moe``: vLLM's ``torch_moe`` test reference: repeat every token top-k
  times, loop over the experts, SiLU-and-mul, weighted sum over the top-k slots.
"""

from __future__ import annotations

import torch


def align_sizes(numel: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """(length of sorted_token_ids, number of blocks): fixed by the shapes (no host sync).

    ``numel + E·(block_m − 1)`` is the worst case (every expert's segment padded by
    ``block_m − 1``), the length vLLM allocates.
    """
    length = numel + num_experts * (block_m - 1)
    return length, (length + block_m - 1) // block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Group the flat slots ``i = t·k + j`` of ``topk_ids [M, k]`` by expert.

    Returns ``sorted_token_ids`` (int32, length ``numel + E·(block_m − 1)``),
    ``expert_ids`` (int32, one per block of ``block_m`` entries) and
    ``num_tokens_post_pad`` (int32 ``[1]``):

    * experts in ascending order; within an expert, slots in ascending flat index;
    * each expert's segment padded with the sentinel ``numel`` up to a multiple of
      ``block_m``; experts without slots get no block;
    * slots whose id is −1 (or outside ``[0, E)``) are dropped;
    * ``num_tokens_post_pad`` = the padded total; every entry at or past it is the
      sentinel, and ``expert_ids`` is −1 for the blocks there.
    """
    ids = topk_ids.reshape(-1).tolist()
    numel = len(ids)
    length, num_blocks = align_sizes(numel, num_experts, block_m)
    sorted_ids = [numel] * length
    expert_ids = [-1] * num_blocks
    pos = 0
    for e in range(num_experts):
        slots = [i for i, x in enumerate(ids) if x == e]
        if not slots:
            continue
        padded = -(-len(slots) // block_m) * block_m
        sorted_ids[pos:pos + len(slots)] = slots
        for b in range(pos // block_m, (pos + padded) // block_m):
            expert_ids[b] = e
        pos += padded
    device = topk_ids.device
    return (torch.tensor(sorted_ids, dtype=torch.int32, device=device),
            torch.tensor(expert_ids, dtype=torch.int32, device=device),
            torch.tensor([pos], dtype=torch.int32, device=device))


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """``out[t] = a[t] @ w[e]^T`` for ``offs[e] <= t < offs[e+1]``; rows at or past
    ``offs[E]`` are 0. Float32 math, output in ``a``'s dtype."""
    offs = expert_offsets.tolist()
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float32, device=a.device)
    for e in range(w.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            out[lo:hi] = a[lo:hi].float() @ w[e].float().t()
    return out.to(a.dtype)


def grouped_gemm_masked(a: torch.Tensor, w: torch.Tensor, masked_m: torch.Tensor) -> torch.Tensor:
    """``out[e, i] = a[e, i] @ w[e]^T`` for ``i < masked_m[e]``; rows ``i >= masked_m[e]``
    are 0 and the matching rows of ``a`` are never read. ``masked_m`` is clamped to
    ``[0, max_m]`` (the public wrapper rejects values outside). Float32 math, output
    in ``a``'s dtype."""
    num_experts, max_m, _ = a.shape
    out = torch.zeros(num_experts, max_m, w.shape[1], dtype=torch.float32, device=a.device)
    for e, m in enumerate(masked_m.tolist()):
        m = min(max(m, 0), max_m)
        if m:
            out[e, :m] = a[e, :m].float() @ w[e].float().t()
    return out.to(a.dtype)


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """``silu(h[:, :I]) * h[:, I:]`` for ``h [rows, 2I]`` (gate first, then up)."""
    inter = h.shape[-1] // 2
    return torch.nn.functional.silu(h[..., :inter]) * h[..., inter:]


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``out[t] = Σ_j topk_weights[t, j] · w2[e] (silu(w13[e, :I] x_t) ⊙ w13[e, I:] x_t)``,
    ``e = topk_ids[t, j]``; ids outside ``[0, E)`` (−1) contribute nothing. Float32."""
    if activation != "silu":
        raise ValueError(f"fused_moe: activation must be 'silu', got {activation!r}")
    m, k = topk_ids.shape
    rows = x.float().repeat_interleave(k, dim=0)              # [M·k, H]: slot t·k + j
    ids = topk_ids.reshape(-1)
    out = torch.zeros(m * k, w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        mask = ids == e
        if mask.any():
            act = silu_and_mul(rows[mask] @ w13[e].float().t())
            out[mask] = act @ w2[e].float().t()
    weighted = out.view(m, k, w2.shape[1]) * topk_weights.float().view(m, k, 1)
    return weighted.sum(dim=1).to(x.dtype)
