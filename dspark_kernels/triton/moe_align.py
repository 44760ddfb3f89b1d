"""moe_align in Triton: vLLM's ``moe_align_block_size`` layout, deterministic, no host sync.

The flat slots ``i = t·k + j`` are cut into chunks of ``C`` slots. Kernels:

1. ``_chunk_hist_kernel`` (one program per chunk): the chunk's per-expert counts
   (a one-hot ``[C, E]`` compare summed over the chunk), one row of a table
   ``[chunks, E_BLOCK]``.
2. ``_chunk_scan_kernel`` (large inputs only, one program per 32 experts): the
   table becomes, in place, each chunk's count of slots of the same expert in
   *earlier* chunks; the per-expert totals go to a small buffer.
3. ``_align_scatter_kernel`` (one program per chunk and per tile of blocks): from
   the totals, the padded segment of every expert (``ceil(count / block_m)·block_m``
   entries, their starts by a cumulative sum over experts, recomputed in registers
   by every program). Program p writes
   * the slots of chunk p to ``segment_start[e] + earlier_chunks[e] + rank``, the
     rank being the number of earlier slots of expert e inside the chunk (a
     ``[C, C]`` compare): ascending flat index within each expert, no atomics;
   * ``expert_ids`` of its tile of blocks (−1 at and past ``num_tokens_post_pad``)
     and the sentinel ``numel`` into the padding positions of those blocks.
   Token positions and padding positions are disjoint, so nothing is written
   twice and no fill pass precedes the kernel.

Small inputs (at most ``_SMALL_CHUNKS`` chunks, e.g. up to 2048 slots with E = 256)
skip kernel 2: every program of kernel 3 reads the whole table. A single chunk
(up to 64 slots with E = 256, e.g. 8 tokens × top-8) needs kernel 3 alone, which
then counts the chunk itself: one launch.

Ids outside ``[0, E)`` (−1: padding rows, experts of other ranks) match no expert
and get no slot. Every output element is written; all sizes come from shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.moe import align_sizes
from ._moe_common import interpreting

_SMALL_CHUNKS = 64
_ONEHOT_ELEMS = 16384  # C · E_BLOCK: the one-hot compare of a chunk stays this small


@triton.jit
def _chunk_counts(ids_ptr, numel, E, chunk, C: tl.constexpr, E_BLOCK: tl.constexpr):
    """(flat offsets [C], one-hot [C, E_BLOCK], per-expert counts [E_BLOCK]) of one chunk."""
    offs = chunk.to(tl.int64) * C + tl.arange(0, C)
    ids = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
    experts = tl.arange(0, E_BLOCK)
    onehot = (ids[:, None] == experts[None, :]) & (experts[None, :] < E)
    return offs, ids, onehot, tl.sum(onehot.to(tl.int32), axis=0)


@triton.jit
def _chunk_hist_kernel(ids_ptr, numel, E, table_ptr, C: tl.constexpr, E_BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    _offs, _ids, _onehot, counts = _chunk_counts(ids_ptr, numel, E, chunk, C, E_BLOCK)
    tl.store(table_ptr + chunk.to(tl.int64) * E_BLOCK + tl.arange(0, E_BLOCK), counts)


@triton.jit
def _chunk_scan_kernel(table_ptr, totals_ptr, num_chunks, E_BLOCK: tl.constexpr, E_TILE: tl.constexpr,
                       C_TILE: tl.constexpr):
    experts = tl.program_id(0) * E_TILE + tl.arange(0, E_TILE)
    running = tl.zeros([E_TILE], tl.int32)
    for c0 in range(0, num_chunks, C_TILE):
        rows = c0 + tl.arange(0, C_TILE)
        ok = rows < num_chunks
        ptrs = table_ptr + rows[:, None].to(tl.int64) * E_BLOCK + experts[None, :]
        t = tl.load(ptrs, mask=ok[:, None], other=0)
        tl.store(ptrs, tl.cumsum(t, axis=0) - t + running[None, :], mask=ok[:, None])
        running += tl.sum(t, axis=0)
    tl.store(totals_ptr + experts, running)


@triton.jit
def _align_scatter_kernel(ids_ptr, numel, E, block_m, length, num_blocks,
                          table_ptr, totals_ptr, num_chunks,
                          sorted_ptr, expert_ids_ptr, post_pad_ptr,
                          C: tl.constexpr, E_BLOCK: tl.constexpr, MODE: tl.constexpr, NC_BLOCK: tl.constexpr,
                          TB: tl.constexpr, BM_POW2: tl.constexpr):
    # MODE 0: one chunk, counted here; 1: the raw table (small); 2: the scanned table + totals (large).
    pid = tl.program_id(0)
    experts = tl.arange(0, E_BLOCK)
    if MODE == 0:
        offs, ids, onehot, totals = _chunk_counts(ids_ptr, numel, E, pid * 0, C, E_BLOCK)
        before = tl.zeros([E_BLOCK], tl.int32)
    elif MODE == 1:
        rows = tl.arange(0, NC_BLOCK)
        t = tl.load(table_ptr + rows[:, None] * E_BLOCK + experts[None, :], mask=rows[:, None] < num_chunks, other=0)
        totals = tl.sum(t, axis=0)
        before = tl.sum(tl.where(rows[:, None] < pid, t, 0), axis=0)
    else:
        totals = tl.load(totals_ptr + experts)
        before = tl.load(table_ptr + pid.to(tl.int64) * E_BLOCK + experts,
                         mask=tl.where(pid < num_chunks, experts >= 0, False), other=0)
    padded = (totals + block_m - 1) // block_m * block_m
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    if pid == 0:
        tl.store(post_pad_ptr, total)

    # 1. The slots of chunk `pid`.
    if pid < num_chunks:
        if MODE != 0:
            offs, ids, onehot, _counts = _chunk_counts(ids_ptr, numel, E, pid, C, E_BLOCK)
        base = tl.sum(tl.where(onehot, (starts + before)[None, :], 0), axis=1)
        valid = tl.sum(onehot.to(tl.int32), axis=1) > 0
        lane = tl.arange(0, C)
        same = (ids[:, None] == ids[None, :]) & (lane[None, :] < lane[:, None])
        rank = tl.sum(same.to(tl.int32), axis=1)
        tl.store(sorted_ptr + (base + rank), offs.to(tl.int32), mask=valid)

    # 2. expert_ids and padding of blocks [pid·TB, pid·TB + TB).
    blocks = pid * TB + tl.arange(0, TB)
    if pid * TB < num_blocks:
        bstart = blocks * block_m
        eb = tl.sum((ends[None, :] <= bstart[:, None]).to(tl.int32), axis=1)  # expert holding the block
        live = bstart < total
        tl.store(expert_ids_ptr + blocks, tl.where(live, eb, -1), mask=blocks < num_blocks)
        sel = experts[None, :] == eb[:, None]
        seg_start = tl.sum(tl.where(sel, starts[None, :], 0), axis=1)
        seg_count = tl.sum(tl.where(sel, totals[None, :], 0), axis=1)
        r = tl.arange(0, BM_POW2)
        pos = bstart[:, None] + r[None, :]
        pad = (~live[:, None]) | (pos - seg_start[:, None] >= seg_count[:, None])
        ok = (r[None, :] < block_m) & (pos < length) & (blocks[:, None] < num_blocks)
        tl.store(sorted_ptr + pos, tl.full([TB, BM_POW2], 0, tl.int32) + numel, mask=pad & ok)


def _sizes(numel: int, num_experts: int, block_m: int):
    e_block = max(16, triton.next_power_of_2(num_experts))
    c = max(16, min(128, _ONEHOT_ELEMS // e_block))
    bm_pow2 = max(1, triton.next_power_of_2(block_m))
    tb = max(1, min(64, 4096 // bm_pow2))
    return e_block, c, bm_pow2, tb


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, _mode: int | None = None):
    """Triton moe_align (see ``dspark_kernels.moe_align``). ``_mode`` forces a path (tests)."""
    device = topk_ids.device
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    numel = ids.numel()
    length, num_blocks = align_sizes(numel, num_experts, block_m)
    sorted_ids = torch.empty(length, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    post_pad = torch.empty(1, dtype=torch.int32, device=device)
    e_block, c, bm_pow2, tb = _sizes(numel, num_experts, block_m)
    num_chunks = triton.cdiv(numel, c)
    mode = _mode if _mode is not None else (0 if num_chunks <= 1 else (1 if num_chunks <= _SMALL_CHUNKS else 2))
    if mode == 0 and num_chunks > 1:
        raise ValueError("moe_align: mode 0 needs a single chunk")
    warps = 1 if interpreting() else 4
    table = torch.empty((max(num_chunks, 1), e_block), dtype=torch.int32, device=device)
    totals = torch.empty(e_block, dtype=torch.int32, device=device) if mode == 2 else table
    if mode != 0 and num_chunks > 0:
        _chunk_hist_kernel[(num_chunks,)](ids, numel, num_experts, table, C=c, E_BLOCK=e_block, num_warps=warps)
    if mode == 2:
        e_tile = min(32, e_block)
        _chunk_scan_kernel[(e_block // e_tile,)](table, totals, num_chunks, E_BLOCK=e_block, E_TILE=e_tile,
                                                 C_TILE=64, num_warps=warps)
    grid = max(num_chunks, triton.cdiv(num_blocks, tb), 1)
    _align_scatter_kernel[(grid,)](
        ids, numel, num_experts, block_m, length, num_blocks, table, totals, num_chunks,
        sorted_ids, expert_ids, post_pad,
        C=c, E_BLOCK=e_block, MODE=mode, NC_BLOCK=max(1, triton.next_power_of_2(num_chunks)), TB=tb,
        BM_POW2=bm_pow2, num_warps=warps)
    return sorted_ids, expert_ids, post_pad
