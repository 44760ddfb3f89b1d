"""verify_block in Triton (docs/verification.md): the same integer results as the reference.

Four kernels, no host synchronisation (every grid size comes from shapes):

1. ``_row_stats_kernel``, grid ``(B * W, S)`` with ``W = max_num_draft + 1`` and S
   vocabulary splits, run once over the target rows and once over the draft rows
   (when ``draft_logits`` is given). Program ``(b * W + i, split)`` reads one split
   of row ``i`` of request ``b`` and writes to a workspace: for greedy requests the
   maximum of the raw logits and its lowest index; for sampling requests the maximum
   of the scaled logits ``s = logit / T`` (an IEEE division, ``tl.math.div_rn``).
   Programs with ``i > n_b`` return at once.
1b. ``_row_mass_kernel``, the same grid, sampling rows only: the split's int64
   fixed-point mass ``sum trunc(exp(s - m) 2^K)`` with ``m`` the row max merged from
   the splits' maxima (docs/verification.md, "Order-independent sums"; the count of
   +inf entries for a row whose max is +inf). Integer sums, so the row's mass does
   not depend on the split count or the order of the reduction.
2. ``_filter_kernel`` (only when ``top_k`` or ``top_p`` is given), one program per
   row: for sampling rows whose request has an active filter, the threshold of
   sampling.h without sorting. Scaled logits are mapped to the order-preserving
   integer encoding of fp32; top-k is the largest key ``t`` with
   ``count(key >= t) >= k`` (exact: the k-th largest value, ties kept), top-p the
   largest key with ``mass(kept, key >= t) >= top_p * total`` where masses are the
   int64 fixed-point ``trunc(exp(s - m) 2^K)``. Both searches fix the key 4 bits per pass on the
   GPU (a 16-way bisection, 8 passes over the row; 8 bits and 4 passes in the
   interpreter). A last pass gives the log-sum-exp of the kept tokens (the same
   fixed-point mass). One program
   per row, so this is the slow part for large vocabularies (17 passes over a row
   with top-k and top-p both on).
3. ``_decide_kernel``, one program per request: merges the splits in a fixed order,
   walks the positions (greedy: accept while ``x == argmax``; sampling: the strict
   log-space test with the accept-stream coin at position ``offset + i``), and runs
   one Gumbel race over the vocabulary, in chunks, for the one row that is sampled
   (the first rejection or the bonus row): the residual ``max(p - q, 0)`` and,
   in the same sweep, ``p`` itself (used when the residual has no finite entry, or
   when the draft id is padding / out of range). It writes the whole output row.

Layout: rows may be strided in both dimensions (the row and column strides are
kernel arguments; a column stride of 1 is specialised by Triton), so no input is
copied. Address arithmetic is 64-bit.

Loops keep per-lane accumulators (running max / sum, argmax, race winners,
threshold counts) and reduce them once after the sweep, so no chunk pays a
cross-warp reduction.

Numerics: the decisions that must be exact are: ``s = logit / T`` (``div_rn``, IEEE
on the GPU, where Triton's ``/`` is an approximate division), the greedy argmax and
the top-k threshold (comparisons only), the uniforms (exact) and the Philox words.
exp / log run in fp32 (``tl.exp`` is ``ex2.approx`` on NVIDIA GPUs, ``tl.log``
libdevice's ``__nv_logf``), ``log1p`` of the residual in fp64 (Triton has no
portable log1p that also runs in the interpreter). The log-sums-exp and top-p
masses are exact integer sums (``_filters.fixed_mass`` / ``lse_from_mass``), so they
equal the reference's wherever the fp32 ``exp`` of the two agree (as in the
interpreter's tests); on the GPU ``tl.exp`` rounds differently, and results equal the
reference's except where two candidates are within a few ulps of each other (an
accept coin on the boundary, two race scores, or a top-p mass on its target), which
random inputs do not produce. Non-finite input follows docs/verification.md ("Non-finite input"): NaN is
-inf (``scale_logit``), a row whose max is +inf keeps its +inf entries with
``threshold = +inf`` and ``lse = log(n_inf)`` (``_log_prob`` gives them ``-lse``).

Triton versions: only long-standing ``tl`` APIs (load/store/where/max/min/sum,
umulhi, math.div_rn, bitcast casts, while loops); checked under the 3.4, 3.6, 3.8 and
3.9 interpreters and by compiling every kernel variant for sm_90 with Triton 3.8.
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
    fixed_mass,
    lse_from_mass,
    mass_scales,
    min_p_log_tensor,
    scale_logit,
    top_k_threshold,
    top_p_threshold,
)
from .philox import gumbel_from_word, random_word, random_words4, select_word, split_u64, uniform_from_word

# Globals read inside @triton.jit functions must be constexpr.
SALT_ACCEPT = tl.constexpr(0x41434350)
SALT_RESAMPLE = tl.constexpr(0x52534D50)
_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))

# Kinds of draft distribution (constexpr).
_KIND_POINT = 0
_KIND_LOGITS = 1
_KIND_PROBS = 2


@triton.jit
def _request_n(cu_ptr, b, max_num_draft):
    """(start, n) of request b, n clamped to [0, max_num_draft] (a kernel never trusts cu)."""
    c0 = tl.load(cu_ptr + b).to(tl.int64)
    c1 = tl.load(cu_ptr + b + 1).to(tl.int64)
    n = tl.minimum(tl.maximum(c1 - c0, 0), max_num_draft)
    return c0, n


@triton.jit
def _load_temperature(temp_ptr, b, HAS_TEMP: tl.constexpr):
    if HAS_TEMP:
        t = tl.load(temp_ptr + b).to(tl.float32)
    else:
        t = tl.zeros([], tl.float32)
    return t


@triton.jit
def _q_row(didx_ptr, dpos, num_q_rows, HAS_DIDX: tl.constexpr):
    """The row of draft_logits / draft_probs that is q of draft ``dpos``: draft_index[dpos]
    (clamped into range: never an out-of-bounds read; the range is a data check), else dpos."""
    if HAS_DIDX:
        r = tl.load(didx_ptr + dpos).to(tl.int64)
        r = tl.minimum(tl.maximum(r, 0), num_q_rows - 1)
    else:
        r = dpos
    return r


# ----------------------------------------------------------------------------------------
# 1. Split statistics.
# ----------------------------------------------------------------------------------------


@triton.jit
def _stats_row(cu_ptr, didx_ptr, pid, W, max_num_draft, num_rows, IS_TARGET: tl.constexpr, HAS_DIDX: tl.constexpr):
    """(b, row, live) of statistics program ``pid = b * W + i``: target row ``start + b + i``
    (live for i <= n_b) or the q row of draft ``start + i`` (live for i < n_b), in range."""
    b = pid // W
    i = pid % W
    start, n = _request_n(cu_ptr, b, max_num_draft)
    if IS_TARGET:
        row = start + b + i
        live = i <= n
    else:
        live = i < n
        row = _q_row(didx_ptr, tl.where(live, start + i, 0), num_rows, HAS_DIDX)
    live = live & (row >= 0) & (row < num_rows)
    return b, row, live


@triton.jit
def _row_stats_kernel(
    logits_ptr, stride_row, stride_col, num_rows,
    cu_ptr, temp_ptr, V, W, max_num_draft, S, chunks_per_split,
    ws_max_ptr, ws_arg_ptr, ws_m_ptr, didx_ptr,
    IS_TARGET: tl.constexpr, HAS_TEMP: tl.constexpr, BLOCK: tl.constexpr, HAS_DIDX: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b, row, live = _stats_row(cu_ptr, didx_ptr, pid, W, max_num_draft, num_rows, IS_TARGET, HAS_DIDX)
    t = _load_temperature(temp_ptr, b, HAS_TEMP)
    greedy = not (t > 0.0)
    if live:
        row_ptr = logits_ptr + row * stride_row
        offs = tl.arange(0, BLOCK)
        chunk_begin = split * chunks_per_split
        chunk_end = tl.minimum(chunk_begin + chunks_per_split, (V + BLOCK - 1) // BLOCK)
        ws = pid.to(tl.int64) * S + split
        # Per-lane accumulators, reduced once at the end (no cross-warp reduction per chunk).
        if greedy:
            if IS_TARGET:
                # Max of the raw logits and its lowest index. A lane sees increasing
                # indices, so a strict > keeps the lowest one.
                best = tl.full([BLOCK], _NEG_INF, tl.float32)
                best_idx = tl.full([BLOCK], 2147483647, tl.int32)
                for c in range(chunk_begin, chunk_end):
                    cols = c * BLOCK + offs
                    mask = cols < V
                    x = tl.load(row_ptr + cols.to(tl.int64) * stride_col, mask=mask, other=_NEG_INF).to(tl.float32)
                    upd = x > best
                    best = tl.where(upd, x, best)
                    best_idx = tl.where(upd, cols, best_idx)
                bmax = tl.max(best, axis=0)
                bidx = tl.min(tl.where(best == bmax, best_idx, 2147483647), axis=0)
                tl.store(ws_max_ptr + ws, bmax)
                tl.store(ws_arg_ptr + ws, bidx)
        else:
            # Max of s = logit / T, per lane (the mass needs the row max: _row_mass_kernel).
            m_vec = tl.full([BLOCK], _NEG_INF, tl.float32)
            for c in range(chunk_begin, chunk_end):
                cols = c * BLOCK + offs
                mask = cols < V
                x = tl.load(row_ptr + cols.to(tl.int64) * stride_col, mask=mask, other=_NEG_INF).to(tl.float32)
                m_vec = tl.maximum(m_vec, tl.where(mask, scale_logit(x, t), _NEG_INF))
            tl.store(ws_m_ptr + ws, tl.max(m_vec, axis=0))


@triton.jit
def _split_max(ws_m_ptr, ridx, S, S_BLOCK: tl.constexpr):
    """Max of s over a row, from its S split maxima."""
    sp = tl.arange(0, S_BLOCK)
    ms = tl.load(ws_m_ptr + ridx.to(tl.int64) * S + sp, mask=sp < S, other=_NEG_INF)
    return tl.max(ms, axis=0)


@triton.jit
def _row_mass_kernel(
    logits_ptr, stride_row, stride_col, num_rows,
    cu_ptr, temp_ptr, V, W, max_num_draft, S, chunks_per_split,
    ws_m_ptr, ws_sum_ptr, didx_ptr,
    IS_TARGET: tl.constexpr, HAS_TEMP: tl.constexpr, BLOCK: tl.constexpr, S_BLOCK: tl.constexpr,
    HAS_DIDX: tl.constexpr,
):
    """The split's int64 fixed-point mass of exp(s - m), m the row max (after _row_stats_kernel);
    for a row whose max is +inf, the count of its +inf entries."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b, row, live = _stats_row(cu_ptr, didx_ptr, pid, W, max_num_draft, num_rows, IS_TARGET, HAS_DIDX)
    t = _load_temperature(temp_ptr, b, HAS_TEMP)
    if live & (t > 0.0):
        row_ptr = logits_ptr + row * stride_row
        offs = tl.arange(0, BLOCK)
        chunk_begin = split * chunks_per_split
        chunk_end = tl.minimum(chunk_begin + chunks_per_split, (V + BLOCK - 1) // BLOCK)
        m = _split_max(ws_m_ptr, pid, S, S_BLOCK)
        safe_m = tl.where(m > _NEG_INF, m, 0.0)
        scale, _unscale = mass_scales(V)
        acc = tl.zeros([BLOCK], tl.int64)
        n_inf = tl.zeros([BLOCK], tl.int32)
        for c in range(chunk_begin, chunk_end):
            cols = c * BLOCK + offs
            mask = cols < V
            x = tl.load(row_ptr + cols.to(tl.int64) * stride_col, mask=mask, other=_NEG_INF).to(tl.float32)
            s = tl.where(mask, scale_logit(x, t), _NEG_INF)
            fin = (s > _NEG_INF) & (s < _POS_INF)  # +inf entries are counted apart: never inf - inf
            acc += fixed_mass(tl.where(fin, tl.exp(tl.where(fin, s, 0.0) - safe_m), 0.0), scale)
            n_inf += (s == _POS_INF).to(tl.int32)
        total = tl.where(m == _POS_INF, tl.sum(n_inf, axis=0).to(tl.int64), tl.sum(acc, axis=0))
        tl.store(ws_sum_ptr + pid.to(tl.int64) * S + split, total)


@triton.jit
def _merge_softmax(ws_m_ptr, ws_sum_ptr, ridx, S, V, S_BLOCK: tl.constexpr):
    """(max, log-sum-exp) of a row from its S split maxima and int64 masses (exact in any order)."""
    sp = tl.arange(0, S_BLOCK)
    smask = sp < S
    base = ridx.to(tl.int64) * S
    m = _split_max(ws_m_ptr, ridx, S, S_BLOCK)
    total = tl.sum(tl.load(ws_sum_ptr + base + sp, mask=smask, other=0), axis=0)
    _scale, unscale = mass_scales(V)
    lse = tl.where(m > _NEG_INF, lse_from_mass(tl.where(m > _NEG_INF, m, 0.0), total, unscale), _NEG_INF)
    # A +inf row: lse = log(n_inf), read with threshold +inf (sampling.h row_filter_final).
    lse = tl.where(m == _POS_INF, tl.log(tl.maximum(total, 1).to(tl.float32)), lse)
    return m, lse


@triton.jit
def _merge_argmax(ws_max_ptr, ws_arg_ptr, ridx, S, V, S_BLOCK: tl.constexpr):
    """Lowest index of the row maximum from the S split results (0 if none)."""
    sp = tl.arange(0, S_BLOCK)
    smask = sp < S
    base = ridx.to(tl.int64) * S
    mx = tl.load(ws_max_ptr + base + sp, mask=smask, other=_NEG_INF)
    ix = tl.load(ws_arg_ptr + base + sp, mask=smask, other=2147483647)
    best = tl.max(mx, axis=0)
    idx = tl.min(tl.where(smask & (mx == best), ix, 2147483647), axis=0)
    return tl.where((idx >= 0) & (idx < V), idx, 0).to(tl.int64)


# ----------------------------------------------------------------------------------------
# 2. Top-k / top-p thresholds (exact, no sort).
# ----------------------------------------------------------------------------------------


@triton.jit
def _filter_kernel(
    logits_ptr, stride_row, stride_col, num_rows,
    cu_ptr, temp_ptr, topk_ptr, topp_ptr, V, num_chunks, W, max_num_draft, S,
    ws_m_ptr, thr_ptr, lse_ptr, lmp_ptr, didx_ptr,
    IS_TARGET: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
    BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr,
    S_BLOCK: tl.constexpr, HAS_MINP: tl.constexpr, HAS_DIDX: tl.constexpr,
):
    pid = tl.program_id(0)
    b, row, live = _stats_row(cu_ptr, didx_ptr, pid, W, max_num_draft, num_rows, IS_TARGET, HAS_DIDX)
    t = tl.load(temp_ptr + b).to(tl.float32)
    k, k_on, p, p_on = _filter_active(topk_ptr, topp_ptr, b, V, HAS_TOPK, HAS_TOPP)
    lmp = _min_p_log_at(lmp_ptr, b, HAS_MINP)
    if live & (t > 0.0) & (k_on | p_on | (lmp > _NEG_INF)):
        row_ptr = logits_ptr + row * stride_row
        offs = tl.arange(0, BLOCK)
        # Row max of s (always kept by either filter: the largest kept value) from the splits.
        m = _split_max(ws_m_ptr, pid, S, S_BLOCK)
        safe_m = tl.where(m > _NEG_INF, m, 0.0)

        thr = _min_p_threshold(m, lmp)  # -inf (keep all) when min-p is off
        if k_on:
            thr = tl.maximum(thr, top_k_threshold(row_ptr, stride_col, V, t, k, BLOCK, RADIX_BITS))
        if p_on:
            thr = top_p_threshold(row_ptr, stride_col, V, t, thr, safe_m, p, BLOCK, RADIX_BITS)
        # Log-sum-exp of the kept tokens: their fixed-point mass.
        scale, unscale = mass_scales(V)
        acc = tl.zeros([BLOCK], tl.int64)
        n_inf = tl.zeros([BLOCK], tl.int32)
        for c in range(0, num_chunks):
            cols = c * BLOCK + offs
            mask = cols < V
            x = tl.load(row_ptr + cols.to(tl.int64) * stride_col, mask=mask, other=0.0).to(tl.float32)
            s = scale_logit(x, t)
            kept = mask & (s >= thr) & (s > _NEG_INF)
            fin = kept & (s < _POS_INF)  # +inf entries are counted apart: never inf - inf
            acc += fixed_mass(tl.where(fin, tl.exp(tl.where(fin, s, 0.0) - safe_m), 0.0), scale)
            n_inf += (mask & (s == _POS_INF)).to(tl.int32)
        lse = tl.where(m > _NEG_INF, lse_from_mass(safe_m, tl.sum(acc, axis=0), unscale), _NEG_INF)
        # The +inf rule (sampling.h row_filter_final): keep the +inf entries, lse = log(n_inf).
        thr = tl.where(m == _POS_INF, _POS_INF, thr)
        lse = tl.where(m == _POS_INF, tl.log(tl.maximum(tl.sum(n_inf, axis=0), 1).to(tl.float32)), lse)
        tl.store(thr_ptr + pid, thr)
        tl.store(lse_ptr + pid, lse)


# ----------------------------------------------------------------------------------------
# 3. Decision: accept walk and the one Gumbel race.
# ----------------------------------------------------------------------------------------


@triton.jit
def _row_lse_thr(ws_m_ptr, ws_sum_ptr, thr_ptr, lse_ptr, ridx, S, V, filt_on,
                 HAS_FILTER: tl.constexpr, S_BLOCK: tl.constexpr):
    """(threshold, lse) of a sampling row: filtered ones from _filter_kernel, else merged splits."""
    m, lse = _merge_softmax(ws_m_ptr, ws_sum_ptr, ridx, S, V, S_BLOCK)
    thr = tl.where(m == _POS_INF, _POS_INF, _NEG_INF)  # the +inf rule
    if HAS_FILTER:
        if filt_on:
            thr = tl.load(thr_ptr + ridx)
            lse = tl.load(lse_ptr + ridx)
    return thr, lse


@triton.jit
def _log_prob(s, thr, lse):
    keep = (s >= thr) & (s > _NEG_INF)
    # thr = +inf: a +inf row, whose +inf entries share the mass (log p = -lse = -log n_inf).
    lp = tl.where(thr == _POS_INF, -lse, tl.where(keep, s, 0.0) - tl.where(keep, lse, 0.0))
    return tl.where(keep, lp, _NEG_INF)


@triton.jit
def _log1p_neg(e):
    """log(1 - e) for fp32 e in [0, 1], in fp64 (Goldberg's log1p), rounded to fp32."""
    y = -(e.to(tl.float64))
    u = 1.0 + y
    exact = (u == 1.0) | (u <= 0.0)
    den = tl.where(exact, 1.0, u - 1.0)
    r = tl.where(exact, y, tl.log(tl.where(exact, 1.0, u)) * y / den)
    r = tl.where(u <= 0.0, _NEG_INF, r)
    return r.to(tl.float32)


@triton.jit
def _decide_kernel(
    t_ptr, t_stride_row, t_stride_col, num_target_rows,
    d_ptr, d_stride_row, d_stride_col,
    drafts_ptr, num_drafts, cu_ptr, temp_ptr, topk_ptr, topp_ptr, seed_ptr, offset_ptr,
    V, W, max_num_draft, S,
    t_ws_max_ptr, t_ws_arg_ptr, t_ws_m_ptr, t_ws_sum_ptr, t_thr_ptr, t_lse_ptr,
    d_ws_m_ptr, d_ws_sum_ptr, d_thr_ptr, d_lse_ptr,
    out_ptr, num_acc_ptr, lmp_ptr, didx_ptr, num_q_rows,
    KIND: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
    HAS_FILTER: tl.constexpr, S_BLOCK: tl.constexpr, BLOCK4: tl.constexpr, BLOCK_W: tl.constexpr,
    HAS_MINP: tl.constexpr, HAS_DIDX: tl.constexpr,
):
    b = tl.program_id(0)
    start, n = _request_n(cu_ptr, b, max_num_draft)
    t = _load_temperature(temp_ptr, b, HAS_TEMP)
    greedy = not (t > 0.0)
    k, k_on, p, p_on = _filter_active(topk_ptr, topp_ptr, b, V, HAS_TOPK, HAS_TOPP)
    filt_on = k_on | p_on | (_min_p_log_at(lmp_ptr, b, HAS_MINP) > _NEG_INF)
    seed_lo, seed_hi = split_u64(tl.load(seed_ptr + b))
    offset = tl.load(offset_ptr + b).to(tl.int64)
    salt_accept = tl.full([], SALT_ACCEPT, tl.uint32)
    salt_resample = tl.full([], SALT_RESAMPLE, tl.uint32)
    zero_u32 = tl.zeros([], tl.uint32)

    # ---- the accept walk: stops at the first rejection (row = i) or after n (row = n)
    i = tl.zeros([], tl.int64)
    done = tl.zeros([], tl.int32)
    while (i < n) & (done == 0):
        ridx = b.to(tl.int64) * W + i
        trow = start + b + i
        dpos = start + i
        x = tl.load(drafts_ptr + dpos, mask=dpos < num_drafts, other=-1).to(tl.int64)
        valid = (x >= 0) & (x < V) & (trow < num_target_rows)
        qrow = _q_row(didx_ptr, tl.where(dpos < num_drafts, dpos, 0), num_q_rows, HAS_DIDX)
        xs = tl.where(valid, x, 0)
        if greedy:
            am = _merge_argmax(t_ws_max_ptr, t_ws_arg_ptr, ridx, S, V, S_BLOCK)
            ok = valid & (x == am)
        else:
            thr_p, lse_p = _row_lse_thr(t_ws_m_ptr, t_ws_sum_ptr, t_thr_ptr, t_lse_ptr, ridx, S, V, filt_on,
                                        HAS_FILTER, S_BLOCK)
            lx = tl.load(t_ptr + trow * t_stride_row + xs * t_stride_col, mask=valid, other=0.0).to(tl.float32)
            lp = tl.where(valid, _log_prob(scale_logit(lx, t), thr_p, lse_p), _NEG_INF)
            if KIND == 1:
                thr_q, lse_q = _row_lse_thr(d_ws_m_ptr, d_ws_sum_ptr, d_thr_ptr, d_lse_ptr, ridx, S, V, filt_on,
                                            HAS_FILTER, S_BLOCK)
                qx = tl.load(d_ptr + qrow * d_stride_row + xs * d_stride_col, mask=valid, other=0.0).to(tl.float32)
                lq = _log_prob(scale_logit(qx, t), thr_q, lse_q)
            elif KIND == 2:
                qx = tl.load(d_ptr + qrow * d_stride_row + xs * d_stride_col, mask=valid, other=1.0).to(tl.float32)
                lq = tl.where(qx == 0.0, _NEG_INF, tl.log(tl.where(qx == 0.0, 1.0, qx)))
            else:
                lq = tl.zeros([], tl.float32)
            pos_lo, pos_hi = split_u64(offset + i)
            log_u = tl.log(uniform_from_word(random_word(seed_lo, seed_hi, pos_lo, pos_hi, salt_accept, zero_u32)))
            q_ok = (lq > _NEG_INF) & (lq < _POS_INF)  # q(x) a finite positive number (not NaN)
            ok = valid & (lp > _NEG_INF) & q_ok & (log_u < lp - tl.where(q_ok, lq, 0.0))
        if ok:
            i += 1
        else:
            done = done + 1
    accepted = i
    row = i  # the row that is sampled: first rejection, or n for the bonus token
    ridx = b.to(tl.int64) * W + row

    # ---- the emitted token
    if greedy:
        emitted = _merge_argmax(t_ws_max_ptr, t_ws_arg_ptr, ridx, S, V, S_BLOCK)
    else:
        trow = start + b + row
        dpos = start + row
        x = tl.load(drafts_ptr + dpos, mask=(row < n) & (dpos < num_drafts), other=-1).to(tl.int64)
        use_res = (row < n) & (x >= 0) & (x < V)
        qrow = _q_row(didx_ptr, tl.where(use_res & (dpos < num_drafts), dpos, 0), num_q_rows, HAS_DIDX)
        # A target row past the end reads nothing: fold the scalar test into the column
        # bound (see triton/__init__.py).
        v_row = tl.where(trow < num_target_rows, V, 0)
        thr_p, lse_p = _row_lse_thr(t_ws_m_ptr, t_ws_sum_ptr, t_thr_ptr, t_lse_ptr, ridx, S, V, filt_on,
                                    HAS_FILTER, S_BLOCK)
        thr_q = tl.full([], _NEG_INF, tl.float32)
        lse_q = tl.zeros([], tl.float32)
        xq = tl.where(use_res, x, 0)
        if KIND == 1:
            if use_res:  # draft row `row` exists (row < n)
                thr_q, lse_q = _row_lse_thr(d_ws_m_ptr, d_ws_sum_ptr, d_thr_ptr, d_lse_ptr, ridx, S, V, filt_on,
                                            HAS_FILTER, S_BLOCK)
                qx = tl.load(d_ptr + qrow * d_stride_row + xq * d_stride_col).to(tl.float32)
                lqx = _log_prob(scale_logit(qx, t), thr_q, lse_q)
                # q(x) not a finite positive number: x was not drawn from q, sample p
                use_res = use_res & (lqx > _NEG_INF) & (lqx < _POS_INF)
        elif KIND == 2:
            if use_res:
                qx = tl.load(d_ptr + qrow * d_stride_row + xq * d_stride_col).to(tl.float32)
                lqx = tl.where(qx == 0.0, _NEG_INF, tl.log(tl.where(qx == 0.0, 1.0, qx)))
                use_res = use_res & (lqx > _NEG_INF) & (lqx < _POS_INF)
        pos_lo, pos_hi = split_u64(offset + row)
        t_row_ptr = t_ptr + trow * t_stride_row
        d_row_ptr = d_ptr + qrow * d_stride_row
        r4 = tl.arange(0, BLOCK4)[:, None]
        lane = tl.arange(0, 4)[None, :]
        # Per-lane running maxima (a lane sees increasing indices: strict > keeps the
        # lowest); one reduction after the sweep.
        best_p = tl.full([BLOCK4, 4], _NEG_INF, tl.float32)
        idx_p = tl.full([BLOCK4, 4], 2147483647, tl.int32)
        best_r = tl.full([BLOCK4, 4], _NEG_INF, tl.float32)
        idx_r = tl.full([BLOCK4, 4], 2147483647, tl.int32)
        for base in range(0, V, 4 * BLOCK4):
            ctr = (base // 4 + r4).to(tl.uint32)
            w0, w1, w2, w3 = random_words4(seed_lo, seed_hi, pos_lo, pos_hi, salt_resample, ctr)
            g = gumbel_from_word(select_word(w0, w1, w2, w3, lane))
            cols = base + r4 * 4 + lane
            mask = cols < v_row
            lt = tl.load(t_row_ptr + cols.to(tl.int64) * t_stride_col, mask=mask, other=0.0).to(tl.float32)
            lp = tl.where(mask, _log_prob(scale_logit(lt, t), thr_p, lse_p), _NEG_INF)
            # race over p
            sc = tl.where(lp > _NEG_INF, lp + g, _NEG_INF)
            upd = sc > best_p
            best_p = tl.where(upd, sc, best_p)
            idx_p = tl.where(upd, cols, idx_p)
            # race over the residual max(p - q, 0)
            if use_res:
                if KIND == 1:
                    lq_raw = tl.load(d_row_ptr + cols.to(tl.int64) * d_stride_col, mask=mask, other=0.0)
                    lq = tl.where(mask, _log_prob(scale_logit(lq_raw.to(tl.float32), t), thr_q, lse_q), _NEG_INF)
                elif KIND == 2:
                    q = tl.load(d_row_ptr + cols.to(tl.int64) * d_stride_col, mask=mask, other=0.0).to(tl.float32)
                    lq = tl.where(q == 0.0, _NEG_INF, tl.log(tl.where(q == 0.0, 1.0, q)))
                else:
                    lq = tl.where(cols == x, 0.0, _NEG_INF)
                q_fin = lq > _NEG_INF
                gap = (lp > lq) & q_fin
                e = tl.exp(tl.where(gap, lq, 0.0) - tl.where(gap, lp, 0.0))
                res = tl.where(gap, lp + _log1p_neg(e), _NEG_INF)
                res = tl.where(q_fin, res, lp)
                sc_r = tl.where(res > _NEG_INF, res + g, _NEG_INF)
                upd_r = sc_r > best_r
                best_r = tl.where(upd_r, sc_r, best_r)
                idx_r = tl.where(upd_r, cols, idx_r)
        mp = tl.max(tl.max(best_p, axis=1), axis=0)
        win_p = tl.min(tl.min(tl.where((best_p == mp) & (best_p > _NEG_INF), idx_p, 2147483647), axis=1), axis=0)
        mr = tl.max(tl.max(best_r, axis=1), axis=0)
        win_r = tl.min(tl.min(tl.where((best_r == mr) & (best_r > _NEG_INF), idx_r, 2147483647), axis=1), axis=0)
        # The residual if it has a finite entry, else p, else token 0.
        emitted = tl.where(win_r < V, win_r, tl.where(win_p < V, win_p, 0)).to(tl.int64)

    # ---- write the whole output row: accepted drafts, the emitted token, then -1
    out_row = out_ptr + b.to(tl.int64) * W
    jj = tl.arange(0, BLOCK_W)
    for j0 in range(0, W, BLOCK_W):
        j = j0 + jj
        jmask = j < W
        dj = start + j
        dval = tl.load(drafts_ptr + dj, mask=jmask & (j < accepted) & (dj < num_drafts), other=-1).to(tl.int32)
        val = tl.where(j < accepted, dval, tl.where(j == accepted, emitted.to(tl.int32), -1))
        tl.store(out_row + j, val, mask=jmask)
    tl.store(num_acc_ptr + b, accepted.to(tl.int32))


# ----------------------------------------------------------------------------------------
# Host wrapper.
# ----------------------------------------------------------------------------------------


def _alloc_int32(shape, device) -> torch.Tensor:
    """Output allocation (uninitialised: the decision kernel writes every element).
    Tests replace it with a poisoned allocation."""
    return torch.empty(shape, dtype=torch.int32, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _num_splits(num_rows: int, vocab: int, block: int) -> int:
    chunks = triton.cdiv(vocab, block)
    if _interpreting():
        return min(chunks, 2)
    # Aim for about 1024 programs in flight, at least 4 chunks per split.
    want = max(1, triton.cdiv(1024, max(num_rows, 1)))
    return max(1, min(want, triton.cdiv(chunks, 4)))


def verify_block(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    draft_logits: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    max_num_draft: int = 0,
    method: str = "token",
    min_p: torch.Tensor | None = None,
    draft_index: torch.Tensor | None = None,
    *,
    _num_splits_override: int | None = None,
    _block: int | None = None,
    _radix_bits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``dspark_kernels.verify_block`` (arguments already validated).

    Args as in ``dspark_kernels.verify_block``: ``target_logits [N + B, V]`` and
    ``draft_logits`` / ``draft_probs [N, V]`` in fp32 / fp16 / bf16 with any strides
    (row and column strides are passed to the kernels; nothing is copied),
    ``draft_tokens [N]`` and ``cu_num_draft [B + 1]`` int32 / int64, per-request
    ``temperature`` (float), ``top_k`` (int), ``top_p`` (float) or None, ``seed`` /
    ``offset [B]`` int64, ``max_num_draft`` an int >= every ``n_b`` (a larger ``n_b``
    is clamped, never written past). If both ``draft_probs`` and ``draft_logits``
    are given, ``draft_probs`` is used (as the C++ kernels do).

    Returns ``output_tokens [B, max_num_draft + 1]`` int32 (-1 padded) and
    ``num_accepted [B]`` int32; every element is written by the decision kernel.
    No host synchronisation: CUDA-graph safe. ``_num_splits_override`` / ``_block`` /
    ``_radix_bits`` are for tests (vocabulary splits of the statistics kernel, chunk
    size, key bits fixed per pass of the top-k / top-p search: 1, 2, 4 or 8).
    """
    device = target_logits.device
    batch = cu_num_draft.shape[0] - 1
    max_num_draft = int(max_num_draft)
    width = max_num_draft + 1
    out = _alloc_int32((max(batch, 0), width), device)
    num_accepted = _alloc_int32((max(batch, 0),), device)
    if batch <= 0:
        return out, num_accepted
    num_rows, vocab = target_logits.shape
    num_drafts = draft_tokens.shape[0]

    # Small per-request tensors: dtype only (no copy when already right, no sync).
    temp = temperature.to(torch.float32) if temperature is not None else None
    topk = top_k if top_k is not None else None
    topp = top_p.to(torch.float32) if top_p is not None else None
    seed = seed.to(torch.int64)
    offset = offset.to(torch.int64)
    has_temp = temp is not None
    has_topk = topk is not None
    has_topp = topp is not None
    has_minp = min_p is not None
    has_didx = draft_index is not None

    if draft_probs is not None:
        kind, draft = _KIND_PROBS, draft_probs
    elif draft_logits is not None:
        kind, draft = _KIND_LOGITS, draft_logits
    else:
        kind, draft = _KIND_POINT, None

    interp = _interpreting()
    block = _block or (1024 if not interp else min(4096, triton.next_power_of_2(vocab)))
    block = max(block, 16)
    n_split = _num_splits_override or _num_splits(num_rows, vocab, block)
    n_split = max(1, min(n_split, triton.cdiv(vocab, block)))
    chunks_per_split = triton.cdiv(triton.cdiv(vocab, block), n_split)
    s_block = triton.next_power_of_2(n_split)
    programs = batch * width

    f32 = dict(dtype=torch.float32, device=device)
    t_ws_max = torch.empty(programs * n_split, **f32)
    t_ws_arg = torch.empty(programs * n_split, dtype=torch.int32, device=device)
    t_ws_m = torch.empty(programs * n_split, **f32)
    t_ws_sum = torch.empty(programs * n_split, dtype=torch.int64, device=device)  # fixed-point masses
    dummy = t_ws_m
    if kind == _KIND_LOGITS:
        d_ws_m = torch.empty(programs * n_split, **f32)
        d_ws_sum = torch.empty(programs * n_split, dtype=torch.int64, device=device)
    else:
        d_ws_m = d_ws_sum = dummy
    has_filter = has_temp and (has_topk or has_topp or has_minp)
    if has_filter:
        t_thr = torch.empty(programs, **f32)
        t_lse = torch.empty(programs, **f32)
        d_thr = torch.empty(programs, **f32) if kind == _KIND_LOGITS else dummy
        d_lse = torch.empty(programs, **f32) if kind == _KIND_LOGITS else dummy
    else:
        t_thr = t_lse = d_thr = d_lse = dummy

    temp_arg = temp if has_temp else dummy
    topk_arg = topk if has_topk else cu_num_draft
    topp_arg = topp if has_topp else dummy
    stats_warps = 4 if not interp else 1
    lmp_arg = min_p_log_tensor(min_p) if has_minp else dummy
    didx_arg = draft_index if has_didx else cu_num_draft
    num_q_rows = draft.shape[0] if draft is not None else num_drafts

    _row_stats_kernel[(programs, n_split)](
        target_logits, target_logits.stride(0), target_logits.stride(1), num_rows,
        cu_num_draft, temp_arg, vocab, width, max_num_draft, n_split, chunks_per_split,
        t_ws_max, t_ws_arg, t_ws_m, didx_arg,
        IS_TARGET=True, HAS_TEMP=has_temp, BLOCK=block, HAS_DIDX=False, num_warps=stats_warps,
    )
    if kind == _KIND_LOGITS and has_temp:
        _row_stats_kernel[(programs, n_split)](
            draft, draft.stride(0), draft.stride(1), num_q_rows,
            cu_num_draft, temp_arg, vocab, width, max_num_draft, n_split, chunks_per_split,
            dummy, t_ws_arg, d_ws_m, didx_arg,
            IS_TARGET=False, HAS_TEMP=has_temp, BLOCK=block, HAS_DIDX=has_didx, num_warps=stats_warps,
        )
    if has_temp:  # the masses need each row's max: a second pass over the sampling rows
        _row_mass_kernel[(programs, n_split)](
            target_logits, target_logits.stride(0), target_logits.stride(1), num_rows,
            cu_num_draft, temp_arg, vocab, width, max_num_draft, n_split, chunks_per_split,
            t_ws_m, t_ws_sum, didx_arg,
            IS_TARGET=True, HAS_TEMP=has_temp, BLOCK=block, S_BLOCK=s_block, HAS_DIDX=False, num_warps=stats_warps,
        )
        if kind == _KIND_LOGITS:
            _row_mass_kernel[(programs, n_split)](
                draft, draft.stride(0), draft.stride(1), num_q_rows,
                cu_num_draft, temp_arg, vocab, width, max_num_draft, n_split, chunks_per_split,
                d_ws_m, d_ws_sum, didx_arg,
                IS_TARGET=False, HAS_TEMP=has_temp, BLOCK=block, S_BLOCK=s_block, HAS_DIDX=has_didx,
                num_warps=stats_warps,
            )
    if has_filter:
        fblock = _block or (256 if not interp else min(1024, triton.next_power_of_2(vocab)))
        fblock = max(fblock, 16)
        # Bits of the threshold key fixed per pass: 4 on the GPU (16 candidates, 8 passes);
        # 8 in the interpreter (fewer, larger numpy steps).
        radix_bits = _radix_bits or (4 if not interp else 8)
        common = dict(HAS_TOPK=has_topk, HAS_TOPP=has_topp, BLOCK=fblock, RADIX_BITS=radix_bits,
                      S_BLOCK=s_block, HAS_MINP=has_minp,
                      num_warps=8 if not interp else 1)
        _filter_kernel[(programs,)](
            target_logits, target_logits.stride(0), target_logits.stride(1), num_rows,
            cu_num_draft, temp_arg, topk_arg, topp_arg, vocab, triton.cdiv(vocab, fblock), width, max_num_draft, n_split,
            t_ws_m, t_thr, t_lse, lmp_arg, didx_arg, IS_TARGET=True, HAS_DIDX=False, **common,
        )
        if kind == _KIND_LOGITS:
            _filter_kernel[(programs,)](
                draft, draft.stride(0), draft.stride(1), num_q_rows,
                cu_num_draft, temp_arg, topk_arg, topp_arg, vocab, triton.cdiv(vocab, fblock), width, max_num_draft, n_split,
                d_ws_m, d_thr, d_lse, lmp_arg, didx_arg, IS_TARGET=False, HAS_DIDX=has_didx, **common,
            )

    block4 = (_block // 4 if _block else (256 if not interp else min(1024, triton.next_power_of_2(vocab) // 4)))
    block4 = max(block4, 4)
    d_arg = draft if draft is not None else target_logits
    decide, extra = _decide_kernel, {}
    if method == "block":  # block verification: its own decision kernel (verify_block_method.py)
        from .verify_block_method import _decide_block_kernel as decide
        extra = dict(BLOCK=max(16, min(1024 if not interp else 4096, triton.next_power_of_2(vocab))))
    decide[(batch,)](
        target_logits, target_logits.stride(0), target_logits.stride(1), num_rows,
        d_arg, d_arg.stride(0), d_arg.stride(1),
        draft_tokens, num_drafts, cu_num_draft, temp_arg, topk_arg, topp_arg, seed, offset,
        vocab, width, max_num_draft, n_split,
        t_ws_max, t_ws_arg, t_ws_m, t_ws_sum, t_thr, t_lse,
        d_ws_m, d_ws_sum, d_thr, d_lse,
        out, num_accepted, lmp_arg, didx_arg, num_q_rows,
        KIND=kind, HAS_TEMP=has_temp, HAS_TOPK=has_topk, HAS_TOPP=has_topp,
        HAS_FILTER=has_topk or has_topp or has_minp, HAS_MINP=has_minp, HAS_DIDX=has_didx, S_BLOCK=s_block, BLOCK4=block4, BLOCK_W=min(128, triton.next_power_of_2(width)),
        num_warps=4 if not interp else 1, **extra,
    )
    return out, num_accepted
