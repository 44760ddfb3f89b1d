"""Row statistics of vocabulary-sharded logits: the single-rank rules, decomposed.

Every rank holds columns ``[vocab_start, vocab_start + C)`` of the same rows. The
rules of ``reference/sampling.py`` need, per row, only quantities that combine
exactly across shards:

* the largest scaled logit ``m`` and the greedy argmax (value, lowest global index):
  max and lexicographic min are exact in any order;
* top-k / top-p thresholds: "the largest key t whose weight at or above t reaches a
  target", found by a 4-round radix select over the order-preserving 32-bit key of
  ``s``, each round one all-reduce of a ``[rows, 256]`` int64 histogram (counts for
  top-k, fixed-point masses for top-p) — no sort, no gather of the row, the same
  answer as the single-rank sort for any split;
* the fixed-point mass ``Z = sum_v trunc(exp(s_v - m) * 2^K)``: int64, so the sum
  of the shards' sums is the single-rank sum, bit for bit;
* a Gumbel race: each shard's winner (score, global index), the noise of entry
  ``v`` drawn at its global index ``v``; the best score wins, the lowest index on ties.

All of it is elementwise PyTorch on the shard's device (the reference's own
expressions, vectorised over rows), so on CPU shards the results are the reference's
bits; no value is read back to the host.
"""

from __future__ import annotations

import torch

from ..reference import philox
from ..reference.sampling import fixed_mass, lse_from_mass, mass_fraction_bits, scale_logits

NEG_INF = float("-inf")
POS_INF = float("inf")
RADIX_BITS = 8
RADIX = 1 << RADIX_BITS


def scale_rows(x: torch.Tensor, temperature: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``sampling.scale_logits`` with a per-row temperature; padded columns -> -inf."""
    return torch.where(valid, scale_logits(x, temperature.to(torch.float32).unsqueeze(1)), NEG_INF)


def raw_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Raw fp32 logits for the greedy argmax: NaN and padded columns -> -inf."""
    x = x.to(torch.float32)
    return torch.where(valid & ~torch.isnan(x), x, NEG_INF)


def order_key(s: torch.Tensor) -> torch.Tensor:
    """Order-preserving key of fp32 values as int64 in ``[0, 2^32)`` (-0 folded onto +0)."""
    bits = s.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = torch.where(bits == 0x80000000, 0, bits)
    return torch.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def key_to_float(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key >= 0x80000000, key & 0x7FFFFFFF, key ^ 0xFFFFFFFF)
    return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)  # uint32 -> int32 bits


def float_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 values as their int32 bit patterns widened to int64 (exact through a sum with zeros)."""
    return x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)


def bits_float(b: torch.Tensor) -> torch.Tensor:
    return b.to(torch.int32).view(torch.float32)


def local_argmax(x: torch.Tensor, vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, global index) of each row's first maximum; (-inf, -1) for a row with none."""
    if x.shape[1] == 0:
        return (torch.full((x.shape[0],), NEG_INF, device=x.device),
                torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device))
    value, index = torch.max(x, dim=1)  # the first maximal index, as torch.argmax
    index = torch.where(value > NEG_INF, index + vocab_start, -1)
    return value, index


def merge_argmax(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-rank ``[P, R]`` winners: the best value, the lowest global index among
    ranks holding it (ranks own increasing index ranges); index -1 where no value is finite."""
    best = values.amax(0)
    hit = (values == best.unsqueeze(0)) & (indices >= 0)
    idx = torch.where(hit, indices, torch.iinfo(torch.int64).max).amin(0)
    found = best > NEG_INF
    return best, torch.where(found, idx, -1)


def radix_largest_key(comm, keys: torch.Tensor, weights: torch.Tensor, target: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the largest key ``t`` with ``float64(W(>= t)) >= target`` and ``W(>= t)``,
    ``W`` the int64 weights summed over every shard (4 all-reduces of ``[R, 256]``).

    ``W(>= t)`` changes only at keys of positive weight, so the answer is such a key: the
    value the single-rank rule (sort descending, first cumulative weight reaching the
    target) returns. Rows whose total is below the target get key 0 (callers mask them)."""
    rows = keys.shape[0]
    prefix = torch.zeros(rows, dtype=torch.int64, device=keys.device)
    above = torch.zeros(rows, dtype=torch.int64, device=keys.device)
    target = target.to(torch.float64).unsqueeze(1)
    mass = above
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        cand = (keys >> (shift + RADIX_BITS)) == prefix.unsqueeze(1)
        digit = (keys >> shift) & (RADIX - 1)
        hist = torch.zeros(rows, RADIX, dtype=torch.int64, device=keys.device)
        hist.scatter_add_(1, digit, torch.where(cand, weights, 0))
        hist = comm.all_reduce(hist, "sum")
        suffix = hist.flip(1).cumsum(1).flip(1)  # suffix[d] = weight of digits >= d
        ok = (above.unsqueeze(1) + suffix).to(torch.float64) >= target
        d = (ok.sum(1) - 1).clamp(min=0)  # ok holds for d <= d*: suffix is non-increasing
        at = suffix.gather(1, d.unsqueeze(1)).squeeze(1)
        mass = above + at
        above = above + at - hist.gather(1, d.unsqueeze(1)).squeeze(1)
        prefix = (prefix << RADIX_BITS) | d
    return prefix, mass


def min_p_cut(m: torch.Tensor, log_min_p: torch.Tensor) -> torch.Tensor:
    """``sampling.min_p_threshold`` per row: ``m + log(min_p)`` in fp32, -inf when off."""
    on = (log_min_p > NEG_INF) & (m > NEG_INF)
    return torch.where(on, m + torch.where(on, log_min_p, 0.0), NEG_INF)


class RowDistribution:
    """The filtered softmax of sharded rows: keep ``s >= threshold``,
    ``log p(v) = s_v - lse`` (``-lse`` on the +inf entries of a +inf row)."""

    def __init__(self, s: torch.Tensor, threshold: torch.Tensor, lse: torch.Tensor):
        self.s, self.threshold, self.lse = s, threshold, lse

    def log_prob(self, s: torch.Tensor, threshold: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        kept = (s >= threshold) & (s > NEG_INF)
        value = torch.where(threshold == POS_INF, -lse, s - lse)
        return torch.where(kept, value, NEG_INF)

    def row_log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        """``[len(rows), C]`` log p of the given rows on this shard."""
        return self.log_prob(self.s[rows], self.threshold[rows].unsqueeze(1), self.lse[rows].unsqueeze(1))


def _selected_rows(active: torch.Tensor) -> torch.Tensor | None:
    """The rows a filter is active on, read on the host for CPU tensors (the radix rounds
    then skip the others, and run not at all when none is active); None (every row, no
    host read) on a GPU. ``active`` derives from replicated or all-reduced values, so every
    rank takes the same branch and issues the same collectives."""
    return torch.nonzero(active).flatten() if active.device.type == "cpu" else None


def row_distribution(comm, s: torch.Tensor, valid: torch.Tensor, m: torch.Tensor, vocab_size: int,
                     top_k: torch.Tensor | None, top_p: torch.Tensor | None, log_min_p: torch.Tensor | None,
                     extra: torch.Tensor | None = None) -> tuple[RowDistribution, torch.Tensor | None]:
    """Thresholds and log-sum-exp of scaled rows ``s`` (global max ``m``), as
    ``sampling.filtered_log_probs`` on the gathered rows. ``extra`` (1-D int64) rides
    along the mass all-reduce and is returned summed over the ranks."""
    rows = s.shape[0]
    dev = s.device
    bits = mass_fraction_bits(vocab_size)
    finite = (m > NEG_INF) & (m < POS_INF)
    threshold = torch.full((rows,), NEG_INF, device=dev)
    if log_min_p is not None:
        threshold = torch.maximum(threshold, min_p_cut(m, log_min_p))
    keys = order_key(s) if (top_k is not None or top_p is not None) else None
    if top_k is not None:
        active = (top_k > 0) & (top_k < vocab_size)
        rows_k = _selected_rows(active)
        if rows_k is None or rows_k.numel() > 0:
            pick = slice(None) if rows_k is None else rows_k
            key, _ = radix_largest_key(comm, keys[pick], valid.to(torch.int64).expand(rows, -1)[pick],
                                       torch.where(active, top_k, 0).to(torch.float64)[pick])
            cut = torch.full((rows,), NEG_INF, device=dev)
            cut[pick] = key_to_float(key)
            threshold = torch.where(active, torch.maximum(threshold, cut), threshold)
    kept = (s >= threshold.unsqueeze(1)) & (s > NEG_INF)
    safe_m = torch.where(finite, m, 0.0).unsqueeze(1)
    e = fixed_mass(torch.exp(torch.where(kept & finite.unsqueeze(1), s - safe_m, NEG_INF)), bits)
    local = torch.cat([e.sum(1), ((s == POS_INF) & valid).sum(1)])
    if extra is not None:
        local = torch.cat([local, extra])
    local = comm.all_reduce(local, "sum")
    total, n_inf = local[:rows], local[rows:2 * rows]
    if top_p is not None:
        active = (top_p > 0) & (top_p < 1) & finite & (total > 0)
        target = top_p.to(torch.float32).to(torch.float64) * total.to(torch.float64)
        rows_p = _selected_rows(active)
        if rows_p is None or rows_p.numel() > 0:
            pick = slice(None) if rows_p is None else rows_p
            key, mass = radix_largest_key(comm, keys[pick], e[pick], torch.where(active, target, 0.0)[pick])
            cut = torch.full((rows,), NEG_INF, device=dev)
            cut[pick] = key_to_float(key)
            at = total.clone()
            at[pick] = mass
            threshold = torch.where(active, torch.maximum(threshold, cut), threshold)
            total = torch.where(active, at, total)
    lse = torch.where(finite, lse_from_mass(torch.where(finite, m, 0.0), total, bits), NEG_INF)
    inf_row = m == POS_INF
    threshold = torch.where(inf_row, POS_INF, threshold)
    lse = torch.where(inf_row, torch.log(n_inf.to(torch.float32)), lse)
    return RowDistribution(s, threshold, lse), (local[2 * rows:] if extra is not None else None)


def gumbel_noise(seed: torch.Tensor, position: torch.Tensor, salt: int, columns: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` Gumbel noise of the randomness contract at global vocabulary indices."""
    from ..randomness import random_words

    shape = (seed.shape[0], columns.shape[0])
    if shape[0] == 0 or shape[1] == 0:
        return torch.empty(shape, dtype=torch.float32, device=columns.device)
    words = random_words(seed.unsqueeze(1).expand(shape).contiguous(), position.unsqueeze(1).expand(shape).contiguous(),
                         columns.unsqueeze(0).expand(shape).contiguous(), salt)
    return philox.gumbels_from_words(words)


def race_scores(log_weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``sampling.race``'s scores: ``log w + G`` where ``log w > -inf``, else -inf."""
    return torch.where(log_weights > NEG_INF, log_weights + noise, NEG_INF)


def gather_winners(comm, candidates: list[torch.Tensor], vocab_start: int) -> list[torch.Tensor]:
    """Each ``[R, C]`` score tensor's global winner (index; -1 where no score is finite),
    with one all-gather for all of them."""
    packed = []
    for sc in candidates:
        value, index = local_argmax(sc, vocab_start)
        packed += [float_bits(value), index]
    if not packed:
        return []
    gathered = comm.all_gather(torch.stack(packed, 1))  # [P, R, 2k]
    out = []
    for j in range(len(candidates)):
        _, idx = merge_argmax(bits_float(gathered[:, :, 2 * j]), gathered[:, :, 2 * j + 1])
        out.append(idx)
    return out
