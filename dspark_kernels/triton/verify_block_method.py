"""verify_block(method="block") in Triton: one simple decision kernel per request.

The statistics and filter kernels of ``verify_block.py`` run first, unchanged (they
give every row's log-sum-exp and top-k / top-p threshold); ``_decide_block_kernel``
then replaces ``_decide_kernel``: greedy requests walk as before; sampling requests
run block verification exactly as the reference
(``dspark_kernels/reference/verify_block.py``, docs/verification.md#block-verification):

* the block is the leading run of valid draft ids (``g`` of them);
* ``log rho_j = min(0, log rho_{j-1} + log p(x) - log q(x))`` in fp32;
* ``h_j = Z_j / (Z_j + 1 - rho_j)`` in fp64 (1 when ``rho_j = 1``), with
  ``Z_j = sum_v max(rho_j p_j(v) - q_j(v), 0)`` summed in fp64 over the vocabulary
  (``rho_j (1 - p_j(x_j))`` for point masses), and ``h_g = rho_g`` tested in log space;
* the coin of ``h_j`` is the accept stream at ``offset + j - 1``; ``tau`` is the largest
  ``j`` whose coin passes;
* one Gumbel race at row ``tau`` (resample stream, ``offset + tau``): the bonus from
  ``p`` when ``tau = g``, else ``log max(rho_tau p - q, 0)`` (``p`` if that has no mass).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .philox import gumbel_from_word, random_word, random_words4, select_word, split_u64, uniform_from_word
from .verify_block import (
    _NEG_INF,
    SALT_ACCEPT,
    SALT_RESAMPLE,
    _filter_active,
    _load_temperature,
    _log1p_neg,
    _log_prob,
    _merge_argmax,
    _min_p_log_at,
    _q_row,
    _request_n,
    _row_lse_thr,
)


@triton.jit
def _draft_log_probs(t_ptr, t_stride_row, t_stride_col, d_ptr, d_stride_row, d_stride_col, drafts_ptr,
                     num_drafts, start, b, i, W, S, V, t, filt_on,
                     t_ws_m_ptr, t_ws_sum_ptr, t_thr_ptr, t_lse_ptr, d_ws_m_ptr, d_ws_sum_ptr, d_thr_ptr, d_lse_ptr,
                     didx_ptr, num_q_rows,
                     KIND: tl.constexpr, HAS_FILTER: tl.constexpr, S_BLOCK: tl.constexpr, HAS_DIDX: tl.constexpr):
    """(x, log p_i(x), log q_i(x)) of draft i (x a valid id)."""
    ridx = b.to(tl.int64) * W + i
    trow = start + b + i
    dpos = start + i
    qrow = _q_row(didx_ptr, dpos, num_q_rows, HAS_DIDX)
    x = tl.load(drafts_ptr + dpos, mask=dpos < num_drafts, other=0).to(tl.int64)
    thr_p, lse_p = _row_lse_thr(t_ws_m_ptr, t_ws_sum_ptr, t_thr_ptr, t_lse_ptr, ridx, S, V, filt_on, HAS_FILTER,
                                S_BLOCK)
    lx = tl.load(t_ptr + trow * t_stride_row + x * t_stride_col).to(tl.float32)
    lp = _log_prob(tl.math.div_rn(lx, t), thr_p, lse_p)
    if KIND == 1:
        thr_q, lse_q = _row_lse_thr(d_ws_m_ptr, d_ws_sum_ptr, d_thr_ptr, d_lse_ptr, ridx, S, V, filt_on, HAS_FILTER,
                                    S_BLOCK)
        qx = tl.load(d_ptr + qrow * d_stride_row + x * d_stride_col).to(tl.float32)
        lq = _log_prob(tl.math.div_rn(qx, t), thr_q, lse_q)
    elif KIND == 2:
        qx = tl.load(d_ptr + qrow * d_stride_row + x * d_stride_col).to(tl.float32)
        lq = tl.where(qx == 0.0, _NEG_INF, tl.log(tl.where(qx == 0.0, 1.0, qx)))
    else:
        lq = tl.zeros([], tl.float32)
    return x, lp, lq


@triton.jit
def _ratio_step(lr, lp, lq):
    """log rho_{j+1} from log rho_j and draft j's log p(x), log q(x) (block_ratio_step)."""
    dead = (not (lr > _NEG_INF)) | (not (lp > _NEG_INF))
    q_zero = not (lq > _NEG_INF)
    d = lr + (lp - tl.where(q_zero, 0.0, lq))
    d = tl.where(d >= 0.0, 0.0, d)
    return tl.where(dead, _NEG_INF, tl.where(q_zero, 0.0, d))


@triton.jit
def _exp_or_zero(lx):
    ok = lx > _NEG_INF
    return tl.where(ok, tl.exp(tl.where(ok, lx, 0.0)), 0.0)


@triton.jit
def _decide_block_kernel(
    t_ptr, t_stride_row, t_stride_col, num_target_rows,
    d_ptr, d_stride_row, d_stride_col,
    drafts_ptr, num_drafts, cu_ptr, temp_ptr, topk_ptr, topp_ptr, seed_ptr, offset_ptr,
    V, W, max_num_draft, S,
    t_ws_max_ptr, t_ws_arg_ptr, t_ws_m_ptr, t_ws_sum_ptr, t_thr_ptr, t_lse_ptr,
    d_ws_m_ptr, d_ws_sum_ptr, d_thr_ptr, d_lse_ptr,
    out_ptr, num_acc_ptr, lmp_ptr, didx_ptr, num_q_rows,
    KIND: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
    HAS_FILTER: tl.constexpr, S_BLOCK: tl.constexpr, BLOCK: tl.constexpr, BLOCK4: tl.constexpr,
    BLOCK_W: tl.constexpr, HAS_MINP: tl.constexpr, HAS_DIDX: tl.constexpr,
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
    offs = tl.arange(0, BLOCK)

    accepted = tl.zeros([], tl.int64)
    emitted = tl.zeros([], tl.int64)
    if greedy:  # unchanged: accept while x == argmax, then the argmax
        i = tl.zeros([], tl.int64)
        done = tl.zeros([], tl.int32)
        while (i < n) & (done == 0):
            dpos = start + i
            x = tl.load(drafts_ptr + dpos, mask=dpos < num_drafts, other=-1).to(tl.int64)
            am = _merge_argmax(t_ws_max_ptr, t_ws_arg_ptr, b.to(tl.int64) * W + i, S, V, S_BLOCK)
            if (x >= 0) & (x < V) & (x == am):
                i += 1
            else:
                done = done + 1
        accepted = i
        emitted = _merge_argmax(t_ws_max_ptr, t_ws_arg_ptr, b.to(tl.int64) * W + i, S, V, S_BLOCK)
    else:
        # g: the leading run of valid ids
        g = tl.zeros([], tl.int64)
        stop = tl.zeros([], tl.int32)
        while (g < n) & (stop == 0):
            dpos = start + g
            x = tl.load(drafts_ptr + dpos, mask=dpos < num_drafts, other=-1).to(tl.int64)
            if (x >= 0) & (x < V) & (start + b + g < num_target_rows):
                g += 1
            else:
                stop = stop + 1
        lr = tl.zeros([], tl.float32)
        tau = tl.zeros([], tl.int64)
        tau_lr = tl.zeros([], tl.float32)
        j = tl.full([], 1, tl.int64)
        alive = tl.full([], 1, tl.int32)
        while (j <= g) & (alive == 1):
            x, lp, lq = _draft_log_probs(t_ptr, t_stride_row, t_stride_col, d_ptr, d_stride_row, d_stride_col,
                                         drafts_ptr, num_drafts, start, b, j - 1, W, S, V, t, filt_on,
                                         t_ws_m_ptr, t_ws_sum_ptr, t_thr_ptr, t_lse_ptr,
                                         d_ws_m_ptr, d_ws_sum_ptr, d_thr_ptr, d_lse_ptr, didx_ptr, num_q_rows,
                                         KIND, HAS_FILTER, S_BLOCK, HAS_DIDX)
            lr = _ratio_step(lr, lp, lq)
            if lr > _NEG_INF:
                pos_lo, pos_hi = split_u64(offset + j - 1)
                u = uniform_from_word(random_word(seed_lo, seed_hi, pos_lo, pos_hi, salt_accept, zero_u32))
                if j == g:  # the last draft: h = rho, in log space (the token rule)
                    ok = tl.log(u) < lr
                else:
                    rho = tl.exp(lr)
                    rho64 = rho.to(tl.float64)
                    ridx = b.to(tl.int64) * W + j
                    thr_p, lse_p = _row_lse_thr(t_ws_m_ptr, t_ws_sum_ptr, t_thr_ptr, t_lse_ptr, ridx, S, V, filt_on,
                                                HAS_FILTER, S_BLOCK)
                    trow_ptr = t_ptr + (start + b + j) * t_stride_row
                    if KIND == 0:  # point mass: Z = rho (1 - p(x_j))
                        xn, lpn, lqn = _draft_log_probs(t_ptr, t_stride_row, t_stride_col, d_ptr, d_stride_row,
                                                        d_stride_col, drafts_ptr, num_drafts, start, b, j, W, S, V, t,
                                                        filt_on, t_ws_m_ptr, t_ws_sum_ptr, t_thr_ptr, t_lse_ptr,
                                                        d_ws_m_ptr, d_ws_sum_ptr, d_thr_ptr, d_lse_ptr, didx_ptr,
                                                        num_q_rows, KIND, HAS_FILTER, S_BLOCK, HAS_DIDX)
                        z = rho64 * (1.0 - _exp_or_zero(lpn).to(tl.float64))
                    else:
                        thr_q = tl.full([], _NEG_INF, tl.float32)
                        lse_q = tl.zeros([], tl.float32)
                        if KIND == 1:
                            thr_q, lse_q = _row_lse_thr(d_ws_m_ptr, d_ws_sum_ptr, d_thr_ptr, d_lse_ptr, ridx, S,
                                                        V, filt_on, HAS_FILTER, S_BLOCK)
                        drow_ptr = d_ptr + _q_row(didx_ptr, start + j, num_q_rows, HAS_DIDX) * d_stride_row
                        acc = tl.zeros([BLOCK], tl.float64)
                        for c0 in range(0, V, BLOCK):
                            cols = c0 + offs
                            mask = cols < V
                            lt = tl.load(trow_ptr + cols.to(tl.int64) * t_stride_col, mask=mask, other=0.0)
                            lpv = tl.where(mask, _log_prob(tl.math.div_rn(lt.to(tl.float32), t), thr_p, lse_p),
                                           _NEG_INF)
                            dv = tl.load(drow_ptr + cols.to(tl.int64) * d_stride_col, mask=mask, other=0.0)
                            if KIND == 1:
                                lqv = tl.where(mask, _log_prob(tl.math.div_rn(dv.to(tl.float32), t), thr_q, lse_q),
                                               _NEG_INF)
                                qv = _exp_or_zero(lqv)
                            else:
                                qv = dv.to(tl.float32)
                            d = rho64 * _exp_or_zero(lpv).to(tl.float64) - qv.to(tl.float64)
                            acc += tl.where(mask & (d > 0.0), d, 0.0)
                        z = tl.sum(acc, axis=0)
                    h = tl.where(rho >= 1.0, 1.0, z / (z + (1.0 - rho64)))
                    ok = u.to(tl.float64) < h
                if ok:
                    tau = j
                    tau_lr = lr
            else:
                alive = 0
            j += 1
        accepted = tau

        # ---- one Gumbel race at row tau
        row = tau
        ridx = b.to(tl.int64) * W + row
        trow = start + b + row
        dpos = start + row
        use_res = row < g
        x = tl.load(drafts_ptr + dpos, mask=tl.where(use_res, dpos < num_drafts, False), other=-1).to(tl.int64)
        row_ok = trow < num_target_rows
        thr_p, lse_p = _row_lse_thr(t_ws_m_ptr, t_ws_sum_ptr, t_thr_ptr, t_lse_ptr, ridx, S, V, filt_on,
                                    HAS_FILTER, S_BLOCK)
        thr_q = tl.full([], _NEG_INF, tl.float32)
        lse_q = tl.zeros([], tl.float32)
        if KIND == 1:
            if use_res:
                thr_q, lse_q = _row_lse_thr(d_ws_m_ptr, d_ws_sum_ptr, d_thr_ptr, d_lse_ptr, ridx, S, V, filt_on,
                                            HAS_FILTER, S_BLOCK)
        pos_lo, pos_hi = split_u64(offset + row)
        t_row_ptr = t_ptr + trow * t_stride_row
        d_row_ptr = d_ptr + _q_row(didx_ptr, tl.where(use_res & (dpos < num_drafts), dpos, 0), num_q_rows,
                                   HAS_DIDX) * d_stride_row
        r4 = tl.arange(0, BLOCK4)[:, None]
        lane = tl.arange(0, 4)[None, :]
        best_p = tl.full([BLOCK4, 4], _NEG_INF, tl.float32)
        idx_p = tl.full([BLOCK4, 4], 2147483647, tl.int32)
        best_r = tl.full([BLOCK4, 4], _NEG_INF, tl.float32)
        idx_r = tl.full([BLOCK4, 4], 2147483647, tl.int32)
        for base in range(0, V, 4 * BLOCK4):
            ctr = (base // 4 + r4).to(tl.uint32)
            w0, w1, w2, w3 = random_words4(seed_lo, seed_hi, pos_lo, pos_hi, salt_resample, ctr)
            gn = gumbel_from_word(select_word(w0, w1, w2, w3, lane))
            cols = base + r4 * 4 + lane
            mask = tl.where(row_ok, cols < V, False)  # no scalar &-ed into a tensor mask (Triton 3.9)
            lt = tl.load(t_row_ptr + cols.to(tl.int64) * t_stride_col, mask=mask, other=0.0).to(tl.float32)
            lp = tl.where(mask, _log_prob(tl.math.div_rn(lt, t), thr_p, lse_p), _NEG_INF)
            sc = tl.where(lp > _NEG_INF, lp + gn, _NEG_INF)
            upd = sc > best_p
            best_p = tl.where(upd, sc, best_p)
            idx_p = tl.where(upd, cols, idx_p)
            if use_res:  # log max(rho_tau p - q, 0)
                if KIND == 1:
                    lq_raw = tl.load(d_row_ptr + cols.to(tl.int64) * d_stride_col, mask=mask, other=0.0)
                    lq = tl.where(mask, _log_prob(tl.math.div_rn(lq_raw.to(tl.float32), t), thr_q, lse_q), _NEG_INF)
                elif KIND == 2:
                    q = tl.load(d_row_ptr + cols.to(tl.int64) * d_stride_col, mask=mask, other=0.0).to(tl.float32)
                    lq = tl.where(q == 0.0, _NEG_INF, tl.log(tl.where(q == 0.0, 1.0, q)))
                else:
                    lq = tl.where(cols == x, 0.0, _NEG_INF)
                a = tau_lr + lp
                q_fin = lq > _NEG_INF
                gap = (a > lq) & q_fin
                e = tl.exp(tl.where(gap, lq, 0.0) - tl.where(gap, a, 0.0))
                res = tl.where(gap, a + _log1p_neg(e), _NEG_INF)
                res = tl.where(q_fin, res, a)
                sc_r = tl.where(res > _NEG_INF, res + gn, _NEG_INF)
                upd_r = sc_r > best_r
                best_r = tl.where(upd_r, sc_r, best_r)
                idx_r = tl.where(upd_r, cols, idx_r)
        mp = tl.max(tl.max(best_p, axis=1), axis=0)
        win_p = tl.min(tl.min(tl.where((best_p == mp) & (best_p > _NEG_INF), idx_p, 2147483647), axis=1), axis=0)
        mr = tl.max(tl.max(best_r, axis=1), axis=0)
        win_r = tl.min(tl.min(tl.where((best_r == mr) & (best_r > _NEG_INF), idx_r, 2147483647), axis=1), axis=0)
        emitted = tl.where(win_r < V, win_r, tl.where(win_p < V, win_p, 0)).to(tl.int64)

    out_row = out_ptr + b.to(tl.int64) * W
    jj = tl.arange(0, BLOCK_W)
    for j0 in range(0, W, BLOCK_W):
        jc = j0 + jj
        jmask = jc < W
        dj = start + jc
        dval = tl.load(drafts_ptr + dj, mask=jmask & (jc < accepted) & (dj < num_drafts), other=-1).to(tl.int32)
        val = tl.where(jc < accepted, dval, tl.where(jc == accepted, emitted.to(tl.int32), -1))
        tl.store(out_row + jc, val, mask=jmask)
    tl.store(num_acc_ptr + b, accepted.to(tl.int32))

