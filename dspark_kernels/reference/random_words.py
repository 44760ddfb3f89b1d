"""random_words: the raw Philox words of the randomness contract, in schema order."""

from __future__ import annotations

import torch

from . import philox

INDEX_END = 2**32  # index is a uint32 vocabulary index: [0, 2^32)


def random_words(seed: torch.Tensor, position: torch.Tensor, index: torch.Tensor, salt: int) -> torch.Tensor:
    """The words; ``-1`` where ``index`` is outside ``[0, 2^32)`` (an error on CPU tensors,
    checked before this runs; the GPU kernels cannot raise and write -1, never a word)."""
    index = index.to(torch.int64)
    valid = (index >= 0) & (index < INDEX_END)
    words = philox.random_words(seed.to(torch.int64), position.to(torch.int64), salt, torch.where(valid, index, 0))
    return torch.where(valid, words, -1)
