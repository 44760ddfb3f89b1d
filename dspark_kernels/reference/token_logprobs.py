"""token_logprobs, pure PyTorch: the executable spec (docs/verification.md, "Log-probabilities").

``logprobs[b, j] = log p(tokens[b, j])`` with ``p`` the filtered target distribution
of row ``rows[b, j]`` (``sampling.filtered_log_probs``: temperature, min-p, top-k,
top-p; temperature 1 for greedy requests), ``-inf`` for padding.
"""

from __future__ import annotations

import torch

from .sampling import filtered_log_probs


def token_logprobs(
    target_logits: torch.Tensor,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    temperature: torch.Tensor | None,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    device = target_logits.device
    logits = target_logits.cpu()
    vocab = logits.shape[1]
    tok = tokens.cpu().to(torch.int64)
    row = rows.cpu().to(torch.int64)
    out = torch.full(tuple(tokens.shape), float("-inf"), dtype=torch.float32)
    for b in range(tok.shape[0]):
        t = float(temperature[b]) if temperature is not None else 0.0
        t = t if t > 0.0 else 1.0  # greedy requests: the raw logits' distribution
        k = int(top_k[b]) if top_k is not None else 0
        p = float(top_p[b]) if top_p is not None else 1.0
        mp = float(min_p[b]) if min_p is not None else 0.0
        for j in range(tok.shape[1]):
            r, x = int(row[b, j]), int(tok[b, j])
            if r < 0 or not 0 <= x < vocab:
                continue
            out[b, j] = filtered_log_probs(logits[r], t, k, p, mp)[x]
    return out.to(device)
