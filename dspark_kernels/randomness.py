"""The randomness contract as an op: ``random_words``, the raw 32-bit Philox words
every sampler of the library draws from (docs/randomness.md).

Engines and tests use it to check their own random stream against ours.
"""

from __future__ import annotations

import numbers

import torch

from . import _registry
from ._validation import _INT_DTYPES, _check_tensor, _fail
from .reference.philox import SALT_ACCEPT, SALT_DRAFT, SALT_RESAMPLE
from .reference.random_words import INDEX_END

__all__ = ["random_words", "SALT_DRAFT", "SALT_ACCEPT", "SALT_RESAMPLE"]


def random_words(seed: torch.Tensor, position: torch.Tensor, index: torch.Tensor, salt: int, *,
                 backend: str | None = None) -> torch.Tensor:
    r"""The raw 32-bit Philox4x32-10 words of the randomness contract, elementwise.

    ::

        key     = (seed mod 2^32, seed >> 32)
        counter = (index >> 2, position mod 2^32, position >> 32, salt)
        word    = Philox4x32-10(counter, key)[index mod 4]          as int64 in [0, 2^32)
        u       = ((word >> 9) + 0.5) * 2^-23                       the uniform in (0, 1) samplers use

    The samplers draw with ``salt`` = ``SALT_DRAFT`` (draft sampling),
    ``SALT_ACCEPT`` (accept coins, ``index = 0``) or ``SALT_RESAMPLE``
    (resample / bonus races, ``index`` = the vocabulary index), at
    ``position = offset[b] + i``.

    Args:
        seed, position, index: int32 / int64 tensors of one shape, on one device; seed
            and position any int64 (their bits), index in ``[0, 2^32)`` (an error on
            CPU tensors and under ``DSPARK_DEBUG=1``; otherwise the word is ``-1``).
        salt: an int in ``[0, 2^32)``.
        backend: "reference" | "cpu" | "triton" | "cuda" | "nvrtc" | None.

    Returns:
        int64 tensor of ``seed``'s shape, values in ``[0, 2^32)``.

    >>> import torch, dspark_kernels as dk
    >>> seed = torch.tensor([7, 7]); pos = torch.tensor([0, 1]); idx = torch.tensor([0, 0])
    >>> words = dk.random_words(seed, pos, idx, dk.SALT_ACCEPT)
    >>> words.dtype, bool(((words >= 0) & (words < 2**32)).all())
    (torch.int64, True)
    >>> torch.equal(words, dk.random_words(seed, pos, idx, dk.SALT_ACCEPT, backend="reference"))
    True
    """
    return _registry.dispatch(RANDOM_WORDS, backend, seed, position, index, salt)


def _check_random_words(seed, position, index, salt):
    op = "random_words"
    _check_tensor(op, "seed", seed, dtypes=_INT_DTYPES)
    for name, t in (("position", position), ("index", index)):
        _check_tensor(op, name, t, dtypes=_INT_DTYPES, device=seed.device)
    if position.shape != seed.shape or index.shape != seed.shape:
        _fail(op, f"seed, position and index must have the same shape, got {tuple(seed.shape)}, "
                  f"{tuple(position.shape)}, {tuple(index.shape)}")
    if isinstance(salt, bool) or not isinstance(salt, numbers.Integral) or not 0 <= salt <= 0xFFFFFFFF:
        _fail(op, f"salt must be an int in [0, 2^32), got {salt!r}")


def _check_random_words_data(seed, position, index, salt):
    flat = index.detach().reshape(-1).cpu().to(torch.int64)
    bad = (flat < 0) | (flat >= INDEX_END)
    if bad.any():
        k = int(torch.nonzero(bad)[0])
        _fail("random_words", f"index[{k}] (flattened) = {int(flat[k])} is outside [0, 2^32) (a uint32 vocabulary "
                              "index)")


RANDOM_WORDS = _registry.declare(_registry.OpSpec(
    schema="random_words(Tensor seed, Tensor position, Tensor index, int salt) -> Tensor",
    fake=lambda seed, position, index, salt: seed.new_empty(seed.shape, dtype=torch.int64),
    reference=".reference.random_words:random_words",
    triton=".triton.random_words:random_words",
    nvrtc=".nvrtc.ops:random_words",
    check=_check_random_words,
    check_data=_check_random_words_data,
    cpp=frozenset({"CPU", "CUDA"}),
))
