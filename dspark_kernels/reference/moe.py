"""MoE ops, the executable spec (docs/moe.md): plain loops, float32.

* ``moe_align``: the vLLM ``moe_align_block_size`` layout, written as a Python loop.
* ``grouped_gemm``: one ``a[seg] @ w[e]^T`` per expert segment, in float32.
* ``grouped_gemm_masked``: one ``a[e, :masked_m[e]] @ w[e]^T`` per expert (the
  expert-parallel layout), in float32; the rest of each expert's rows are 0.
* ``fused_moe``: vLLM's ``torch_moe`` test reference: repeat every token top-k
  times, loop over the experts, SiLU-and-mul, weighted sum over the top-k slots.
* ``fused_moe_fp8``: the same with fp8 e4m3 weights (128×128 block scales) and
  activations quantised per token per 128 columns, dequantised, float32 math.
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
    # A slot whose id is outside [0, E) contributes nothing, whatever its weight (0 · NaN is NaN).
    valid = ((topk_ids >= 0) & (topk_ids < w13.shape[0])).view(m, k, 1)
    weighted = torch.where(valid, out.view(m, k, w2.shape[1]) * topk_weights.float().view(m, k, 1), 0.0)
    return weighted.sum(dim=1).to(x.dtype)


# --------------------------------------------------------------------------- fp8 e4m3 block-scaled weights

FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-group fp8 quantisation (DeepSeek / vLLM "per-token-group", 1×group).

    The last dim of ``x [..., K]`` is cut into ``G = ceil(K / group)`` groups of ``group``
    columns (the last one may be shorter). For each row and group, in float32::

        scale = amax(|x_group|) / 448                  (IEEE division, rounded to nearest)
        q     = e4m3(clamp(x / scale, -448, 448))      (round to nearest even; 0 if scale = 0)

    Returns ``q`` (float8_e4m3fn ``[..., K]``) and ``scale`` (float32 ``[..., G]``);
    ``q · scale`` is the dequantised value. A group of zeros gets scale 0 and q = 0.
    """
    k = x.shape[-1]
    groups = -(-k // group)
    xf = x.float()
    padded = torch.nn.functional.pad(xf, (0, groups * group - k)).reshape(*x.shape[:-1], groups, group)
    scale = padded.abs().amax(dim=-1) / FP8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (padded / safe[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(*x.shape[:-1], groups * group)[..., :k].contiguous(), scale


def dequantize_fp8_groups(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """``q [..., K] · scale [..., ceil(K/group)]`` (each scale over its group of columns), float32."""
    return q.float() * scale.repeat_interleave(group, dim=-1)[..., :q.shape[-1]]


def dequantize_fp8_blocks(w: torch.Tensor, scale: torch.Tensor, block_shape=(128, 128)) -> torch.Tensor:
    """``w [..., N, K]`` (float8_e4m3fn) times the scale of its ``block_n × block_k`` block,
    ``scale [..., ceil(N/block_n), ceil(K/block_k)]``: float32 ``[..., N, K]``."""
    bn, bk = block_shape
    n, k = w.shape[-2:]
    full = scale.float().repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return w.float() * full


def quantize_fp8_blocks(w: torch.Tensor, block_shape=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantise weights ``w [..., N, K]`` the DeepSeek-V3 way: scale = amax of each
    ``block_n × block_k`` block / 448, ``q = e4m3(w / scale)``. Returns ``(q float8_e4m3fn
    [..., N, K], scale float32 [..., ceil(N/block_n), ceil(K/block_k)])`` (for tests and
    benchmarks; checkpoints ship their own)."""
    bn, bk = block_shape
    n, k = w.shape[-2:]
    gn, gk = -(-n // bn), -(-k // bk)
    wf = torch.nn.functional.pad(w.float(), (0, gk * bk - k, 0, gn * bn - n))
    blocks = wf.reshape(*w.shape[:-2], gn, bn, gk, bk)
    scale = blocks.abs().amax(dim=(-3, -1)) / FP8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (blocks / safe[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(*w.shape[:-2], gn * bn, gk * bk)[..., :n, :k].contiguous(), scale


def fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                  block_shape=(128, 128), activation: str = "silu") -> torch.Tensor:
    """``fused_moe`` with fp8 e4m3 block-scaled weights and per-token-group activations.

    ``x`` is quantised per row in groups of ``block_k`` columns (``quantize_fp8_groups``)
    and dequantised; the weights are dequantised per ``block_n × block_k`` block; GEMM1,
    SiLU-and-mul, then the intermediate (float32) is quantised and dequantised the same
    way, GEMM2, the routed weights and the top-k sum: all in float32, as in ``fused_moe``.
    """
    if activation != "silu":
        raise ValueError(f"fused_moe: activation must be 'silu', got {activation!r}")
    bk = block_shape[1]
    m, k = topk_ids.shape
    xq = dequantize_fp8_groups(*quantize_fp8_groups(x, bk), bk)
    rows = xq.repeat_interleave(k, dim=0)                     # [M·k, H]: slot t·k + j
    ids = topk_ids.reshape(-1)
    out = torch.zeros(m * k, w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        mask = ids == e
        if mask.any():
            act = silu_and_mul(rows[mask] @ dequantize_fp8_blocks(w13[e], w13_scale[e], block_shape).t())
            act = dequantize_fp8_groups(*quantize_fp8_groups(act, bk), bk)
            out[mask] = act @ dequantize_fp8_blocks(w2[e], w2_scale[e], block_shape).t()
    # A slot whose id is outside [0, E) contributes nothing, whatever its weight (0 · NaN is NaN).
    valid = ((topk_ids >= 0) & (topk_ids < w13.shape[0])).view(m, k, 1)
    weighted = torch.where(valid, out.view(m, k, w2.shape[1]) * topk_weights.float().view(m, k, 1), 0.0)
    return weighted.sum(dim=1).to(x.dtype)
