"""draft_sample_block, pure PyTorch: the executable spec (docs/drafting.md).

One request and one position at a time. Position ``k`` of request ``b``:

* logits ``l = base_logits[b, k]`` in fp32, plus the Markov correction
  ``sum_{i < r} w1[x_prev, i] * w2[i, :]`` summed over ``i`` in order in fp32 (then
  added to the base logits) when the Markov weights are given; ``x_prev`` is
  ``anchor[b]`` at ``k = 0`` and the token drawn at ``k - 1`` after that;
* greedy rows (temperature ``<= 0`` or None): the argmax of ``l`` (lowest index on
  ties; NaN never wins; 0 if no entry is above ``-inf``);
* sampling rows: ``s = l / T`` (fp32 division), ``t`` = the min-p / top-k / top-p threshold of
  ``sampling.filter_threshold`` (the verify_block rules), and the Gumbel race
  ``argmax_v (s_v + G_v)`` over ``s_v >= t`` with ``G`` from the draft stream
  (``philox.SALT_DRAFT``) at position ``offset[b] + k`` and index ``v``
  (``sampling.race``: lowest index on ties, token 0 if no score is finite);
* non-finite input (docs/drafting.md): NaN is ``-inf``; a row with ``+inf`` kept
  entries races them alone with weight 0 (score ``G_v``: uniform among them).

The returned logits are ``l`` (fp32), the distribution the token was drawn from.
"""

from __future__ import annotations

import torch

from . import philox
from .sampling import filter_threshold, greedy_argmax, inf_rule, race, scale_logits


def markov_correction(w1_row: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``w1_row @ w2`` in fp32, summed over the rank in order (i = 0, 1, ..., r - 1)."""
    h = w1_row.to(torch.float32)
    w2 = w2.to(torch.float32)
    acc = torch.zeros(w2.shape[1], dtype=torch.float32)
    for i in range(w2.shape[0]):
        acc = acc + h[i] * w2[i]
    return acc


def greedy_token(logits: torch.Tensor) -> int:
    return greedy_argmax(logits)


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int,
               position: int, min_p: float = 0.0) -> int:
    """One draw from the filtered ``softmax(logits / T)`` (fp32 logits), or the argmax."""
    if not temperature > 0.0:
        return greedy_token(logits)
    s = scale_logits(logits, temperature)
    threshold = filter_threshold(s, top_k, top_p, min_p)
    weights = inf_rule(torch.where(s >= threshold, s, torch.tensor(float("-inf"))))
    noise = philox.gumbels(seed, position, philox.SALT_DRAFT, torch.arange(s.numel()))
    return race(weights, noise)


def draft_sample_block(
    base_logits: torch.Tensor,
    anchor: torch.Tensor,
    markov_w1: torch.Tensor | None,
    markov_w2: torch.Tensor | None,
    temperature: torch.Tensor | None,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    seed: torch.Tensor,
    offset: torch.Tensor,
    return_logits: bool = True,
    min_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    device = base_logits.device
    base = base_logits.cpu()
    batch, gamma, vocab = base.shape
    w1 = markov_w1.cpu() if markov_w1 is not None else None
    w2 = markov_w2.cpu() if markov_w2 is not None else None
    tokens = torch.zeros(batch, gamma, dtype=torch.int32)
    logits_out = torch.empty(batch, gamma, vocab, dtype=torch.float32) if return_logits else torch.empty(0)

    for b in range(batch):
        t = float(temperature[b]) if temperature is not None else 0.0
        k = int(top_k[b]) if top_k is not None else 0
        p = float(top_p[b]) if top_p is not None else 1.0
        mp = float(min_p[b]) if min_p is not None else 0.0
        s, o = int(seed[b]), int(offset[b])
        prev = int(anchor[b])
        for pos in range(gamma):
            logits = base[b, pos].to(torch.float32)
            if w1 is not None:
                logits = logits + markov_correction(w1[prev], w2)
            token = sample_row(logits, t, k, p, s, o + pos, mp)
            tokens[b, pos] = token
            if return_logits:
                logits_out[b, pos] = logits
            prev = token
    return tokens.to(device), logits_out.to(device)
