"""verify_tree in Triton (docs/verification.md, "verify_tree"): the reference's integers.

One program per request (``_tree_kernel``, grid ``(B,)``), no host synchronisation.
The program walks its tree from the root as the reference does (csrc/include/dspark/tree.h
states the rules):

* greedy requests: the argmax of the current node's target row (lowest index on ties),
  then the first child with that id; none: emit the argmax;
* sampling requests: the (threshold, log-sum-exp) of the current node's target row
  (top-k / top-p thresholds by the radix searches of ``_filters.py``; the lse as a max
  then the int64 fixed-point mass of fp32 exps, ``_filters.lse_from_mass``), then its
  children in increasing local index with the accept-stream coin at position
  ``offset + depth``, index = the child's rank. After a
  rejection the residual ``w = log max(p' - q_c, 0)`` is written to a per-request fp32
  workspace row (three sweeps: its max, its fixed-point mass, the store), so the current
  ``p'(v)`` is ``w(v) - lse(w)``; the emitted token is one Gumbel race on the
  resample stream over the last residual (or ``p'``).

The per-token math is verify_block's Triton math (``_log_prob``, ``_log1p_neg`` of
``triton/verify_block.py``). Every sum is an integer (docs/verification.md,
"Order-independent sums"), so the log-sums-exp equal the reference's to the last bit
wherever the fp32 ``exp`` / ``log`` of the two agree; results equal the reference's
except where two candidates are within a few ulps of each other, which random inputs
do not produce.

Masks are boolean tensors of each load's shape (scalar conditions are broadcast
first); only long-standing ``tl`` APIs are used; runs under ``TRITON_INTERPRET=1``.
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
from .verify_block import _log1p_neg, _log_prob, _q_row

SALT_ACCEPT = tl.constexpr(0x41434350)
SALT_RESAMPLE = tl.constexpr(0x52534D50)
_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))
_BIG = tl.constexpr(2147483647)

_KIND_POINT = 0
_KIND_LOGITS = 1
_KIND_PROBS = 2


@triton.jit
def _row_max(row_ptr, stride, V, t, BLOCK: tl.constexpr):
    """Max of the scaled row s = x / t (-inf if none)."""
    offs = tl.arange(0, BLOCK)
    m_vec = tl.full([BLOCK], _NEG_INF, tl.float32)
    for c0 in range(0, V, BLOCK):
        cols = c0 + offs
        mask = cols < V
        x = tl.load(row_ptr + cols.to(tl.int64) * stride, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(mask, scale_logit(x, t), _NEG_INF)
        m_vec = tl.maximum(m_vec, s)
    return tl.max(m_vec, axis=0)


@triton.jit
def _row_stats(row_ptr, stride, V, t, k, k_on, p, p_on, lmp,
               HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """(threshold, lse) of a filtered scaled row: log p(v) = s_v - lse where s_v >= threshold
    (min-p with lmp = min_p_log, -inf when off; then top-k; then top-p)."""
    m = _row_max(row_ptr, stride, V, t, BLOCK)
    finite = m > _NEG_INF
    inf_row = m == _POS_INF
    safe_m = tl.where(finite, m, 0.0)
    thr = _min_p_threshold(m, lmp)
    if HAS_TOPK:
        if k_on:
            thr = tl.maximum(thr, top_k_threshold(row_ptr, stride, V, t, k, BLOCK, RADIX_BITS))
    if HAS_TOPP:
        if p_on:
            thr = top_p_threshold(row_ptr, stride, V, t, thr, safe_m, p, BLOCK, RADIX_BITS)
    scale, unscale = mass_scales(V)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int64)
    n_inf = tl.zeros([BLOCK], tl.int32)
    for c0 in range(0, V, BLOCK):
        cols = c0 + offs
        mask = cols < V
        x = tl.load(row_ptr + cols.to(tl.int64) * stride, mask=mask, other=0.0).to(tl.float32)
        s = scale_logit(x, t)
        kept = mask & (s >= thr) & (s > _NEG_INF)
        fin = kept & (s < _POS_INF)  # +inf entries are counted apart: never inf - inf
        acc += fixed_mass(tl.where(fin, tl.exp(tl.where(fin, s, 0.0) - safe_m), 0.0), scale)
        n_inf += (mask & (s == _POS_INF)).to(tl.int32)
    lse = tl.where(finite, lse_from_mass(safe_m, tl.sum(acc, axis=0), unscale), _NEG_INF)
    # A row whose max is +inf: its +inf entries share the mass (sampling.h row_filter_final).
    lse = tl.where(inf_row, tl.log(tl.maximum(tl.sum(n_inf, axis=0), 1).to(tl.float32)), lse)
    thr = tl.where(inf_row, _POS_INF, thr)
    return thr, lse


@triton.jit
def _residual(lp, lq):
    """log max(p - q, 0) from log p and log q (sampling.h's residual_log_weight)."""
    q_fin = lq > _NEG_INF
    gap = (lp > lq) & q_fin
    e = tl.exp(tl.where(gap, lq, 0.0) - tl.where(gap, lp, 0.0))
    res = tl.where(gap, lp + _log1p_neg(e), _NEG_INF)
    return tl.where(q_fin, res, lp)


@triton.jit
def _normalised(w, lse):
    fin = w > _NEG_INF
    return tl.where(fin, tl.where(fin, w, 0.0) - lse, _NEG_INF)


@triton.jit
def _current_log_p(t_row_ptr, t_stride_col, ws_row_ptr, cols, mask, t, thr_p, lse_p, taken, lse_last):
    """log p'(cols): the node's filtered target log-probs, or the normalised residual."""
    tk = (tl.zeros(cols.shape, tl.int32) + taken) != 0
    x = tl.load(t_row_ptr + cols.to(tl.int64) * t_stride_col, mask=mask & (~tk), other=0.0).to(tl.float32)
    lp_target = tl.where(mask, _log_prob(scale_logit(x, t), thr_p, lse_p), _NEG_INF)
    w = tl.load(ws_row_ptr + cols.to(tl.int64), mask=mask & tk, other=_NEG_INF)
    return tl.where(tk, tl.where(mask, _normalised(w, lse_last), _NEG_INF), lp_target)


@triton.jit
def _draft_log_q(d_row_ptr, d_stride_col, cols, mask, x, t, thr_q, lse_q, KIND: tl.constexpr):
    """log q_c(cols) of the child's draft distribution (point mass at x without one)."""
    if KIND == 1:
        raw = tl.load(d_row_ptr + cols.to(tl.int64) * d_stride_col, mask=mask, other=0.0).to(tl.float32)
        lq = tl.where(mask, _log_prob(scale_logit(raw, t), thr_q, lse_q), _NEG_INF)
    elif KIND == 2:
        q = tl.load(d_row_ptr + cols.to(tl.int64) * d_stride_col, mask=mask, other=0.0).to(tl.float32)
        lq = tl.where(q == 0.0, _NEG_INF, tl.log(tl.where(q == 0.0, 1.0, q)))
    else:
        lq = tl.where(cols == x, 0.0, _NEG_INF)
    return lq


@triton.jit
def _tree_kernel(
    t_ptr, t_stride_row, t_stride_col,
    d_ptr, d_stride_row, d_stride_col,
    drafts_ptr, parents_ptr, num_drafts, cu_ptr, temp_ptr, topk_ptr, topp_ptr, seed_ptr, offset_ptr,
    V, W, max_depth, ws_ptr,
    path_ptr, num_acc_ptr, out_ptr, lmp_ptr, didx_ptr, num_q_rows,
    KIND: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK4: tl.constexpr, BLOCK_W: tl.constexpr, RADIX_BITS: tl.constexpr,
    HAS_MINP: tl.constexpr, HAS_DIDX: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    # (start, n), clamped into [0, N]: a kernel never trusts cu
    c0 = tl.minimum(tl.maximum(tl.load(cu_ptr + b).to(tl.int64), 0), num_drafts)
    c1 = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1).to(tl.int64), c0), num_drafts)
    start = c0
    n = c1 - c0
    if HAS_TEMP:
        t = tl.load(temp_ptr + b).to(tl.float32)
    else:
        t = tl.zeros([], tl.float32)
    greedy = not (t > 0.0)
    k, k_on, p, p_on = _filter_active(topk_ptr, topp_ptr, b, V, HAS_TOPK, HAS_TOPP)
    lmp = _min_p_log_at(lmp_ptr, b, HAS_MINP)
    seed_lo, seed_hi = split_u64(tl.load(seed_ptr + b))
    offset = tl.load(offset_ptr + b).to(tl.int64)
    salt_accept = tl.full([], SALT_ACCEPT, tl.uint32)
    salt_resample = tl.full([], SALT_RESAMPLE, tl.uint32)
    ws_row = ws_ptr + b * V
    offs = tl.arange(0, BLOCK)
    jj = tl.arange(0, BLOCK_W)
    path_vec = tl.where(jj == 0, 0, -1)
    out_vec = tl.full([BLOCK_W], -1, tl.int32)

    node = tl.full([], -1, tl.int64)
    d = tl.zeros([], tl.int64)
    accepted = tl.zeros([], tl.int64)
    done = tl.zeros([], tl.int32)
    emitted = tl.zeros([], tl.int64)
    while done == 0:
        t_row = t_ptr + (start + b + 1 + node) * t_stride_row
        may = d < max_depth
        nxt = tl.full([], -1, tl.int64)
        if greedy:
            best = tl.full([BLOCK], _NEG_INF, tl.float32)
            best_idx = tl.full([BLOCK], _BIG, tl.int32)
            for cc in range(0, V, BLOCK):
                cols = cc + offs
                mask = cols < V
                x = tl.load(t_row + cols.to(tl.int64) * t_stride_col, mask=mask, other=_NEG_INF).to(tl.float32)
                upd = x > best
                best = tl.where(upd, x, best)
                best_idx = tl.where(upd, cols, best_idx)
            bmax = tl.max(best, axis=0)
            am = tl.min(tl.where(best == bmax, best_idx, _BIG), axis=0).to(tl.int64)
            am = tl.where((am >= 0) & (am < V), am, 0)
            c = tl.zeros([], tl.int64)
            while (c < n) & (nxt < 0) & may:
                par = tl.load(parents_ptr + start + c).to(tl.int64)
                tok = tl.load(drafts_ptr + start + c).to(tl.int64)
                nxt = tl.where((par == node) & (tok == am), c, nxt)
                c += 1
            emitted = am
        else:
            thr_p, lse_p = _row_stats(t_row, t_stride_col, V, t, k, k_on, p, p_on, lmp, HAS_TOPK, HAS_TOPP, BLOCK,
                                      RADIX_BITS)
            pos_lo, pos_hi = split_u64(offset + d)
            taken = tl.zeros([], tl.int32)
            lse_last = tl.zeros([], tl.float32)
            rank = tl.zeros([], tl.int64)
            c = tl.zeros([], tl.int64)
            while (c < n) & (nxt < 0) & may:
                par = tl.load(parents_ptr + start + c).to(tl.int64)
                if par == node:
                    tok = tl.load(drafts_ptr + start + c).to(tl.int64)
                    if (tok >= 0) & (tok < V):
                        d_row = d_ptr + _q_row(didx_ptr, start + c, num_q_rows, HAS_DIDX) * d_stride_row
                        thr_q = tl.full([], _NEG_INF, tl.float32)
                        lse_q = tl.zeros([], tl.float32)
                        if KIND == 1:
                            thr_q, lse_q = _row_stats(d_row, d_stride_col, V, t, k, k_on, p, p_on, lmp, HAS_TOPK,
                                                      HAS_TOPP, BLOCK, RADIX_BITS)
                        # p'(x) and q(x): lane `tok` of one chunk, reduced
                        xcols = tok + offs
                        xmask = offs == 0
                        lpx = tl.max(tl.where(xmask, _current_log_p(t_row, t_stride_col, ws_row, xcols, xmask, t,
                                                                    thr_p, lse_p, taken, lse_last), _NEG_INF), axis=0)
                        lqx = tl.max(tl.where(xmask, _draft_log_q(d_row, d_stride_col, xcols, xmask, tok, t, thr_q,
                                                                  lse_q, KIND), _NEG_INF), axis=0)
                        log_u = tl.log(uniform_from_word(random_word(seed_lo, seed_hi, pos_lo, pos_hi, salt_accept,
                                                                     rank)))
                        # q(x) must be a finite positive number (else the child was not drawn from q:
                        # skipped like padding, p' unchanged), as verify_block's accept test.
                        q_ok = (lqx > _NEG_INF) & (lqx < _POS_INF)
                        ok = (lpx > _NEG_INF) & q_ok & (log_u < lpx - tl.where(q_ok, lqx, 0.0))
                        if ok:
                            nxt = c
                        else:
                            # residual w = log max(p' - q_c, 0): its max, its fixed-point mass, then the store
                            m_vec = tl.full([BLOCK], _NEG_INF, tl.float32)
                            for cc in range(0, V, BLOCK):
                                cols = cc + offs
                                mask = cols < V
                                lp = _current_log_p(t_row, t_stride_col, ws_row, cols, mask, t, thr_p, lse_p, taken,
                                                    lse_last)
                                lq = _draft_log_q(d_row, d_stride_col, cols, mask, tok, t, thr_q, lse_q, KIND)
                                w = tl.where(mask, _residual(lp, lq), _NEG_INF)
                                m_vec = tl.maximum(m_vec, w)
                            m = tl.max(m_vec, axis=0)
                            if (m > _NEG_INF) & q_ok:  # else p' == q_c numerically (or skipped): keep p'
                                w_scale, w_unscale = mass_scales(V)
                                acc = tl.zeros([BLOCK], tl.int64)
                                for cc in range(0, V, BLOCK):
                                    cols = cc + offs
                                    mask = cols < V
                                    lp = _current_log_p(t_row, t_stride_col, ws_row, cols, mask, t, thr_p, lse_p,
                                                        taken, lse_last)
                                    lq = _draft_log_q(d_row, d_stride_col, cols, mask, tok, t, thr_q, lse_q, KIND)
                                    w = tl.where(mask, _residual(lp, lq), _NEG_INF)
                                    fin = w > _NEG_INF
                                    acc += fixed_mass(tl.where(fin, tl.exp(tl.where(fin, w, 0.0) - m), 0.0), w_scale)
                                lse_new = lse_from_mass(m, tl.sum(acc, axis=0), w_unscale)
                                tl.debug_barrier()
                                for cc in range(0, V, BLOCK):
                                    cols = cc + offs
                                    mask = cols < V
                                    lp = _current_log_p(t_row, t_stride_col, ws_row, cols, mask, t, thr_p, lse_p,
                                                        taken, lse_last)
                                    lq = _draft_log_q(d_row, d_stride_col, cols, mask, tok, t, thr_q, lse_q, KIND)
                                    w = tl.where(mask, _residual(lp, lq), _NEG_INF)
                                    tl.store(ws_row + cols.to(tl.int64), w, mask=mask)
                                tl.debug_barrier()
                                taken = tl.full([], 1, tl.int32)
                                lse_last = lse_new
                    rank += 1
                c += 1
            # the emitted token: a Gumbel race over the last residual w (unnormalised), or p'
            r4 = tl.arange(0, BLOCK4)[:, None]
            lane = tl.arange(0, 4)[None, :]
            rbest = tl.full([BLOCK4, 4], _NEG_INF, tl.float32)
            rbest_idx = tl.full([BLOCK4, 4], _BIG, tl.int32)
            for base in range(0, V, 4 * BLOCK4):
                ctr = (base // 4 + r4).to(tl.uint32)
                w0, w1, w2, w3 = random_words4(seed_lo, seed_hi, pos_lo, pos_hi, salt_resample, ctr)
                g = gumbel_from_word(select_word(w0, w1, w2, w3, lane))
                rcols = base + r4 * 4 + lane
                rmask = rcols < V
                rtk = (tl.zeros(rcols.shape, tl.int32) + taken) != 0
                rx = tl.load(t_row + rcols.to(tl.int64) * t_stride_col, mask=rmask & (~rtk), other=0.0).to(tl.float32)
                rlp = tl.where(rmask, _log_prob(scale_logit(rx, t), thr_p, lse_p), _NEG_INF)
                rw = tl.load(ws_row + rcols.to(tl.int64), mask=rmask & rtk, other=_NEG_INF)
                rwt = tl.where(rtk, tl.where(rmask, rw, _NEG_INF), rlp)
                sc = tl.where(rwt > _NEG_INF, rwt + g, _NEG_INF)
                rupd = sc > rbest
                rbest = tl.where(rupd, sc, rbest)
                rbest_idx = tl.where(rupd, rcols, rbest_idx)
            mx = tl.max(tl.max(rbest, axis=1), axis=0)
            win = tl.min(tl.min(tl.where((rbest == mx) & (rbest > _NEG_INF), rbest_idx, _BIG), axis=1), axis=0)
            emitted = tl.where(win < V, win, 0).to(tl.int64)
        if nxt >= 0:
            tok = tl.load(drafts_ptr + start + nxt).to(tl.int32)
            out_vec = tl.where(jj == accepted, tok, out_vec)
            accepted += 1
            path_vec = tl.where(jj == accepted, (nxt + 1).to(tl.int32), path_vec)
            node = nxt
            d += 1
        else:
            done = tl.full([], 1, tl.int32)
    out_vec = tl.where(jj == accepted, emitted.to(tl.int32), out_vec)
    jmask = jj < W
    tl.store(path_ptr + b * W + jj, path_vec.to(tl.int32), mask=jmask)
    tl.store(out_ptr + b * W + jj, out_vec, mask=jmask)
    tl.store(num_acc_ptr + b, accepted.to(tl.int32))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def verify_tree(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    cu_num_draft: torch.Tensor,
    draft_logits: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    max_depth: int = 0,
    min_p: torch.Tensor | None = None,
    draft_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backend of ``dspark_kernels.verify_tree`` (arguments already validated).

    Rows may be strided in both dimensions (nothing is copied). Workspace: one fp32 row
    of V entries per request (the current residual). Returns ``accept_path``,
    ``num_accepted``, ``output_tokens``; every element is written by the kernel.
    """
    device = target_logits.device
    batch = cu_num_draft.shape[0] - 1
    width = int(max_depth) + 1
    path = torch.empty((max(batch, 0), width), dtype=torch.int32, device=device)
    out = torch.empty((max(batch, 0), width), dtype=torch.int32, device=device)
    num_accepted = torch.empty((max(batch, 0),), dtype=torch.int32, device=device)
    if batch <= 0:
        return path, num_accepted, out
    vocab = target_logits.shape[1]
    temp = temperature.to(torch.float32) if temperature is not None else None
    topp = top_p.to(torch.float32) if top_p is not None else None
    if draft_probs is not None:
        kind, draft = _KIND_PROBS, draft_probs
    elif draft_logits is not None:
        kind, draft = _KIND_LOGITS, draft_logits
    else:
        kind, draft = _KIND_POINT, target_logits
    sampling = temp is not None
    ws = torch.empty((batch, vocab) if sampling else (1,), dtype=torch.float32, device=device)
    interp = _interpreting()
    block = min(256 if not interp else 4096, max(16, triton.next_power_of_2(vocab)))
    block4 = max(4, min(64 if not interp else 1024, triton.next_power_of_2(vocab) // 4))
    dummy = ws
    _tree_kernel[(batch,)](
        target_logits, target_logits.stride(0), target_logits.stride(1),
        draft, draft.stride(0), draft.stride(1),
        draft_tokens, parents, draft_tokens.shape[0], cu_num_draft,
        temp if temp is not None else dummy, top_k if top_k is not None else cu_num_draft,
        topp if topp is not None else dummy, seed.to(torch.int64), offset.to(torch.int64),
        vocab, width, int(max_depth), ws, path, num_accepted, out,
        min_p_log_tensor(min_p) if min_p is not None else dummy,
        draft_index if draft_index is not None else cu_num_draft, draft.shape[0],
        KIND=kind, HAS_TEMP=temp is not None, HAS_TOPK=top_k is not None, HAS_TOPP=topp is not None,
        HAS_MINP=min_p is not None, HAS_DIDX=draft_index is not None,
        BLOCK=block, BLOCK4=block4, BLOCK_W=triton.next_power_of_2(width), RADIX_BITS=4 if not interp else 8,
        num_warps=8 if not interp else 1,
    )
    return path, num_accepted, out
