"""Input checks of the vocabulary-parallel ops that end the same way on every rank.

A check that fails on one rank only would leave the others waiting in a collective,
so each rank runs its local checks, then every rank exchanges its layout (vocabulary
shard, shapes, which optional arguments it was given) and a failure flag in one small
all-gather; all ranks then raise — the failing rank its own message, the others one
naming it — or all go on. On CPU tensors this runs on every call; on CUDA tensors (a
host read) once per layout, and on every call under ``DSPARK_DEBUG=1``.
"""

from __future__ import annotations

import os

import torch

_checked: set = set()

LAYOUT_FIELDS = ("vocab_start", "V_local", "vocab_size")


def agree(comm, op: str, local_error: Exception | None, layout: dict[str, int], device: torch.device) -> None:
    """Raise on every rank if any rank failed its local checks or the layouts disagree.

    ``layout`` holds ``vocab_start``, ``V_local`` (this rank's shard width), ``vocab_size``
    and any shape / flag that must be equal on every rank."""
    names = list(layout)
    key = (id(comm.group), comm.world, tuple(layout.values()))
    debug = os.environ.get("DSPARK_DEBUG") == "1"
    if local_error is None and device.type != "cpu" and not debug and key in _checked:
        return
    if comm.world == 1:
        if local_error is not None:
            raise local_error
        rows = torch.tensor([[layout[n] for n in names] + [0]])
    else:
        mine = torch.tensor([layout[n] for n in names] + [0 if local_error is None else 1], dtype=torch.int64,
                            device=device)
        rows = comm.all_gather(mine).cpu()
        if local_error is not None:
            raise local_error
        failed = torch.nonzero(rows[:, -1]).flatten().tolist()
        if failed:
            raise ValueError(f"{op}: rank {failed[0]} rejected its inputs (its error names the argument); "
                             f"every rank stops here")
    starts, widths, sizes = rows[:, 0].tolist(), rows[:, 1].tolist(), rows[:, 2].tolist()
    if len(set(sizes)) != 1:
        raise ValueError(f"{op}: vocab_size must be the same on every rank, got {sizes} (by rank)")
    vocab = sizes[0]
    expected = 0
    for r, (start, width) in enumerate(zip(starts, widths)):
        if start != expected:
            raise ValueError(f"{op}: the vocabulary shards must tile [0, vocab_size) in rank order: rank {r} has "
                             f"vocab_start = {start}, expected {expected} (the end of rank {r - 1}'s shard)"
                             if r else f"{op}: rank 0 must have vocab_start = 0, got {start}")
        expected = start + width
    if expected < vocab:
        raise ValueError(f"{op}: the vocabulary shards cover [0, {expected}), short of vocab_size = {vocab}")
    for j, n in enumerate(names[3:], start=3):
        values = rows[:, j].tolist()
        if len(set(values)) != 1:
            raise ValueError(f"{op}: {n} must be the same on every rank, got {values} (by rank)")
    _checked.add(key)
