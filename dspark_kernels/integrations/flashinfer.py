"""FlashInfer adapter: ``flashinfer.sampling.chain_speculative_sampling`` on
``verify_block``.

Checked against flashinfer-ai/flashinfer ``flashinfer/sampling.py`` at ``01c897d7``
(``FLASHINFER_COMMIT``; the same argument list and docstring example as ``fb28d72``).
Unlike FlashInfer there (its open PR #4861), every request's ``seed`` / ``offset``
is honoured: a ``[B]`` tensor gives request b the stream keyed by
``(seed[b], offset[b])``.

FlashInfer is not imported.
"""

from __future__ import annotations

import torch

from .. import randomness as _randomness
from .. import verification as _verification
from . import _common

FLASHINFER_COMMIT = "01c897d7075594003c411c0aa5e3befdf0bcae94"

__all__ = ["chain_speculative_sampling"]


def _uniform(words: torch.Tensor) -> torch.Tensor:
    """The uniform of a word, as the samplers compute it: ``((word >> 9) + 0.5) * 2^-23``."""
    return ((words >> 9).to(torch.float64) + 0.5) * 2.0**-23


def chain_speculative_sampling(
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    maybe_output_accepted_token_num: torch.Tensor | None = None,
    maybe_output_emitted_draft_token_num: torch.Tensor | None = None,
    deterministic: bool = True,
    generator: torch.Generator | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's ``chain_speculative_sampling`` (FLASHINFER_COMMIT): the same arguments
    and return triple.

    Args (FlashInfer's):
        draft_probs: ``[B, K, V]`` the drafter's probabilities (used as given).
        draft_token_ids: ``[B, K]`` the drafts.
        target_probs: ``[B, K + 1, V]`` the target's probabilities (the last row of each
            request is the bonus row).
        maybe_output_accepted_token_num, maybe_output_emitted_draft_token_num: ``[B]``;
            when given, the counts are *added* to them in place (FlashInfer's contract)
            and they are returned.
        deterministic: accepted (we are deterministic).
        generator: draws the per-request seeds when ``seed`` is None (torch's default
            generator of the device when None).
        seed: int (every request), or an int64 tensor of length 1 or B (per request).
        offset: the same forms; the stream position of each request's first draft
            (None: 0). Advance it between calls (e.g. by the request's position), as
            FlashInfer asks, when the seed is fixed.
        backend (ours): verify_block's backend.

    Returns:
        ``output_token_ids [B, K + 1]`` int32 (accepted drafts, the recovered or bonus
        token, then -1), ``output_accepted_token_num [B]`` int32 -- how many drafts
        pass their own accept test ``u_i < p_i(x_i) / q_i(x_i)`` taken independently
        (FlashInfer's alignment metric; ``u_i`` is the same coin the verification used,
        so the emitted drafts are among them) -- and
        ``output_emitted_draft_token_num [B]`` int32, the accepted drafts emitted.

    Example (FlashInfer's own docstring case: draft 2 has p/q = 2, draft 1 has p = 0):

    >>> import torch
    >>> from dspark_kernels.integrations.flashinfer import chain_speculative_sampling
    >>> draft_probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]])
    >>> target_probs = torch.tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]])
    >>> out, accepted, emitted = chain_speculative_sampling(draft_probs, torch.tensor([[2, 1]]), target_probs)
    >>> out.tolist(), accepted.tolist(), emitted.tolist()
    ([[2, 0, -1]], [1], [1])

    Cost: FlashInfer hands over probabilities, our op reads logits: one
    ``[B (K + 1), V]`` log of ``target_probs``; the draft probabilities are read in place.
    """
    where = "chain_speculative_sampling"
    if draft_probs.dim() != 3 or target_probs.dim() != 3:
        raise ValueError(f"{where}: draft_probs must be [B, K, V] and target_probs [B, K + 1, V], got "
                         f"{tuple(draft_probs.shape)} and {tuple(target_probs.shape)}")
    batch, steps, vocab = draft_probs.shape
    if tuple(target_probs.shape) != (batch, steps + 1, vocab):
        raise ValueError(f"{where}: target_probs must have shape {[batch, steps + 1, vocab]}, got "
                         f"{tuple(target_probs.shape)}")
    if tuple(draft_token_ids.shape) != (batch, steps):
        raise ValueError(f"{where}: draft_token_ids must have shape {[batch, steps]}, got "
                         f"{tuple(draft_token_ids.shape)}")
    device = target_probs.device
    if seed is None:
        seed = _common.random_seeds(batch, device, generator)
    else:
        seed = _common.per_request(seed if isinstance(seed, torch.Tensor) else _common.as_int64_bits(int(seed)),
                                   batch, device, torch.int64)
    offset = _common.per_request(0 if offset is None else offset, batch, device, torch.int64)
    logits = _common.log_of_probs(target_probs.reshape(batch * (steps + 1), vocab))
    drafts = draft_token_ids.reshape(batch * steps)
    cu = torch.arange(batch + 1, device=device, dtype=torch.int64) * steps
    out, emitted = _verification.verify_block(
        logits, drafts, cu, draft_probs=draft_probs.reshape(batch * steps, vocab), temperature=1.0, seed=seed,
        offset=offset, max_num_draft=steps, backend=backend)

    # FlashInfer's accepted_token_num: every draft's accept test on its own, with the
    # coin verify_block drew for it (accept stream, position offset + i, index 0).
    i = torch.arange(steps, device=device, dtype=torch.int64)
    words = _randomness.random_words(seed.unsqueeze(1).expand(batch, steps).contiguous(),
                                     (offset.unsqueeze(1) + i).contiguous(),
                                     torch.zeros(batch, steps, dtype=torch.int64, device=device),
                                     _randomness.SALT_ACCEPT)
    x = draft_token_ids.to(torch.int64)
    valid = (x >= 0) & (x < vocab)
    xs = x.clamp(0, vocab - 1).unsqueeze(2)
    p = target_probs[:, :steps].gather(2, xs).squeeze(2).double()
    p = p / target_probs[:, :steps].sum(2, dtype=torch.float64)  # the kernel's p is the normalised row
    q = draft_probs.gather(2, xs).squeeze(2).double()
    q_ok = torch.isfinite(q) & (q > 0)
    passes = valid & q_ok & (torch.log(_uniform(words)) < torch.log(p) - torch.log(torch.where(q_ok, q, 1.0)))
    accepted = passes.sum(1).to(torch.int32)

    if maybe_output_accepted_token_num is None:
        maybe_output_accepted_token_num = accepted
    else:
        maybe_output_accepted_token_num.add_(accepted.to(maybe_output_accepted_token_num.dtype))
    if maybe_output_emitted_draft_token_num is None:
        maybe_output_emitted_draft_token_num = emitted
    else:
        maybe_output_emitted_draft_token_num.add_(emitted.to(maybe_output_emitted_draft_token_num.dtype))
    return out, maybe_output_accepted_token_num, maybe_output_emitted_draft_token_num
