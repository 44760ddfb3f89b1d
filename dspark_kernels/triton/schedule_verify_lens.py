"""schedule_verify_lens in Triton (docs/drafting.md): the same integers as the reference.

The arithmetic is the one of ``csrc/include/dspark/schedule.h`` (fp32 survivals,
64-bit sort keys, tau summed exactly in 2^-40 fixed point, Theta in fp64). Because
the fixed-point sum of any set of candidates does not depend on the order it is
taken in, the scan of Algorithm 1 needs no sort: candidate ``e`` learns its place
in the order and the sum of everything before it by comparing its key with every
other key (``O(n^2 / P)`` for ``n = R * gamma`` candidates on ``P`` lanes — a few
microseconds at engine sizes, n <= 7680 for R = 512, gamma = 15), and from those it
knows Theta before and after its own admission. Three launches, no host sync
(every grid comes from shapes):

1. ``_survival_kernel``  one lane per request: the running products, the key and the
   quantised survival of every candidate;
2. ``_rank_kernel``      grid over candidate tiles: rank (number of candidates
   before it) and prefix sum by comparison with every tile of keys; Theta before
   and after its admission; per tile, the lossless stop candidate (the smallest
   rank whose admission does not improve Theta) or the async best (largest Theta
   after admission, smallest k on ties);
3. ``_finish_kernel``    one program: merges the tiles in a fixed order into the
   admitted count k*, then ``verify_lens[r] = #{j : rank(r, j) < k*}`` and the
   offsets.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _survival_kernel(conf_ptr, stride_r, stride_j, R, GAMMA, key_ptr, q_ptr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    a = tl.full([BLOCK_R], 1.0, tl.float32)
    for j in range(0, GAMMA):
        c = tl.load(conf_ptr + rows * stride_r + j * stride_j, mask=rmask, other=0.0).to(tl.float32)
        c = tl.where(c > 0.0, tl.minimum(c, 1.0), 0.0)  # NaN and negatives -> 0
        a = a * c
        e = rows * GAMMA + j
        bits = a.to(tl.int32, bitcast=True).to(tl.int64)  # a >= +0: the bits are non-negative
        key = (bits << 32) | (4294967295 - e)
        q = (a.to(tl.float64) * 1099511627776.0).to(tl.int64)  # floor(a * 2^40), exact
        tl.store(key_ptr + e, key, mask=rmask)
        tl.store(q_ptr + e, q, mask=rmask)


@triton.jit
def _rank_kernel(key_ptr, q_ptr, sps_ptr, n, R, KMAX, rank_ptr, part_k_ptr, part_theta_ptr,
                 EARLY_STOP: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    e = pid.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < n
    ke = tl.load(key_ptr + e, mask=emask, other=-1)
    qe = tl.load(q_ptr + e, mask=emask, other=0)
    cnt = tl.zeros([BLOCK_E], tl.int64)
    acc = tl.zeros([BLOCK_E], tl.int64)
    for t0 in range(0, n, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < n
        kt = tl.load(key_ptr + t, mask=tmask, other=-1)  # below every key: never before e
        qt = tl.load(q_ptr + t, mask=tmask, other=0)
        before = kt[None, :] > ke[:, None]
        cnt += tl.sum(before.to(tl.int64), axis=1)
        acc += tl.sum(tl.where(before, qt[None, :], 0), axis=1)
    rank = cnt
    tl.store(rank_ptr + e, rank.to(tl.int32), mask=emask)
    ok = emask & (rank < KMAX)
    tau_before = tl.full([], 1099511627776, tl.int64) * R + acc
    tau_after = tau_before + qe
    sps_after = tl.load(sps_ptr + R + rank + 1, mask=ok, other=0.0).to(tl.float64)
    theta_after = tau_after.to(tl.float64) * sps_after
    if EARLY_STOP:
        sps_before = tl.load(sps_ptr + R + rank, mask=ok, other=0.0).to(tl.float64)
        theta_before = tau_before.to(tl.float64) * sps_before
        stop = ok & ~(theta_after > theta_before)  # NaN never improves
        tl.store(part_k_ptr + pid, tl.min(tl.where(stop, rank, KMAX), axis=0))
    else:
        th = tl.where(ok & (theta_after == theta_after), theta_after, _NEG_INF)
        best = tl.max(th, axis=0)
        k = tl.min(tl.where(ok & (th == best), rank + 1, 2147483647), axis=0)
        tl.store(part_theta_ptr + pid, best)
        tl.store(part_k_ptr + pid, k)


@triton.jit
def _finish_kernel(rank_ptr, sps_ptr, part_k_ptr, part_theta_ptr, num_parts, R, GAMMA, KMAX,
                   lens_ptr, cu_ptr, EARLY_STOP: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    # ---- the admitted count k*, tiles merged in index order
    offs = tl.arange(0, BLOCK_P)
    if EARLY_STOP:
        kstar = tl.zeros([], tl.int64) + KMAX
        for p0 in range(0, num_parts, BLOCK_P):
            p = p0 + offs
            ks = tl.load(part_k_ptr + p, mask=p < num_parts, other=2147483647)
            kstar = tl.minimum(kstar, tl.min(ks, axis=0))
    else:
        best = (tl.full([], 1099511627776, tl.int64) * R).to(tl.float64) * tl.load(sps_ptr + R).to(tl.float64)
        kstar = tl.zeros([], tl.int64)
        for p0 in range(0, num_parts, BLOCK_P):
            p = p0 + offs
            pm = p < num_parts
            th = tl.load(part_theta_ptr + p, mask=pm, other=_NEG_INF)
            ks = tl.load(part_k_ptr + p, mask=pm, other=2147483647)
            tmax = tl.max(th, axis=0)
            tk = tl.min(tl.where(pm & (th == tmax), ks, 2147483647), axis=0)
            upd = (tmax > best) | ((tmax == best) & (tk < kstar))
            best = tl.where(upd, tmax, best)
            kstar = tl.where(upd, tk, kstar)
    # ---- verify_lens and the offsets
    tl.store(cu_ptr, 0)
    carry = tl.zeros([], tl.int32)
    rr = tl.arange(0, BLOCK_R)
    jj = tl.arange(0, BLOCK_G)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + rr
        rmask = rows < R
        lens = tl.zeros([BLOCK_R], tl.int32)
        for j0 in range(0, GAMMA, BLOCK_G):
            j = j0 + jj
            m = rmask[:, None] & (j < GAMMA)[None, :]
            rk = tl.load(rank_ptr + rows.to(tl.int64)[:, None] * GAMMA + j[None, :], mask=m, other=2147483647)
            lens += tl.sum((m & (rk < kstar)).to(tl.int32), axis=1)
        cs = tl.cumsum(lens, axis=0) + carry
        tl.store(lens_ptr + rows, lens, mask=rmask)
        tl.store(cu_ptr + 1 + rows, cs, mask=rmask)
        carry = carry + tl.sum(lens, axis=0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def schedule_verify_lens(confidence: torch.Tensor, sps: torch.Tensor, early_stop: bool = True,
                         *, _block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``dspark_kernels.schedule_verify_lens`` (arguments already validated).

    ``confidence [R, gamma]`` any float dtype and strides (fp64 is rounded to fp32 first),
    ``sps [Bmax + 1]`` any float dtype (read as fp64). Returns ``verify_lens [R]`` and
    ``cu_verify [R + 1]`` int32. ``_block`` (tests) sets the candidate tile size.
    """
    device = confidence.device
    num_req, gamma = confidence.shape
    n = num_req * gamma
    bmax = sps.shape[0] - 1
    kmax = max(0, min(n, bmax - num_req))
    if confidence.dtype == torch.float64:
        confidence = confidence.to(torch.float32)
    table = sps.to(torch.float64)
    lens = torch.empty(num_req, dtype=torch.int32, device=device)
    cu = torch.empty(num_req + 1, dtype=torch.int32, device=device)
    interp = _interpreting()
    block = _block or (256 if interp else 64)
    keys = torch.empty(max(n, 1), dtype=torch.int64, device=device)
    quant = torch.empty(max(n, 1), dtype=torch.int64, device=device)
    rank = torch.empty(max(n, 1), dtype=torch.int32, device=device)
    num_parts = triton.cdiv(n, block)
    part_k = torch.empty(max(num_parts, 1), dtype=torch.int64, device=device)
    part_theta = torch.empty(max(num_parts, 1), dtype=torch.float64, device=device)
    warps = 1 if interp else 4
    if n > 0:
        block_r = 64 if not interp else 256
        _survival_kernel[(triton.cdiv(num_req, block_r),)](
            confidence, confidence.stride(0), confidence.stride(1), num_req, gamma, keys, quant,
            BLOCK_R=block_r, num_warps=warps)
        _rank_kernel[(num_parts,)](
            keys, quant, table, n, num_req, kmax, rank, part_k, part_theta,
            EARLY_STOP=bool(early_stop), BLOCK_E=block, BLOCK_T=block, num_warps=warps)
    _finish_kernel[(1,)](
        rank, table, part_k, part_theta, num_parts, num_req, gamma, kmax, lens, cu,
        EARLY_STOP=bool(early_stop), BLOCK_P=min(1024, triton.next_power_of_2(max(num_parts, 1))),
        BLOCK_R=min(256, triton.next_power_of_2(max(num_req, 1))),
        BLOCK_G=min(16, triton.next_power_of_2(max(gamma, 1))), num_warps=warps)
    return lens, cu
