"""draft_sample_block in Triton (docs/drafting.md): the same tokens as the reference.

Sampling rule (``reference/draft_sample_block.py``): greedy rows take the argmax of the
fp32 logits ``l``; sampling rows race ``s_v + G_v`` over the top-k / top-p set with
``s = l / T`` (``tl.math.div_rn``) and ``G`` from the draft Philox stream at position
``offset[b] + k``, index ``v``. Four vocabulary entries share one Philox call; a chunk
whose best kept ``s`` plus the largest possible Gumbel value cannot reach the running
best draws no noise (exact pruning). Ties go to the lowest index everywhere, so the
winner does not depend on how the vocabulary is split.

Kernels (no host synchronisation; every grid comes from shapes; CUDA-graph safe):

* ``_race_kernel``, grid ``(row tiles, S)``: program ``(tile, split)`` races one
  vocabulary split of ``BLOCK_R`` rows (and, without the Markov head, writes their fp32
  copy to ``draft_logits``). With ``S > 1`` the splits leave (best score, index)
  partials and the last program of the tile to finish (an atomic counter per tile;
  last-block-done) merges them in split order and writes the tokens: one launch.
* ``_markov_kernel``, grid ``(S,)``, one launch per position ``k``: program ``split``
  owns a contiguous vocabulary range and, for every batch tile of ``BLOCK_B`` requests,
  computes ``l = base[:, k] + w1[x_prev] @ w2`` for its columns with ``tl.dot`` over the
  rank (``w2`` is read once per step for the whole batch: the batch tiles of a program
  reuse its ``w2`` range from cache), writes ``l`` when asked for, races it, and leaves
  per-request partials; the last program to finish (atomic step counter) merges the
  ``S`` partials of every request and writes ``x_k``, which the next launch reads as
  ``x_prev``. ``gamma`` launches in all.
* ``_threshold_kernel``, one program per row: the top-k / top-p threshold of the row
  (sampling.h's rule, found without sorting: an order-preserving integer key of
  ``s`` is fixed ``RADIX_BITS`` bits per pass by counting (top-k) or summing the int64
  fixed-point masses ``trunc(exp(s - max) 2^K)`` (top-p, docs/verification.md#order-independent-sums)
  at 2^RADIX_BITS candidate prefixes).
  Filters need the whole row before the race, so with ``top_k`` / ``top_p`` given:
  without the Markov head, one threshold launch then one race launch; with it, per
  step the Markov launch writes ``l`` (no race), then a threshold and a race launch
  over its ``B`` rows: three launches per step.

Precision: the Markov correction uses ``tl.dot`` with fp32 accumulation (IEEE fp32
inputs when the weights are fp32, no TF32), so logits equal the reference's to fp32
rounding (the summation order over the rank differs); tokens equal the reference's
except where two race scores are that close.

Non-finite input (docs/drafting.md): NaN is -inf (``scale_logit``); a sampling row
with +inf kept entries races only them, with score ``G`` (``_race_tile``'s tier 1).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._filters import (
    _filter_active,
    _min_p_log_at,
    _min_p_threshold,
    min_p_log_tensor,
    scale_logit,
    top_k_threshold,
    top_p_threshold,
)
from .philox import gumbel_from_word, random_words4, split_u64

SALT_DRAFT = tl.constexpr(0x44524654)
_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))
_BIG = tl.constexpr(2147483647)
# Larger than every Gumbel value the contract can produce (the largest is
# -log(-log(1 - 2^-24)) = 16.6355...): a margin for approximate device logarithms.
_GUMBEL_BOUND = tl.constexpr(16.7)


# ----------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------


@triton.jit
def _gumbel_tile(seed_lo, seed_hi, pos_lo, pos_hi, col0, BB: tl.constexpr, BV: tl.constexpr):
    """Draft-stream Gumbel noise of columns ``col0 + [0, BV)`` for ``BB`` rows (``[BB, BV]``).

    ``seed_*`` / ``pos_*`` are ``[BB, 1]`` uint32; ``col0`` is a multiple of 4, so column
    ``col0 + 4i + j`` is word ``j`` of Philox counter ``col0 / 4 + i``.
    """
    ctr = (col0 // 4 + tl.arange(0, BV // 4)).to(tl.uint32)[None, :]
    zero = tl.zeros([BB, BV // 4], tl.uint32)
    salt = tl.full([], SALT_DRAFT, tl.uint32)
    w0, w1, w2, w3 = random_words4(seed_lo + zero, seed_hi + zero, pos_lo + zero, pos_hi + zero, salt, ctr + zero)
    g0 = gumbel_from_word(w0)
    g1 = gumbel_from_word(w1)
    g2 = gumbel_from_word(w2)
    g3 = gumbel_from_word(w3)
    # join appends a minor axis: join(join(a, c), join(b, d)) flattens to a, b, c, d.
    g = tl.join(tl.join(g0, g2), tl.join(g1, g3))
    return tl.reshape(g, [BB, BV])


@triton.jit
def _row_params(temp_ptr, topk_ptr, topp_ptr, b, V, HAS_TEMP: tl.constexpr, HAS_TOPK: tl.constexpr,
                HAS_TOPP: tl.constexpr):
    """(temperature, k, k_on, p, p_on) of request b (scalars)."""
    if HAS_TEMP:
        t = tl.load(temp_ptr + b).to(tl.float32)
    else:
        t = tl.zeros([], tl.float32)
    k, k_on, p, p_on = _filter_active(topk_ptr, topp_ptr, b, V, HAS_TOPK, HAS_TOPP)
    return t, k, k_on, p, p_on


# ----------------------------------------------------------------------------------------
# Top-k / top-p threshold (one program per row)
# ----------------------------------------------------------------------------------------


@triton.jit
def _threshold_kernel(
    x_ptr, sx0, sx1, sx2, temp_ptr, topk_ptr, topp_ptr, thr_ptr, lmp_ptr,
    V, ROWS_PER_B,
    HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr,
    HAS_MINP: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // ROWS_PER_B
    kk = row % ROWS_PER_B
    t, k, k_on, p, p_on = _row_params(temp_ptr, topk_ptr, topp_ptr, b, V, True, HAS_TOPK, HAS_TOPP)
    lmp = _min_p_log_at(lmp_ptr, b, HAS_MINP)
    thr = tl.full([], _NEG_INF, tl.float32)  # keep all
    if (t > 0.0) & (k_on | p_on | (lmp > _NEG_INF)):
        row_ptr = x_ptr + b.to(tl.int64) * sx0 + kk.to(tl.int64) * sx1
        offs = tl.arange(0, BLOCK)
        # Row max of s (always kept by either filter).
        m = tl.full([], _NEG_INF, tl.float32)
        for c0 in range(0, V, BLOCK):
            cols = c0 + offs
            mask = cols < V
            x = tl.load(row_ptr + cols.to(tl.int64) * sx2, mask=mask, other=_NEG_INF).to(tl.float32)
            s = tl.where(mask, scale_logit(x, t), _NEG_INF)
            m = tl.maximum(m, tl.max(tl.where(s == s, s, _NEG_INF), axis=0))
        safe_m = tl.where(m > _NEG_INF, m, 0.0)
        thr = _min_p_threshold(m, lmp)  # min-p first (vLLM's order), -inf when off
        if k_on:
            thr = tl.maximum(thr, top_k_threshold(row_ptr, sx2, V, t, k, BLOCK, RADIX_BITS))
        if p_on:
            thr = top_p_threshold(row_ptr, sx2, V, t, thr, safe_m, p, BLOCK, RADIX_BITS)
    tl.store(thr_ptr + row, thr)


# ----------------------------------------------------------------------------------------
# The race over a tile of rows (shared by both kernels)
# ----------------------------------------------------------------------------------------


@triton.jit
def _race_tile(lg, valid, greedy, t_safe, thr, seed_lo, seed_hi, pos_lo, pos_hi, cols, col0, best, best_idx,
               BB: tl.constexpr, BV: tl.constexpr):
    """Fold one ``[BB, BV]`` chunk of fp32 logits ``lg`` into the running (best, index) per row.

    The +inf rule: a sampling row's +inf entries race alone with weight 0 (score ``G``).
    Once a row has seen one, its state is "tier 1": ``best_idx = -2 - index`` and
    ``best`` the best ``G`` of its +inf entries; finite entries no longer compete."""
    s = tl.where(greedy[:, None], lg, scale_logit(lg, t_safe[:, None]))
    w = tl.where(valid & (s >= thr[:, None]) & (s > _NEG_INF), s, _NEG_INF)  # NaN never races
    wmax = tl.max(w, axis=1)
    tier1 = best_idx <= -2
    winf = (~greedy)[:, None] & (w == _POS_INF)
    any_inf = tl.max(winf.to(tl.int32), axis=1) > 0
    need = (~greedy) & (((wmax + _GUMBEL_BOUND >= best) & ~tier1) | any_inf)
    if tl.max(need.to(tl.int32), axis=0) > 0:
        g = _gumbel_tile(seed_lo[:, None], seed_hi[:, None], pos_lo[:, None], pos_hi[:, None], col0, BB, BV)
        sc = tl.where(greedy[:, None], w, w + g)
        sc1 = tl.where(winf, g, _NEG_INF)
    else:  # no sampling row of the tile can reach its running best here: no noise needed
        sc = tl.where(greedy[:, None], w, _NEG_INF)
        sc1 = tl.full([BB, BV], _NEG_INF, tl.float32)
    sc = tl.where(w > _NEG_INF, sc, _NEG_INF)
    cmax = tl.max(sc, axis=1)
    cidx = tl.min(tl.where((sc == cmax[:, None]) & (sc > _NEG_INF), cols[None, :], _BIG), axis=1)
    c1max = tl.max(sc1, axis=1)
    c1idx = tl.min(tl.where((sc1 == c1max[:, None]) & winf, cols[None, :], _BIG), axis=1)
    # chunks come in increasing column order: ties keep the lower index
    upd = (~tier1) & (~any_inf) & (cmax > best)
    upd1 = any_inf & (~tier1 | (c1max > best))
    best = tl.where(upd1, c1max, tl.where(upd, cmax, best))
    best_idx = tl.where(upd1, -2 - c1idx, tl.where(upd, cidx, best_idx))
    return best, best_idx


@triton.jit
def _merge_partials(pv_ptr, pi_ptr, rows64, rmask, S, S_BLOCK: tl.constexpr):
    """Token per row from its S split partials: the largest score, the lowest index on ties."""
    sp = tl.arange(0, S_BLOCK)
    m2 = rmask[:, None] & (sp < S)[None, :]
    vals = tl.load(pv_ptr + rows64[:, None] * S + sp[None, :], mask=m2, other=_NEG_INF, volatile=True)
    idxs = tl.load(pi_ptr + rows64[:, None] * S + sp[None, :], mask=m2, other=-1, volatile=True)
    ok = m2 & (idxs >= 0)
    vmax = tl.max(tl.where(ok, vals, _NEG_INF), axis=1)
    tok = tl.min(tl.where(ok & (vals == vmax[:, None]), idxs, _BIG), axis=1)
    # Tier-1 partials (a +inf entry, index -2 - v, score G) beat every finite one.
    ok1 = m2 & (idxs <= -2)
    v1max = tl.max(tl.where(ok1, vals, _NEG_INF), axis=1)
    tok1 = tl.min(tl.where(ok1 & (vals == v1max[:, None]), -2 - idxs, _BIG), axis=1)
    tok = tl.where(tl.max(ok1.to(tl.int32), axis=1) > 0, tok1, tok)
    return tl.where(tok == _BIG, 0, tok)


@triton.jit
def _race_kernel(
    x_ptr, sx0, sx1, sx2, logits_out_ptr, tokens_ptr,
    temp_ptr, thr_ptr, seed_ptr, offset_ptr, pv_ptr, pi_ptr, cnt_ptr,
    NUM_ROWS, V, GAMMA, ROWS_PER_B, k0, S, chunks_per_split,
    HAS_TEMP: tl.constexpr, HAS_FILTER: tl.constexpr, WRITE_LOGITS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_R: tl.constexpr, BV: tl.constexpr, S_BLOCK: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < NUM_ROWS
    rows64 = rows.to(tl.int64)
    b = rows64 // ROWS_PER_B
    kk = rows64 % ROWS_PER_B
    k = k0 + kk
    if HAS_TEMP:
        t = tl.load(temp_ptr + b, mask=rm, other=0.0).to(tl.float32)
    else:
        t = tl.zeros([BLOCK_R], tl.float32)
    greedy = ~(t > 0.0)
    t_safe = tl.where(greedy, 1.0, t)
    if HAS_FILTER:
        thr = tl.load(thr_ptr + rows64, mask=rm, other=_NEG_INF)
    else:
        thr = tl.full([BLOCK_R], _NEG_INF, tl.float32)
    seed_lo, seed_hi = split_u64(tl.load(seed_ptr + b, mask=rm, other=0))
    pos_lo, pos_hi = split_u64(tl.load(offset_ptr + b, mask=rm, other=0).to(tl.int64) + k)
    row_off = b * sx0 + kk * sx1
    out_off = (b * GAMMA + k) * V
    best = tl.full([BLOCK_R], _NEG_INF, tl.float32)
    best_idx = tl.full([BLOCK_R], -1, tl.int32)
    c_begin = split * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, tl.cdiv(V, BV))
    for c in range(c_begin, c_end):
        cols = c * BV + tl.arange(0, BV)
        valid = rm[:, None] & (cols < V)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + cols.to(tl.int64)[None, :] * sx2, mask=valid,
                    other=_NEG_INF).to(tl.float32)
        if WRITE_LOGITS:
            tl.store(logits_out_ptr + out_off[:, None] + cols[None, :], x, mask=valid)
        best, best_idx = _race_tile(x, valid, greedy, t_safe, thr, seed_lo, seed_hi, pos_lo, pos_hi, cols, c * BV,
                                    best, best_idx, BLOCK_R, BV)
    tok_off = b * GAMMA + k
    if SPLIT:
        part = rows64 * S + split
        tl.store(pv_ptr + part, best, mask=rm)
        tl.store(pi_ptr + part, best_idx, mask=rm)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + tile, 1)  # acq_rel: the partials above are released
        if done == S - 1:  # the last split of this row tile: merge in split order
            tl.store(tokens_ptr + tok_off, _merge_partials(pv_ptr, pi_ptr, rows64, rm, S, S_BLOCK), mask=rm)
    else:
        tok = tl.where(best_idx >= 0, best_idx, tl.where(best_idx <= -2, -2 - best_idx, 0))  # tier 1: -2 - v
        tl.store(tokens_ptr + tok_off, tok, mask=rm)


# ----------------------------------------------------------------------------------------
# One Markov step: the corrected logits of every request, raced, one launch
# ----------------------------------------------------------------------------------------


@triton.jit
def _markov_kernel(
    base_ptr, sb0, sb1, sb2, w1_ptr, s10, s11, w2_ptr, s20, s21,
    anchor_ptr, tokens_ptr, logits_ptr, sl0, sl1,
    temp_ptr, seed_ptr, offset_ptr, pv_ptr, pi_ptr, cnt_ptr,
    B, V, RANK, GAMMA, k, S, chunks_per_split,
    HAS_TEMP: tl.constexpr, WRITE_LOGITS: tl.constexpr, DO_RACE: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BV: tl.constexpr, BLOCK_K: tl.constexpr, S_BLOCK: tl.constexpr,
):
    split = tl.program_id(0)
    c_begin = split * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, tl.cdiv(V, BV))
    first = k == 0
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        bm = bs < B
        bs64 = bs.to(tl.int64)
        # masks combine the scalar `first` with tl.where, not `&` (see triton/__init__.py)
        prev_a = tl.load(anchor_ptr + bs64, mask=tl.where(first, bm, False), other=0).to(tl.int64)
        prev_t = tl.load(tokens_ptr + bs64 * GAMMA + (k - 1), mask=tl.where(first, False, bm), other=0).to(tl.int64)
        prev = tl.where(first, prev_a, prev_t)
        prev_ok = bm & (prev >= 0) & (prev < V)  # an out-of-range id reads nothing: no correction
        if HAS_TEMP:
            t = tl.load(temp_ptr + bs64, mask=bm, other=0.0).to(tl.float32)
        else:
            t = tl.zeros([BLOCK_B], tl.float32)
        greedy = ~(t > 0.0)
        t_safe = tl.where(greedy, 1.0, t)
        seed_lo, seed_hi = split_u64(tl.load(seed_ptr + bs64, mask=bm, other=0))
        pos_lo, pos_hi = split_u64(tl.load(offset_ptr + bs64, mask=bm, other=0).to(tl.int64) + k)
        no_thr = tl.full([BLOCK_B], _NEG_INF, tl.float32)
        best = tl.full([BLOCK_B], _NEG_INF, tl.float32)
        best_idx = tl.full([BLOCK_B], -1, tl.int32)
        for c in range(c_begin, c_end):
            cols = c * BV + tl.arange(0, BV)
            cm = cols < V
            cols64 = cols.to(tl.int64)
            acc = tl.zeros([BLOCK_B, BV], tl.float32)
            for r0 in range(0, RANK, BLOCK_K):
                rr = r0 + tl.arange(0, BLOCK_K)
                rm = rr < RANK
                h = tl.load(w1_ptr + prev[:, None] * s10 + rr[None, :].to(tl.int64) * s11,
                            mask=prev_ok[:, None] & rm[None, :], other=0.0)
                w = tl.load(w2_ptr + rr[:, None].to(tl.int64) * s20 + cols64[None, :] * s21,
                            mask=rm[:, None] & cm[None, :], other=0.0)
                if DOT_IEEE:
                    acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(h, w, acc)
            valid = bm[:, None] & cm[None, :]
            x = tl.load(base_ptr + bs64[:, None] * sb0 + k * sb1 + cols64[None, :] * sb2, mask=valid,
                        other=0.0).to(tl.float32)
            lg = x + acc
            if WRITE_LOGITS:
                tl.store(logits_ptr + bs64[:, None] * sl0 + k * sl1 + cols64[None, :], lg, mask=valid)
            if DO_RACE:
                best, best_idx = _race_tile(lg, valid, greedy, t_safe, no_thr, seed_lo, seed_hi, pos_lo, pos_hi,
                                            cols, c * BV, best, best_idx, BLOCK_B, BV)
        if DO_RACE:
            part = bs64 * S + split
            tl.store(pv_ptr + part, best, mask=bm)
            tl.store(pi_ptr + part, best_idx, mask=bm)
    if DO_RACE:
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + k, 1)  # acq_rel: the partials above are released
        if done == S - 1:  # the last program of this step: merge every request's partials
            for b0 in range(0, B, BLOCK_B):
                bs = b0 + tl.arange(0, BLOCK_B)
                bm = bs < B
                bs64 = bs.to(tl.int64)
                tok = _merge_partials(pv_ptr, pi_ptr, bs64, bm, S, S_BLOCK)
                tl.store(tokens_ptr + bs64 * GAMMA + k, tok, mask=bm)


# ----------------------------------------------------------------------------------------
# Host wrapper
# ----------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _race_rows(x, strides, rows_per_b, k0, num_rows, gamma, vocab, tokens, logits_out, temp, thr, seed, offset,
               splits, block_r, block_v, warps):
    device = x.device
    chunks = triton.cdiv(vocab, block_v)
    splits = max(1, min(splits, chunks))
    cps = triton.cdiv(chunks, splits)
    splits = triton.cdiv(chunks, cps)
    tiles = triton.cdiv(num_rows, block_r)
    dummy_f = tokens.new_empty(1, dtype=torch.float32)
    if splits > 1:
        pv = torch.empty(tiles * block_r * splits, dtype=torch.float32, device=device)
        pi = torch.empty(tiles * block_r * splits, dtype=torch.int32, device=device)
        cnt = torch.zeros(tiles, dtype=torch.int32, device=device)
    else:
        pv, pi, cnt = dummy_f, tokens, tokens
    _race_kernel[(tiles, splits)](
        x, strides[0], strides[1], strides[2], logits_out if logits_out is not None else dummy_f, tokens,
        temp if temp is not None else dummy_f, thr if thr is not None else dummy_f, seed, offset, pv, pi, cnt,
        num_rows, vocab, gamma, rows_per_b, k0, splits, cps,
        HAS_TEMP=temp is not None, HAS_FILTER=thr is not None, WRITE_LOGITS=logits_out is not None,
        SPLIT=splits > 1, BLOCK_R=block_r, BV=block_v, S_BLOCK=triton.next_power_of_2(splits), num_warps=warps)


def _race_config(rows, vocab, interp, sms, splits=None, block_v=None):
    """(splits, rows per tile, chunk width) of a race over ``rows`` rows."""
    if interp:  # few, large numpy steps
        block_r = min(16, max(2, triton.next_power_of_2(rows)))
        block_v = block_v or min(1024, triton.next_power_of_2(vocab))
        splits = splits or 2
    else:
        block_r = min(4, max(2, triton.next_power_of_2(rows)))  # no register spills on sm_90 (AOT check)
        block_v = block_v or 512
        splits = splits or max(1, triton.cdiv(2 * sms, triton.cdiv(rows, block_r)))
    return splits, block_r, max(block_v, 16)


def _thresholds(x, strides, rows_per_b, num_rows, vocab, temp, top_k, top_p, interp, log_min_p=None):
    thr = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    block = min(1024 if interp else 256, triton.next_power_of_2(vocab))
    _threshold_kernel[(num_rows,)](
        x, strides[0], strides[1], strides[2], temp, top_k if top_k is not None else thr,
        top_p if top_p is not None else thr, thr, log_min_p if log_min_p is not None else thr, vocab, rows_per_b,
        HAS_TOPK=top_k is not None, HAS_TOPP=top_p is not None, HAS_MINP=log_min_p is not None,
        BLOCK=max(block, 16),
        RADIX_BITS=8 if interp else 4, num_warps=1 if interp else 8)
    return thr


def draft_sample_block(
    base_logits: torch.Tensor,
    anchor: torch.Tensor,
    markov_w1: torch.Tensor | None = None,
    markov_w2: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    return_logits: bool = True,
    min_p: torch.Tensor | None = None,
    *,
    _splits: int | None = None,
    _block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``dspark_kernels.draft_sample_block`` (arguments already validated).

    ``base_logits [B, gamma, V]`` fp32 / fp16 / bf16 with any strides; Markov weights
    ``[V, r]`` / ``[r, V]`` of one float dtype, any strides; per-request tensors ``[B]``.
    Returns ``draft_tokens [B, gamma]`` int32 and ``draft_logits [B, gamma, V]`` fp32
    (``[0]`` when ``return_logits`` is False). ``_splits`` / ``_block_v`` (tests) fix the
    number of vocabulary splits and the chunk width.
    """
    device = base_logits.device
    batch, gamma, vocab = base_logits.shape
    tokens = torch.empty((batch, gamma), dtype=torch.int32, device=device)
    logits = torch.empty((batch, gamma, vocab) if return_logits else (0,), dtype=torch.float32, device=device)
    if batch == 0 or gamma == 0:
        return tokens, logits
    interp = _interpreting()
    temp = temperature.to(torch.float32) if temperature is not None else None
    top_p_f = top_p.to(torch.float32) if top_p is not None else None
    seed = seed.to(torch.int64)
    offset = offset.to(torch.int64)
    lmp = min_p_log_tensor(min_p) if min_p is not None else None
    has_filter = temp is not None and (top_k is not None or top_p is not None or lmp is not None)
    warps = 1 if interp else 4
    sms = _num_sms(device)

    if markov_w1 is None:
        rows = batch * gamma
        splits, block_r, block_v = _race_config(rows, vocab, interp, sms, _splits, _block_v)
        strides = base_logits.stride()
        thr = _thresholds(base_logits, strides, gamma, rows, vocab, temp, top_k, top_p_f, interp, lmp) if has_filter \
            else None
        _race_rows(base_logits, strides, gamma, 0, rows, gamma, vocab, tokens, logits if return_logits else None,
                   temp, thr, seed, offset, splits, block_r, block_v, warps)
        return tokens, logits

    rank = markov_w1.shape[1]
    # GPU tiles: 16 requests x 128 columns, rank in steps of 64, 8 warps: no register
    # spills on sm_90 for bf16 and fp32 weights (python_tests/aot_compile_drafting.py).
    block_v = _block_v or (64 if interp else 128)
    block_k = 32 if interp else 64
    block_b = 16
    chunks = triton.cdiv(vocab, block_v)
    splits = _splits or (2 if interp else 2 * sms)
    splits = max(1, min(splits, chunks))
    cps = triton.cdiv(chunks, splits)
    splits = triton.cdiv(chunks, cps)
    dot_ieee = markov_w1.dtype == torch.float32
    # Logits of the step go to the output when returned, else to a [B, V] workspace
    # (only needed with filters: without them the race is fused).
    if return_logits:
        buf, sl0, sl1 = logits, gamma * vocab, vocab
    elif has_filter:
        buf = torch.empty((batch, vocab), dtype=torch.float32, device=device)
        sl0, sl1 = vocab, 0
    else:
        buf, sl0, sl1 = logits, 0, 0
    pv = torch.empty(batch * splits, dtype=torch.float32, device=device)
    pi = torch.empty(batch * splits, dtype=torch.int32, device=device)
    cnt = torch.zeros(gamma, dtype=torch.int32, device=device)
    dummy_f = pv
    for k in range(gamma):
        _markov_kernel[(splits,)](
            base_logits, *base_logits.stride(), markov_w1, *markov_w1.stride(), markov_w2, *markov_w2.stride(),
            anchor, tokens, buf, sl0, sl1,
            temp if temp is not None else dummy_f, seed, offset, pv, pi, cnt,
            batch, vocab, rank, gamma, k, splits, cps,
            HAS_TEMP=temp is not None, WRITE_LOGITS=return_logits or has_filter, DO_RACE=not has_filter,
            DOT_IEEE=dot_ieee, BLOCK_B=block_b, BV=block_v, BLOCK_K=block_k,
            S_BLOCK=triton.next_power_of_2(splits), num_warps=1 if interp else 8)
        if has_filter:
            step = buf[:, k : k + 1] if return_logits else buf[:, None, :]  # [B, 1, V]: this step's rows
            strides = step.stride()
            thr = _thresholds(step, strides, 1, batch, vocab, temp, top_k, top_p_f, interp, lmp)
            _race_rows(step, strides, 1, k, batch, gamma, vocab, tokens, None, temp, thr, seed, offset,
                       *_race_config(batch, vocab, interp, sms, _splits, _block_v), warps)
    return tokens, logits
