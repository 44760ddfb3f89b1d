"""random_words: the raw Philox words of the randomness contract, in schema order."""

from __future__ import annotations

import torch

from . import philox


def random_words(seed: torch.Tensor, position: torch.Tensor, index: torch.Tensor, salt: int) -> torch.Tensor:
    return philox.random_words(seed.to(torch.int64), position.to(torch.int64), salt, index.to(torch.int64))
