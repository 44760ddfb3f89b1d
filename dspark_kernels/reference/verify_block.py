"""verify_block, pure PyTorch: the executable spec (docs/verification.md).

Written for clarity, one request and one position at a time. Every other backend
must give the same integer outputs on the same inputs (same random stream).
"""

from __future__ import annotations

import torch

from . import philox
from .sampling import filtered_log_probs, greedy_argmax, race, residual_log_weights


def verify_block(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    draft_logits: torch.Tensor | None,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor | None,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    seed: torch.Tensor,
    offset: torch.Tensor,
    max_num_draft: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    device = target_logits.device
    target_logits = target_logits.cpu()
    vocab = target_logits.shape[1]
    cu = cu_num_draft.cpu().to(torch.int64).tolist()
    batch = len(cu) - 1
    drafts = draft_tokens.cpu().to(torch.int64)
    out = torch.full((batch, max_num_draft + 1), -1, dtype=torch.int32)
    num_accepted = torch.zeros(batch, dtype=torch.int32)

    for b in range(batch):
        start, n = cu[b], cu[b + 1] - cu[b]
        t = float(temperature[b]) if temperature is not None else 0.0
        k = int(top_k[b]) if top_k is not None else 0
        p = float(top_p[b]) if top_p is not None else 1.0
        s, o = int(seed[b]), int(offset[b])
        greedy = not t > 0.0

        def target_row(i: int) -> torch.Tensor:
            return target_logits[start + b + i]

        accepted = 0
        emitted = None
        for i in range(n):
            x = int(drafts[start + i])
            valid = 0 <= x < vocab
            if greedy:
                target_argmax = greedy_argmax(target_row(i))
                if valid and x == target_argmax:
                    accepted += 1
                    continue
                emitted = target_argmax
                break
            log_p = filtered_log_probs(target_row(i), t, k, p)
            if draft_logits is not None:
                log_q = filtered_log_probs(draft_logits[start + i].cpu(), t, k, p)
            elif draft_probs is not None:
                log_q = torch.log(draft_probs[start + i].cpu().to(torch.float32))
            else:  # point mass at the draft token
                log_q = torch.full((vocab,), float("-inf"))
                if valid:
                    log_q[x] = 0.0
            position = o + i
            q_ok = False  # q(x) is a finite positive number
            if valid:
                log_u = float(torch.log(philox.uniforms(s, position, philox.SALT_ACCEPT, 0)))
                lp, lq = float(log_p[x]), float(log_q[x])
                q_ok = float("-inf") < lq < float("inf")  # False for NaN
                if lp > float("-inf") and q_ok and log_u < lp - lq:
                    accepted += 1
                    continue
            # Rejected (or padding): sample the residual; a padding id, or one whose q(x)
            # is not a finite positive number, was not drawn from q, so its row is
            # sampled from p itself.
            noise = philox.gumbels(s, position, philox.SALT_RESAMPLE, torch.arange(vocab))
            weights = residual_log_weights(log_p, log_q) if q_ok else log_p
            if not (weights > float("-inf")).any():
                weights = log_p  # p == q numerically: the residual has no mass
            emitted = race(weights, noise)
            break
        if emitted is None:  # every draft accepted: bonus token from row n
            if greedy:
                emitted = greedy_argmax(target_row(n))
            else:
                log_p = filtered_log_probs(target_row(n), t, k, p)
                noise = philox.gumbels(s, o + n, philox.SALT_RESAMPLE, torch.arange(vocab))
                emitted = race(log_p, noise)
        out[b, :accepted] = drafts[start : start + accepted].to(torch.int32)
        out[b, accepted] = emitted
        num_accepted[b] = accepted
    return out.to(device), num_accepted.to(device)
