"""Philox4x32-10 in Triton: the random stream of docs/randomness.md, word for word.

The bit layout is defined once in ``csrc/include/dspark/philox.h``::

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (index >> 2, position & 0xffffffff, position >> 32, salt)
    word    = Philox4x32-10(counter, key)[index & 3]

The rounds are written out here in uint32 arithmetic (``tl.umulhi`` for the high
half of each product) instead of using ``tl.philox``, whose internal counter /
key layout is Triton's business and could change between versions.

Device helpers (``@triton.jit``, callable from other kernels):

* ``philox4x32_10(c0, c1, c2, c3, k0, k1)`` -> the four uint32 words;
* ``split_u64(x)`` -> (low, high) uint32 halves of an int64 (two's complement bits);
* ``random_words4(seed_lo, seed_hi, pos_lo, pos_hi, salt, ctr)`` -> the four words of
  the call that holds vocabulary entries ``[4*ctr, 4*ctr + 4)``;
* ``random_word(...)`` -> the word of one ``index``;
* ``uniform_from_word(w)`` -> fp32 ``((w >> 9) + 0.5) * 2^-23``, strictly inside (0, 1);
* ``gumbel_from_word(w)`` -> fp32 ``-log(-log(u))``.

Host helper: ``random_words(seed, position, index, salt)`` launches a kernel that
returns the raw words as int64 in ``[0, 2^32)`` (for cross-backend tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SALT_DRAFT = 0x44524654
SALT_ACCEPT = 0x41434350
SALT_RESAMPLE = 0x52534D50

_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (broadcastable); returns the four output words."""
    m0 = tl.full([], 0xD2511F53, tl.uint32)
    m1 = tl.full([], 0xCD9E8D57, tl.uint32)
    w0 = tl.full([], 0x9E3779B9, tl.uint32)
    w1 = tl.full([], 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
        k0 = k0 + w0
        k1 = k1 + w1
    return c0, c1, c2, c3


@triton.jit
def split_u64(x):
    """(low, high) 32-bit halves of an int64 value's bits, as uint32."""
    x = x.to(tl.int64)
    return x.to(tl.uint32), (x >> 32).to(tl.uint32)


@triton.jit
def random_words4(seed_lo, seed_hi, pos_lo, pos_hi, salt, ctr):
    """The four words of counter (ctr, pos_lo, pos_hi, salt) under key (seed_lo, seed_hi).

    ``ctr`` is ``index >> 2`` (uint32); word ``j`` belongs to vocabulary index ``4*ctr + j``.
    """
    return philox4x32_10(ctr.to(tl.uint32), pos_lo, pos_hi, salt.to(tl.uint32), seed_lo, seed_hi)


@triton.jit
def select_word(w0, w1, w2, w3, lane):
    """Word ``lane`` (0..3) of a Philox output, elementwise."""
    out = tl.where(lane == 0, w0, w1)
    out = tl.where(lane == 2, w2, out)
    return tl.where(lane == 3, w3, out)


@triton.jit
def random_word(seed_lo, seed_hi, pos_lo, pos_hi, salt, index):
    """The contract's word for a vocabulary ``index`` (taken as uint32)."""
    idx = index.to(tl.uint32)
    w0, w1, w2, w3 = random_words4(seed_lo, seed_hi, pos_lo, pos_hi, salt, idx >> 2)
    return select_word(w0, w1, w2, w3, idx & 3)


@triton.jit
def uniform_from_word(word):
    """fp32 uniform strictly inside (0, 1): ((w >> 9) + 0.5) * 2^-23 (every value exact)."""
    return ((word.to(tl.uint32) >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def gumbel_from_word(word):
    """Gumbel(0, 1) noise -log(-log u) in fp32."""
    u = uniform_from_word(word)
    return -tl.log(-tl.log(u))


@triton.jit
def _random_words_kernel(seed_ptr, pos_ptr, index_ptr, out_ptr, numel, salt, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    seed = tl.load(seed_ptr + offs, mask=mask, other=0)
    pos = tl.load(pos_ptr + offs, mask=mask, other=0)
    index = tl.load(index_ptr + offs, mask=mask, other=0)
    seed_lo, seed_hi = split_u64(seed)
    pos_lo, pos_hi = split_u64(pos)
    word = random_word(seed_lo, seed_hi, pos_lo, pos_hi, salt, index.to(tl.int64).to(tl.uint32))
    tl.store(out_ptr + offs, word.to(tl.int64), mask=mask)


def random_words(seed: torch.Tensor, position: torch.Tensor, index: torch.Tensor, salt: int) -> torch.Tensor:
    """Raw 32-bit words (int64 in [0, 2^32)) of the contract for same-shape int tensors.

    ``index`` is taken modulo 2^32 (as the C++ op does); ``salt`` must be a uint32 value.
    """
    if not 0 <= int(salt) <= 0xFFFFFFFF:
        raise ValueError(f"random_words: salt must be a uint32 value, got {salt}")
    if position.shape != seed.shape or index.shape != seed.shape:
        raise ValueError(f"random_words: seed, position and index must have the same shape, got "
                         f"{tuple(seed.shape)}, {tuple(position.shape)}, {tuple(index.shape)}")
    seed_c = seed.to(torch.int64).contiguous()
    pos_c = position.to(device=seed.device, dtype=torch.int64).contiguous()
    idx_c = index.to(device=seed.device, dtype=torch.int64).contiguous()
    out = torch.empty(seed.shape, dtype=torch.int64, device=seed.device)
    numel = out.numel()
    if numel == 0:
        return out
    block = 1024
    _random_words_kernel[(triton.cdiv(numel, block),)](seed_c, pos_c, idx_c, out, numel, int(salt), BLOCK=block)
    return out
