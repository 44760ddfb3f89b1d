"""random_words on Triton: the kernel lives with the shared Philox helpers (``philox.py``)."""

from __future__ import annotations

import torch

from ..reference.random_words import INDEX_END
from .philox import random_words as _words


def random_words(seed: torch.Tensor, position: torch.Tensor, index: torch.Tensor, salt: int) -> torch.Tensor:
    """``-1`` where ``index`` is outside ``[0, 2^32)``, as the CUDA kernel (no host sync)."""
    index = index.to(device=seed.device, dtype=torch.int64)
    valid = (index >= 0) & (index < INDEX_END)
    return torch.where(valid, _words(seed, position, torch.where(valid, index, 0), salt), -1)
