"""verify_tree, pure PyTorch: the executable spec (docs/verification.md, "verify_tree").

Written for clarity, one request and one tree node at a time. Every other backend
must give the same integer outputs on the same inputs (same random stream).

The walk (SpecInfer's multi-round speculative sampling), per request:

* the current node starts at the root (local index -1, depth 0); its distribution
  is ``p' = p`` = the filtered target row of the node (log space, fp32);
* its children are tried in increasing local index; child ``c`` with rank ``r``
  among its siblings is accepted iff ``log u < log p'(c) - log q_c(c)`` with ``u``
  the accept-stream coin at position ``offset + depth(current)``, index ``r``;
  padding ids (-1, or outside ``[0, V)``) are skipped (never accepted, ``p'``
  unchanged);
* on rejection ``w = log max(p' - q_c, 0)`` (``residual_log_weights``, the math of
  verify_block) and, if ``w`` has a finite entry, ``log p' = w - lse(w)`` (lse: max
  plus the log of the fixed-point mass, ``sampling.lse_from_mass``); if it has none (``p' == q_c``
  numerically), ``p'`` is kept;
* after an acceptance the walk descends; when no child is accepted (or the node is
  a leaf) the emitted token is a Gumbel race on the resample stream at position
  ``offset + depth(current)`` over the last residual ``w`` that was taken
  (unnormalised, exactly verify_block's race) or over ``log p'`` when none was.

Greedy requests follow the first child whose id equals the argmax of the current
node's target row, and emit the argmax where none does.
"""

from __future__ import annotations

import torch

from . import philox
from .sampling import (filtered_log_probs, fixed_mass, greedy_argmax, lse_from_mass, mass_fraction_bits, race,
                       residual_log_weights)

_NEG_INF = float("-inf")


def normalise_log_weights(w: torch.Tensor) -> torch.Tensor:
    """``w - lse(w)`` in fp32 (-inf stays -inf), ``lse = m + float32(log(float64(Z) 2^-K))`` with
    ``Z`` the fixed-point mass of ``exp_fp32(w - m)`` (``sampling.fixed_mass``): the log-sum-exp
    rule of a filtered row, exact in any summation order."""
    finite = w > _NEG_INF
    m = w[finite].max()
    bits = mass_fraction_bits(w.numel())
    e = torch.exp(torch.where(finite, w - m, torch.tensor(_NEG_INF)))
    lse = lse_from_mass(m, fixed_mass(e, bits).sum(), bits)
    return torch.where(finite, w - lse, torch.tensor(_NEG_INF))


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of every local node (a child of the root has depth 1); parents topological."""
    depth = []
    for j, par in enumerate(parents):
        depth.append(1 if par < 0 else depth[par] + 1)
    return depth


def verify_tree(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    cu_num_draft: torch.Tensor,
    draft_logits: torch.Tensor | None,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor | None,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    seed: torch.Tensor,
    offset: torch.Tensor,
    max_depth: int,
    min_p: torch.Tensor | None = None,
    draft_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = target_logits.device
    target_logits = target_logits.cpu()
    vocab = target_logits.shape[1]
    cu = cu_num_draft.cpu().to(torch.int64).tolist()
    batch = len(cu) - 1
    drafts = draft_tokens.cpu().to(torch.int64).tolist()
    par_all = parents.cpu().to(torch.int64).tolist()
    width = max_depth + 1
    accept_path = torch.full((batch, width), -1, dtype=torch.int32)
    output_tokens = torch.full((batch, width), -1, dtype=torch.int32)
    num_accepted = torch.zeros(batch, dtype=torch.int32)
    rows = draft_index.cpu().to(torch.int64).tolist() if draft_index is not None else list(range(len(drafts)))

    for b in range(batch):
        start, n = cu[b], cu[b + 1] - cu[b]
        par = par_all[start : start + n]
        depth = tree_depths(par)
        t = float(temperature[b]) if temperature is not None else 0.0
        k = int(top_k[b]) if top_k is not None else 0
        tp = float(top_p[b]) if top_p is not None else 1.0
        mp = float(min_p[b]) if min_p is not None else 0.0
        s, o = int(seed[b]), int(offset[b])
        greedy = not t > 0.0

        def target_row(node: int) -> torch.Tensor:  # node -1 = the root
            return target_logits[start + b + 1 + node]

        node, d = -1, 0  # the current node and its depth
        path, tokens = [0], []
        while True:
            children = [j for j in range(n) if par[j] == node] if d < max_depth else []
            if greedy:
                am = greedy_argmax(target_row(node))  # NaN never wins
                nxt = next((c for c in children if drafts[start + c] == am), None)
                if nxt is None:
                    emitted = am
                    break
            else:
                log_p = filtered_log_probs(target_row(node), t, k, tp, mp)  # p', normalised
                raced = log_p  # the log-weights the emitted token is raced over
                position = o + d
                nxt = None
                for rank, c in enumerate(children):
                    x = drafts[start + c]
                    if not 0 <= x < vocab:  # padding: not drawn from q, skipped
                        continue
                    if draft_logits is not None:
                        log_q = filtered_log_probs(draft_logits[rows[start + c]].cpu(), t, k, tp, mp)
                    elif draft_probs is not None:
                        log_q = torch.log(draft_probs[rows[start + c]].cpu().to(torch.float32))
                    else:  # point mass at the draft token
                        log_q = torch.full((vocab,), _NEG_INF)
                        log_q[x] = 0.0
                    log_u = float(torch.log(philox.uniforms(s, position, philox.SALT_ACCEPT, rank)))
                    lp, lq = float(log_p[x]), float(log_q[x])
                    if not _NEG_INF < lq < float("inf"):  # q(x) not finite positive: not drawn from q, skipped
                        continue
                    if lp > _NEG_INF and log_u < lp - lq:
                        nxt = c
                        break
                    w = residual_log_weights(log_p, log_q)
                    if (w > _NEG_INF).any():  # else p' == q numerically: keep p'
                        raced = w
                        log_p = normalise_log_weights(w)
                if nxt is None:
                    noise = philox.gumbels(s, position, philox.SALT_RESAMPLE, torch.arange(vocab))
                    emitted = race(raced, noise)
                    break
            tokens.append(drafts[start + nxt])
            path.append(1 + nxt)
            node, d = nxt, depth[nxt]
        accepted = len(tokens)
        accept_path[b, : accepted + 1] = torch.tensor(path, dtype=torch.int32)
        output_tokens[b, :accepted] = torch.tensor(tokens, dtype=torch.int32)
        output_tokens[b, accepted] = emitted
        num_accepted[b] = accepted
    return accept_path.to(device), num_accepted.to(device), output_tokens.to(device)
