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
    method: str = "token",
    min_p: torch.Tensor | None = None,
    draft_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    device = target_logits.device
    target_logits = target_logits.cpu()
    vocab = target_logits.shape[1]
    cu = cu_num_draft.cpu().to(torch.int64).tolist()
    batch = len(cu) - 1
    drafts = draft_tokens.cpu().to(torch.int64)
    out = torch.full((batch, max_num_draft + 1), -1, dtype=torch.int32)
    num_accepted = torch.zeros(batch, dtype=torch.int32)
    rows = draft_index.cpu().to(torch.int64).tolist() if draft_index is not None else None

    def draft_row(i: int) -> int:  # the row of draft_logits / draft_probs that is q of draft i
        return rows[i] if rows is not None else i

    for b in range(batch):
        start, n = cu[b], cu[b + 1] - cu[b]
        t = float(temperature[b]) if temperature is not None else 0.0
        k = int(top_k[b]) if top_k is not None else 0
        p = float(top_p[b]) if top_p is not None else 1.0
        mp = float(min_p[b]) if min_p is not None else 0.0
        s, o = int(seed[b]), int(offset[b])
        greedy = not t > 0.0

        def target_row(i: int) -> torch.Tensor:
            return target_logits[start + b + i]

        if method == "block" and not greedy:
            accepted, emitted = _block_request(target_row, drafts[start : start + n], start, n, vocab, t, k, p, mp,
                                               s, o, draft_logits, draft_probs, draft_row)
            out[b, :accepted] = drafts[start : start + accepted].to(torch.int32)
            out[b, accepted] = emitted
            num_accepted[b] = accepted
            continue

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
            log_p = filtered_log_probs(target_row(i), t, k, p, mp)
            if draft_logits is not None:
                log_q = filtered_log_probs(draft_logits[draft_row(start + i)].cpu(), t, k, p, mp)
            elif draft_probs is not None:
                log_q = torch.log(draft_probs[draft_row(start + i)].cpu().to(torch.float32))
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
                log_p = filtered_log_probs(target_row(n), t, k, p, mp)
                noise = philox.gumbels(s, o + n, philox.SALT_RESAMPLE, torch.arange(vocab))
                emitted = race(log_p, noise)
        out[b, :accepted] = drafts[start : start + accepted].to(torch.int32)
        out[b, accepted] = emitted
        num_accepted[b] = accepted
    return out.to(device), num_accepted.to(device)


# ---------------------------------------------------------------------------------------
# method="block": block verification (Sun et al. 2024), docs/verification.md#block-verification

_F32 = torch.float32
_NEG_INF = float("-inf")


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=_F32)


def block_ratio_step(log_rho: float, log_p: float, log_q: float) -> float:
    """log rho_{j+1} = min(0, log rho_j + (log p(x) - log q(x))) in fp32: -inf once p(x) = 0
    (or rho_j = 0), 0 when q(x) = 0 < p(x); a NaN stays NaN (never accepted)."""
    if not log_rho > _NEG_INF or not log_p > _NEG_INF:
        return _NEG_INF
    if not log_q > _NEG_INF:
        return 0.0
    d = float(_f32(log_rho) + (_f32(log_p) - _f32(log_q)))
    return 0.0 if d >= 0.0 else d


def block_residual_mass(log_rho: float, log_p: torch.Tensor, q: torch.Tensor | None, x: int) -> float:
    """Z = sum_v max(rho p(v) - q(v), 0) in fp64 from fp32 rho = exp(log rho), p = exp(log p)
    (0 where log p = -inf) and q (fp32 values). q=None is the point mass at x: the closed
    form rho (1 - p(x))."""
    rho = float(torch.exp(_f32(log_rho)))
    p = torch.where(log_p > _NEG_INF, torch.exp(torch.where(log_p > _NEG_INF, log_p, 0.0)), 0.0).double()
    if q is None:
        return rho * (1.0 - float(p[x]))
    d = rho * p - q.double()
    return float(torch.where(d > 0, d, 0.0).sum())


def block_accept_prob(log_rho: float, z: float) -> float:
    """h = Z / (Z + 1 - rho) in fp64 (1 when rho = 1: then the denominator is Z alone)."""
    rho = float(torch.exp(_f32(log_rho)))
    if rho >= 1.0:
        return 1.0
    return z / (z + (1.0 - rho))


def _block_request(target_row, drafts, start, n, vocab, t, k, p, mp, s, o, draft_logits, draft_probs, draft_row):
    """(accepted, emitted) of one sampling request under block verification."""
    # The block is the leading run of valid ids: a padding id (or one outside [0, V))
    # was not drawn from q, so the block ends there and its row is the bonus row.
    g = 0
    while g < n and 0 <= int(drafts[g]) < vocab:
        g += 1

    def log_p_row(i):
        return filtered_log_probs(target_row(i), t, k, p, mp)

    def log_q_row(i):  # log q over the vocabulary, and q itself (None for a point mass)
        if draft_logits is not None:
            lq = filtered_log_probs(draft_logits[draft_row(start + i)].cpu(), t, k, p, mp)
            return lq, torch.where(lq > _NEG_INF, torch.exp(torch.where(lq > _NEG_INF, lq, 0.0)), 0.0)
        if draft_probs is not None:
            q = draft_probs[draft_row(start + i)].cpu().to(_F32)
            return torch.log(q), q
        lq = torch.full((vocab,), _NEG_INF)
        lq[int(drafts[i])] = 0.0
        return lq, None

    # Forward over j = 1..g: rho_j from draft j-1, h_j, and the coin eta_j (the accept
    # stream at offset + j - 1, as the token method's coin of draft j - 1). tau is the
    # largest j whose coin passes (the backward scan, done while going forward).
    log_rho, tau, tau_log_rho = 0.0, 0, 0.0
    for j in range(1, g + 1):
        x = int(drafts[j - 1])
        lq_row, _ = log_q_row(j - 1)
        log_rho = block_ratio_step(log_rho, float(log_p_row(j - 1)[x]), float(lq_row[x]))
        if not log_rho > _NEG_INF:
            break  # rho = 0 (or NaN) from here on: every later h is 0
        u = philox.uniforms(s, o + j - 1, philox.SALT_ACCEPT, 0)
        if j == g:  # the last draft: h = rho, tested in log space like the token rule
            ok = float(torch.log(u)) < log_rho
        else:
            _, q_next = log_q_row(j)
            z = block_residual_mass(log_rho, log_p_row(j), q_next, int(drafts[j]))
            ok = float(u) < block_accept_prob(log_rho, z)
        if ok:
            tau, tau_log_rho = j, log_rho
    lp = log_p_row(tau)
    noise = philox.gumbels(s, o + tau, philox.SALT_RESAMPLE, torch.arange(vocab))
    if tau == g:  # every draft of the block accepted: the bonus token from p
        return tau, race(lp, noise)
    # The correction: norm(max(rho_tau p_tau - q_tau, 0)) (rho_0 = 1: the token residual)
    lq, _ = log_q_row(tau)
    weights = residual_log_weights(_f32(tau_log_rho) + lp, lq)
    if not (weights > _NEG_INF).any():
        weights = lp  # no residual mass (p == q numerically): sample p
    return tau, race(weights, noise)
