"""Philox4x32-10 in PyTorch integer ops: the executable spec of the random stream.

The bit layout is defined once in ``csrc/include/dspark/philox.h``; this module
reproduces it word for word with int64 tensors (uint32 values held in int64,
products split into 16-bit halves so nothing overflows)::

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (index >> 2, position & 0xffffffff, position >> 32, salt)
    word    = Philox4x32-10(counter, key)[index & 3]
"""

from __future__ import annotations

import torch

SALT_DRAFT = 0x44524654
SALT_ACCEPT = 0x41434350
SALT_RESAMPLE = 0x52534D50

_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b, b holding uint32 values."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p1 = a * b_lo  # < 2^48
    p2 = a * b_hi  # < 2^48
    mid = p1 + ((p2 & 0xFFFF) << 16)  # < 2^49
    lo = mid & _MASK32
    hi = (p2 >> 16) + (mid >> 32)
    return hi & _MASK32, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> list[torch.Tensor]:
    """Philox4x32-10 on broadcastable int64 tensors of uint32 values."""
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(
        *[torch.as_tensor(t, dtype=torch.int64) for t in (c0, c1, c2, c3, k0, k1)]
    )
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return [c0, c1, c2, c3]


def _split64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of int64 values taken as uint64 bits (a Python int is
    first wrapped into int64, as ``offset + i`` wraps in the kernels)."""
    if isinstance(x, int):
        x = (x + 2**63) % 2**64 - 2**63
    x = torch.as_tensor(x, dtype=torch.int64)
    return x & _MASK32, (x >> 32) & _MASK32


def random_words(seed, position, salt: int, index) -> torch.Tensor:
    """The raw 32-bit word (as int64 in [0, 2^32)) for broadcastable inputs."""
    seed_lo, seed_hi = _split64(seed)
    pos_lo, pos_hi = _split64(position)
    index = torch.as_tensor(index, dtype=torch.int64)
    words = philox4x32_10(index >> 2, pos_lo, pos_hi, salt, seed_lo, seed_hi)
    lane = index & 3
    out = torch.where(lane == 0, words[0], words[1])
    out = torch.where(lane == 2, words[2], out)
    return torch.where(lane == 3, words[3], out)


def uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """fp32 uniform strictly inside (0, 1): ((w >> 9) + 0.5) * 2^-23."""
    return ((words >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def uniforms(seed, position, salt: int, index=0) -> torch.Tensor:
    return uniform_from_words(random_words(seed, position, salt, index))


def gumbels_from_words(words: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise -log(-log u) in fp32 from raw words."""
    return -torch.log(-torch.log(uniform_from_words(words)))


def gumbels(seed, position, salt: int, index) -> torch.Tensor:
    """Gumbel(0, 1) noise -log(-log u) in fp32."""
    return gumbels_from_words(random_words(seed, position, salt, index))
