"""fused_moe on the CPU (PyTorch): slots sorted by expert, per touched expert its two
GEMMs (oneDNN), SiLU-and-mul, the routed weights and the top-k sum in slot order
(deterministic). fp8 weights (with block scales) dequantised per expert."""

from __future__ import annotations

import torch

from ..reference.moe import dequantize_fp8_blocks, dequantize_fp8_groups, quantize_fp8_groups, silu_and_mul
from ._gemm import compute_dtype, mm_into


def fused_moe(x, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None, block_shape=(128, 128),
              activation="silu"):
    if w13_scale is not None:
        return fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, tuple(block_shape))
    return _fused_moe_bf16(x, w13, w2, topk_weights, topk_ids)


def _slots_by_expert(topk_ids, num_experts):
    """The routed slots ``t·k + j`` sorted by expert (stable), ids outside ``[0, E)``
    dropped, and each expert's slot count (one host read: the CPU backend)."""
    ids = topk_ids.reshape(-1).to(torch.int64)
    key = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1).tolist()
    return order[:ids.numel() - counts[num_experts]], counts


def _fused_moe_bf16(x, w13, w2, topk_weights, topk_ids):
    """Slots sorted by expert, rows gathered once; per touched expert only its two GEMMs
    (into slices of sorted buffers); SiLU-and-mul, the routed weights and the top-k sum
    in slot order (deterministic) once over the batch."""
    m, k = topk_ids.shape
    num_experts, two_i, _ = w13.shape
    slots, counts = _slots_by_expert(topk_ids, num_experts)
    n = slots.numel()
    cdt = compute_dtype(x.dtype)
    xs = x[slots // k].to(cdt)
    h = torch.empty((n, two_i), dtype=cdt, device=x.device)
    ys = torch.empty((n, w2.shape[1]), dtype=cdt, device=x.device)
    bounds = [0]
    for c in counts[:num_experts]:
        bounds.append(bounds[-1] + c)
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            mm_into(h[lo:hi], xs[lo:hi], w13[e])
    act = silu_and_mul(h.float()).to(cdt)
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            mm_into(ys[lo:hi], act[lo:hi], w2[e])
    y = torch.zeros(m * k, w2.shape[1], dtype=torch.float32, device=x.device)  # slot t·k + j
    y[slots] = ys.float() * topk_weights.reshape(-1).float()[slots, None]
    return y.view(m, k, w2.shape[1]).sum(dim=1).to(x.dtype)


def fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape):
    """fp8 fused_moe in PyTorch (any device): x quantised once per token, slots sorted by
    expert; per touched expert its two weights dequantised (float32) and two GEMMs;
    the intermediate quantised per row group between them. The reference's numerics
    (float32, the same quantisation), only the summation order differs."""
    bk = block_shape[1]
    m, k = topk_ids.shape
    num_experts, two_i, _ = w13.shape
    slots, counts = _slots_by_expert(topk_ids, num_experts)
    n = slots.numel()
    xs = dequantize_fp8_groups(*quantize_fp8_groups(x, bk), bk)[slots // k]
    h = torch.empty((n, two_i), dtype=torch.float32, device=x.device)
    ys = torch.empty((n, w2.shape[1]), dtype=torch.float32, device=x.device)
    bounds = [0]
    for c in counts[:num_experts]:
        bounds.append(bounds[-1] + c)
    touched = [e for e in range(num_experts) if bounds[e + 1] > bounds[e]]
    for e in touched:
        torch.mm(xs[bounds[e]:bounds[e + 1]], dequantize_fp8_blocks(w13[e], w13_scale[e], block_shape).t(),
                 out=h[bounds[e]:bounds[e + 1]])
    act = dequantize_fp8_groups(*quantize_fp8_groups(silu_and_mul(h), bk), bk)
    for e in touched:
        torch.mm(act[bounds[e]:bounds[e + 1]], dequantize_fp8_blocks(w2[e], w2_scale[e], block_shape).t(),
                 out=ys[bounds[e]:bounds[e + 1]])
    y = torch.zeros(m * k, w2.shape[1], dtype=torch.float32, device=x.device)  # slot t·k + j
    y[slots] = ys * topk_weights.reshape(-1).float()[slots, None]
    return y.view(m, k, w2.shape[1]).sum(dim=1).to(x.dtype)
