"""KV rollback ops in plain PyTorch: the executable spec (docs/kv.md).

Written for clarity, one token at a time. Every backend must produce the same
bytes. Where the input is out of range (which the public wrappers reject on the
CPU, and on CUDA under ``DSPARK_DEBUG=1``) these functions skip the offending
move / page / row exactly as the CUDA kernels do, so the spec also says what a
kernel does with such input: nothing outside the given tensors is touched.

One exception: another request's cache must never change, so a kv_commit in
which one request writes a physical slot that another request writes, reads
(a source) or keeps (an identity move: its accepted token already in place) is
an error here as on the CPU (the CUDA kernel skips such writes instead).
Lengths are Python ints, so no sum here can overflow; ``new_len`` saturates to
the int32 range instead of wrapping (the CPU kernel rejects such input).
"""

from __future__ import annotations

import torch


def _physical_slot(table_row: list[int], pos: int, page_size: int, num_pages: int):
    """(page, slot) holding logical position ``pos`` of a request, or None when
    ``pos`` is negative, past the block table, or on a page id outside [0, num_pages)."""
    if pos < 0 or pos // page_size >= len(table_row):
        return None
    page = table_row[pos // page_size]
    if not 0 <= page < num_pages:
        return None
    return page, pos % page_size


def kv_commit(caches: list[torch.Tensor], block_table: torch.Tensor, page_size: int, committed_len: torch.Tensor,
              accept_path: torch.Tensor, num_accept: torch.Tensor) -> torch.Tensor:
    """Move window index ``accept_path[b, j]`` to logical position ``committed_len[b] + j``
    for ``j < num_accept[b]``, in every cache; returns ``new_len = committed_len + num_accept``."""
    table = block_table.tolist()
    start = committed_len.tolist()
    path = accept_path.tolist()
    count = num_accept.tolist()
    width = accept_path.shape[1]
    num_pages = caches[0].shape[0] if caches else 0
    plans = []
    for b in range(len(start)):
        moves = []
        for j in range(max(0, min(count[b], width))):
            src_index = path[b][j]
            if src_index < 0:  # padding
                continue
            if src_index == j:  # already in place (a chain moves nothing): request b keeps this slot
                kept = _physical_slot(table[b], start[b] + j, page_size, num_pages)
                if kept is not None:
                    moves.append((None, kept))
                continue
            src = _physical_slot(table[b], start[b] + src_index, page_size, num_pages)
            dst = _physical_slot(table[b], start[b] + j, page_size, num_pages)
            if src is None or dst is None:
                continue
            moves.append((src, dst))
        plans.append(moves)
    _check_no_cross_request_writes(plans)
    for moves in plans:
        moves = [(src, dst) for src, dst in moves if src is not None]
        for cache in caches:
            rows = [cache[src].clone() for src, _ in moves]  # read every source first ...
            for (_, dst), row in zip(moves, rows):  # ... then write every destination
                cache[dst].copy_(row)
    lo, hi = -(2**31), 2**31 - 1
    new_len = [min(max(length + n, lo), hi) for length, n in zip(start, count)]
    return torch.tensor(new_len, dtype=torch.int32, device=committed_len.device)


def _check_no_cross_request_writes(plans) -> None:
    """No physical slot written by one request may be written, read or kept by another."""
    writer = {}
    for b, moves in enumerate(plans):
        for src, dst in moves:
            if src is not None:
                other = writer.setdefault(dst, b)
                if other != b:
                    raise ValueError(f"kv_commit: block_table maps a destination of request {b} and one of request "
                                     f"{other} to the same physical slot (page {dst[0]}, slot {dst[1]})")
    for b, moves in enumerate(plans):
        for src, dst in moves:
            slot, what = (dst, "keeps its token at") if src is None else (src, "reads")
            other = writer.get(slot, b)
            if other != b:
                raise ValueError(f"kv_commit: request {b} {what} page {slot[0]} slot {slot[1]}, which request "
                                 f"{other} overwrites: the block_table rows share a page that is being written")


def kv_release_pages(block_table: torch.Tensor, new_len: torch.Tensor, old_len: torch.Tensor, page_size: int,
                     refcount: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop one reference of every block-table entry p with ``new_len <= p * page_size < old_len``;
    return the pages that reached zero (per request, block-table order, -1 padded) and their counts.
    Requests are processed in order; a refcount never goes below zero."""
    batch, width = block_table.shape
    table = block_table.tolist()
    new, old = new_len.tolist(), old_len.tolist()
    freed = torch.full((batch, width), -1, dtype=torch.int32, device=block_table.device)
    num_freed = torch.zeros(batch, dtype=torch.int32, device=block_table.device)
    for b in range(batch):
        found = []
        for p in range(width):
            if not (p * page_size >= new[b] and p * page_size < old[b]):
                continue
            page = table[b][p]
            if not 0 <= page < refcount.shape[0] or int(refcount[page]) <= 0:
                continue  # invalid page id or a double free: skipped
            refcount[page] -= 1
            if int(refcount[page]) == 0:
                found.append(page)
        freed[b, : len(found)] = torch.tensor(found, dtype=torch.int32)
        num_freed[b] = len(found)
    return freed, num_freed


def window_commit(window: torch.Tensor, rows: torch.Tensor, cu: torch.Tensor, positions: torch.Tensor,
                  keep: torch.Tensor) -> None:
    """Write each kept row ``t`` of request ``b`` (``cu[b] <= t < cu[b+1]``) to
    ``window[b, positions[t] % W]``, in row order (the later row wins a shared slot)."""
    width = window.shape[1]
    offsets, pos, kept = cu.tolist(), positions.tolist(), keep.tolist()
    for b in range(window.shape[0]):
        for t in range(offsets[b], offsets[b + 1]):
            if kept[t] and pos[t] >= 0:
                window[b, pos[t] % width].copy_(rows[t])


def state_select(states: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[b] = states[b, index[b]]``; an index outside [0, S) (-1: padding) leaves out[b] as it is."""
    for b, i in enumerate(index.tolist()):
        if 0 <= i < states.shape[1]:
            out[b].copy_(states[b, i])
