"""Shared sampling math of the reference backend: temperature, filters, races.

These are the rules every backend implements (the C++/CUDA kernels through
``csrc/include/dspark/sampling.h``, the Triton kernels in their own language):

* scaled logits ``s = logit / T`` in fp32 (a division, so every backend rounds alike);
* min-p (vLLM's order: temperature, then min-p, then top-k, then top-p) keeps every
  token with ``s >= max s + log(min_p)`` (``p >= min_p * max p``), ``log(min_p)``
  taken in fp64 and rounded to fp32, the sum in fp32; disabled when ``min_p <= 0``;
  ``min_p >= 1`` keeps only the maximal entries;
* top-k keeps every token with ``s >= `` the k-th largest ``s`` (ties all kept);
  disabled when ``k <= 0`` or ``k >= V``;
* top-p, applied after top-k, keeps token ``v`` iff the probability mass of the
  kept tokens with strictly larger ``s`` is ``< top_p`` (equivalently ``s >= t*``
  where ``t*`` is the largest value whose mass of kept tokens ``>= t*`` reaches
  ``top_p`` times the kept mass); masses are fixed-point integers (below); disabled
  when ``p <= 0`` or ``p >= 1``;
* ``log p = s - lse`` over the kept set, ``-inf`` for dropped tokens, with the
  order-independent log-sum-exp below;
* fixed-point mass (docs/verification.md, "Order-independent sums"): with ``m`` the
  largest kept ``s``, each kept token weighs ``E_v = trunc(exp_fp32(s_v - m) * 2^K)``
  as an int64, ``K = mass_fraction_bits(V) = 62 - bit_length(V - 1)`` (``V`` terms
  ``<= 1`` sum below ``2^62``); the row's mass is the integer ``Z = sum E_v``, exact
  in any order, so a row split across devices (or threads) sums to the same bits;
  ``lse = m + float32(log(float64(Z) * 2^-K))`` in fp32;
* a categorical sample is the Gumbel race ``argmax_v(log w_v + G_v)`` (lowest index
  wins ties); a race with no finite score yields index 0.

Non-finite input (docs/verification.md, "Non-finite input"): a NaN logit is ``-inf``
(never sampled, accepted, kept or the argmax); an infinite logit stays infinite when
scaled (also at ``T = +inf``), and a finite ``l / T`` that overflows is infinite; a
row whose largest ``s`` is ``+inf`` keeps only its ``+inf`` entries, which share the
mass equally (``log p = -log(n_inf)``).
"""

from __future__ import annotations

import math

import torch


def top_k_active(k: int, vocab: int) -> bool:
    return 0 < k < vocab


def top_p_active(p: float) -> bool:
    return 0.0 < p < 1.0


def min_p_active(min_p: float) -> bool:
    return min_p > 0.0


def min_p_log(min_p: float) -> float:
    """``float32(log(float64(min(min_p, 1))))``, ``-inf`` when off (csrc/include/dspark/sampling.h)."""
    if not min_p_active(min_p):
        return float("-inf")
    return float(torch.tensor(math.log(min(float(torch.tensor(min_p, dtype=torch.float32)), 1.0)),
                              dtype=torch.float32))


def min_p_log_tensor(min_p: torch.Tensor) -> torch.Tensor:
    """``min_p_log`` per request on the device, no sync: ``float32(log(float64(min(min_p, 1))))``,
    ``-inf`` where min_p <= 0 / NaN (used by the Triton launchers and the distributed ops)."""
    m = min_p.to(torch.float32)
    lg = torch.log(torch.clamp(m, max=1.0).to(torch.float64)).to(torch.float32)
    return torch.where(m > 0, lg, torch.full_like(lg, float("-inf")))


def min_p_threshold(max_s: float, log_min_p: float) -> float:
    """The min-p cut ``max s + log(min_p)`` in fp32; ``-inf`` when off or for a row of ``-inf``."""
    if not log_min_p > float("-inf") or not max_s > float("-inf"):
        return float("-inf")
    return float(torch.tensor(max_s, dtype=torch.float32) + torch.tensor(log_min_p, dtype=torch.float32))


def mass_fraction_bits(vocab: int) -> int:
    """``K = 62 - bit_length(V - 1)``: ``V`` fixed-point terms ``<= 1`` at ``2^-K`` sum below ``2^62``."""
    return 62 - max(int(vocab) - 1, 1).bit_length()


def fixed_mass(e: torch.Tensor, bits: int) -> torch.Tensor:
    """``trunc(e * 2^bits)`` as int64 for fp32 ``e`` in ``[0, 1]`` (the scaling is exact in fp32)."""
    return (e.to(torch.float32) * (2.0 ** bits)).to(torch.int64)


def lse_from_mass(m: torch.Tensor, total: torch.Tensor, bits: int) -> torch.Tensor:
    """``m + float32(log(float64(total) * 2^-bits))`` in fp32: the log-sum-exp of a row whose
    largest kept scaled logit is ``m`` and whose fixed-point mass is ``total``."""
    log_z = torch.log(total.to(torch.float64) * (2.0 ** -bits)).to(torch.float32)
    return m.to(torch.float32) + log_z


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``s = logit / T`` in fp32; NaN -> -inf, +-inf stay +-inf (also at T = +inf)."""
    x = logits.to(torch.float32)
    s = x / torch.as_tensor(temperature, dtype=torch.float32)  # a float, or per-row [R, 1]
    s = torch.where(torch.isinf(x), x, s)
    return torch.where(torch.isnan(x), torch.tensor(float("-inf")), s)


def greedy_argmax(logits: torch.Tensor) -> int:
    """argmax of the raw logits: NaN never wins, lowest index on ties, 0 if none is above -inf."""
    x = logits.to(torch.float32)
    x = torch.where(torch.isnan(x), torch.tensor(float("-inf")), x)
    if not (x > float("-inf")).any():
        return 0
    return int(torch.argmax(x))  # the first maximal index


def inf_rule(w: torch.Tensor) -> torch.Tensor:
    """Race weights of a row with ``+inf`` entries: 0 on them, -inf elsewhere (they share
    the mass equally); other rows unchanged."""
    inf = w == float("inf")
    if not inf.any():
        return w
    return torch.where(inf, torch.tensor(0.0), torch.tensor(float("-inf")))


def filter_threshold(s: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> float:
    """The smallest scaled logit kept by min-p, top-k then top-p (``-inf`` = keep all)."""
    vocab = s.numel()
    threshold = float("-inf")
    if min_p_active(min_p):
        threshold = min_p_threshold(float(s.max()), min_p_log(min_p))
    if top_k_active(top_k, vocab):
        threshold = max(threshold, float(torch.topk(s, top_k).values[-1]))
    if top_p_active(top_p):
        kept = s[s >= threshold]
        kept = kept[kept > float("-inf")]
        if kept.numel() > 0 and float(kept.max()) == float("inf"):
            threshold = float("inf")  # the +inf entries hold all the mass: keep just them
        elif kept.numel() > 0:
            m = kept.max()
            e = fixed_mass(torch.exp(kept - m), mass_fraction_bits(vocab))
            values, order = torch.sort(kept, descending=True)
            cum = torch.cumsum(e[order], 0)  # int64: exact, whatever the order of ties
            target = float(torch.tensor(top_p, dtype=torch.float32)) * float(e.sum())
            hit = torch.nonzero(cum.to(torch.float64) >= target)
            if hit.numel() > 0:
                threshold = max(threshold, float(values[int(hit[0])]))
    return threshold


def filtered_log_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       min_p: float = 0.0) -> torch.Tensor:
    """log softmax(logits / T) restricted to the min-p / top-k / top-p set, fp32, ``-inf`` outside."""
    s = scale_logits(logits, temperature)
    threshold = filter_threshold(s, top_k, top_p, min_p)
    s = torch.where(s >= threshold, s, torch.tensor(float("-inf")))
    if not (s > float("-inf")).any():
        return s
    if float(s.max()) == float("inf"):  # the +inf entries share the mass
        n_inf = torch.tensor(float(int((s == float("inf")).sum())), dtype=torch.float32)
        return torch.where(s == float("inf"), -torch.log(n_inf), torch.tensor(float("-inf")))
    m = s.max()
    total = fixed_mass(torch.exp(s - m), mass_fraction_bits(s.numel())).sum()
    return s - lse_from_mass(m, total, mass_fraction_bits(s.numel()))


def race(log_weights: torch.Tensor, noise: torch.Tensor) -> int:
    """Gumbel race: index of max(log w + G), lowest index on ties, 0 if none is finite."""
    score = log_weights + noise
    score = torch.where(log_weights > float("-inf"), score, torch.tensor(float("-inf")))
    if not (score > float("-inf")).any():
        return 0
    return int(torch.argmax(score))  # torch.argmax returns the first maximal index


def residual_log_weights(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """log max(p - q, 0) computed as log p + log1p(-exp(log q - log p))."""
    neg_inf = torch.tensor(float("-inf"))
    out = log_p + torch.log1p(-torch.exp(log_q - log_p))
    out = torch.where(log_p > log_q, out, neg_inf)
    return torch.where(log_q > float("-inf"), out, log_p)
