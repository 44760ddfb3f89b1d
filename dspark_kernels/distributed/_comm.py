"""The collectives of the vocabulary-parallel ops, counted.

Every exchange goes through one ``Comm``: torch.distributed on the given process
group (NCCL on GPUs, gloo on CPUs), or nothing at world size 1. Each call adds the
bytes this rank hands to torch.distributed to ``stats`` — the payload it sends
(``tensor.nbytes`` for an all-reduce or an all-gather), counted at the call, not
estimated — so ``dspark-bench verify --tp`` reports what a call really moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CommStats:
    """Calls of the vocabulary-parallel ops, the collectives they issued and the payload
    bytes this rank handed to torch.distributed."""

    calls: int = 0
    collectives: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.calls = 0
        self.collectives = 0
        self.bytes = 0


#: Totals of every vocabulary-parallel call in this process (reset it to measure one call).
stats = CommStats()


class Comm:
    """all_reduce / all_gather on ``group`` (the default group when None)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        stats.calls += 1  # one Comm per call of a public op
        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.group = group
        if self.dist is None:
            if group is not None:
                raise RuntimeError("dspark_kernels.distributed: a group was given but torch.distributed "
                                   "is not initialised")
            self.world, self.rank = 1, 0
        else:
            self.world = self.dist.get_world_size(group)
            self.rank = self.dist.get_rank(group)

    def _count(self, t: torch.Tensor) -> None:
        stats.collectives += 1
        stats.bytes += t.numel() * t.element_size()

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """In place; ``op`` is "sum" or "max". Sums are of int64 (exact in any order)."""
        if self.world == 1:
            return t
        self._count(t)
        red = self.dist.ReduceOp.SUM if op == "sum" else self.dist.ReduceOp.MAX
        self.dist.all_reduce(t, op=red, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[world, *t.shape]``: every rank's ``t`` in rank order."""
        if self.world == 1:
            return t.unsqueeze(0)
        self._count(t)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts)
