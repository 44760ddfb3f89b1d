"""moe_align in PyTorch: vectorised, fixed-size outputs, no host sync (runs on any device)."""

from __future__ import annotations

import torch

from ..reference.moe import align_sizes


def moe_align(topk_ids, num_experts, block_m):
    """moe_align in PyTorch: fixed-size outputs, no host sync (any device)."""
    device = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)
    numel = ids.numel()
    length, num_blocks = align_sizes(numel, num_experts, block_m)
    key = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)  # E: dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    counts[num_experts] = 0
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    seg_start = ends - padded
    seg_start[num_experts] = length  # dropped slots are scattered past the end
    unpadded_start = torch.cumsum(counts, 0) - counts
    order = torch.sort(key, stable=True).indices                # by expert, then flat index
    k_sorted = key[order]
    rank = torch.arange(numel, device=device) - unpadded_start[k_sorted]
    dest = torch.where(k_sorted < num_experts, seg_start[k_sorted] + rank, length)
    sorted_ids = torch.full((length + 1,), numel, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    total = ends[num_experts - 1]
    block_start = torch.arange(num_blocks, device=device, dtype=torch.int64) * block_m
    expert = torch.searchsorted(ends[:num_experts].contiguous(), block_start, right=True)
    expert_ids = torch.where(block_start < total, expert, -1).to(torch.int32)
    return sorted_ids[:length].clone(), expert_ids, total.reshape(1).to(torch.int32)
