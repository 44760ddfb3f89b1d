"""Top-k / top-p thresholds in Triton, shared by verify_block and draft_sample_block.

The rules are those of ``reference/sampling.py`` (and ``csrc/cpu/row_ops.h``):
top-k keeps scaled logits ``s >= `` the k-th largest; top-p then keeps the kept
tokens whose strictly-greater mass is below ``top_p``. Both are thresholds on
``s``, found here without sorting: a radix search over the order-preserving int
key of fp32 (``RADIX_BITS`` bits per pass, ``32 / RADIX_BITS`` passes over the
row), exact for top-k (integer counts) and for top-p with the fixed-point masses of
docs/verification.md ("Order-independent sums"): ``E_v = trunc(exp_fp32(s_v - m) * 2^K)``
as int64, ``K = 62 - bit_length(V - 1)``, summed exactly in any order (``mass_scales``,
``fixed_mass``, ``lse_from_mass``: the reference's ``sampling.py`` helpers, which every
log-sum-exp of the Triton kernels uses too).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..reference.sampling import min_p_log_tensor  # noqa: F401 - re-exported for the launchers (one copy)

_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))


@triton.jit
def scale_logit(x, t):
    """``s = x / t`` (IEEE division) with the non-finite rules of sampling.h: NaN -> -inf,
    +-inf stay +-inf (also at t = +inf)."""
    s = tl.where((x == _POS_INF) | (x == _NEG_INF), x, tl.math.div_rn(x, t))
    return tl.where(x != x, _NEG_INF, s)


@triton.jit
def key_to_float(key):
    """Inverse of the order-preserving key ``(bits >= 0 ? bits : bits ^ 0x7fffffff) + 2^31``."""
    k = (key - 2147483648).to(tl.int32)
    bits = tl.where(k >= 0, k, k ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _float_key(s):
    # -0.0 is taken as +0.0, so equal values have equal keys.
    bits = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648


@triton.jit
def mass_scales(V):
    """``(2^K as fp32, 2^-K as fp64)`` with ``K = 62 - bit_length(max(V - 1, 1))``
    (reference ``sampling.mass_fraction_bits``): ``V`` fixed-point terms ``<= 1`` sum below
    2^62. Both are built from their exponent bits (exact powers of two, no libm)."""
    vm1 = tl.maximum(tl.zeros([], tl.int64) + V - 1, 1)
    bit_length = tl.sum(((vm1 >> tl.arange(0, 64).to(tl.int64)) > 0).to(tl.int32), axis=0)
    k = 62 - bit_length
    scale = ((k + 127) << 23).to(tl.int32).to(tl.float32, bitcast=True)
    unscale = ((1023 - k).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    return scale, unscale


@triton.jit
def fixed_mass(e, scale):
    """``trunc(e * 2^K)`` as int64 for fp32 ``e`` in ``[0, 1]`` (the product is exact in fp32;
    the conversion truncates toward zero): reference ``sampling.fixed_mass``."""
    return (e * scale).to(tl.int64)


@triton.jit
def lse_from_mass(m, total, unscale):
    """``m + float32(log(float64(total) * 2^-K))`` in fp32 (reference ``sampling.lse_from_mass``)
    for a row whose largest kept scaled logit is ``m`` and fixed-point mass ``total > 0``;
    -inf where ``total`` is 0 (nothing kept)."""
    z = tl.where(total > 0, total, 1).to(tl.float64) * unscale
    return tl.where(total > 0, m + tl.log(z).to(tl.float32), _NEG_INF)


@triton.jit
def top_k_threshold(row_ptr, stride, V, t, k, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """The k-th largest scaled logit ``x / t`` of a row: the largest key with count(key >= it) >= k."""
    RADIX: tl.constexpr = 1 << RADIX_BITS
    NPASS: tl.constexpr = 32 // RADIX_BITS
    offs = tl.arange(0, BLOCK)
    digits = tl.arange(0, RADIX).to(tl.int64)
    prefix = tl.zeros([], tl.int64)
    for ps in range(NPASS):
        shift = 32 - (ps + 1) * RADIX_BITS
        cand = prefix + (digits << shift)
        cnt2 = tl.zeros([BLOCK, RADIX], tl.int32)  # per lane, reduced once per pass
        for c0 in range(0, V, BLOCK):
            cols = c0 + offs
            mask = cols < V
            x = tl.load(row_ptr + cols.to(tl.int64) * stride, mask=mask, other=0.0).to(tl.float32)
            s = scale_logit(x, t)
            key = tl.where(mask & (s == s), _float_key(s), -1)  # NaN never counts
            cnt2 += (key[:, None] >= cand[None, :]).to(tl.int32)
        cnt = tl.sum(cnt2, axis=0)
        j = tl.max(tl.where(cnt >= k, digits, 0), axis=0)
        prefix = prefix + (j << shift)
    return key_to_float(prefix)


@triton.jit
def top_p_threshold(row_ptr, stride, V, t, thr, safe_m, p, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Top-p over the tokens kept by ``thr`` (the top-k threshold, or -inf): the largest key
    with ``float64(mass(key >= it)) >= float64(p) * float64(total)``, masses the int64
    fixed-point ``E_v`` of ``exp(s - safe_m)`` (``safe_m`` the row max, the largest kept
    value), exact in any order. Returns ``thr`` unchanged when nothing is kept (an all -inf
    row), +inf for a row whose max is +inf."""
    RADIX: tl.constexpr = 1 << RADIX_BITS
    NPASS: tl.constexpr = 32 // RADIX_BITS
    scale, _unscale = mass_scales(V)
    offs = tl.arange(0, BLOCK)
    digits = tl.arange(0, RADIX).to(tl.int64)
    prefix = tl.zeros([], tl.int64)
    total = tl.zeros([], tl.int64)
    for ps in range(NPASS):
        shift = 32 - (ps + 1) * RADIX_BITS
        cand = prefix + (digits << shift)
        mass2 = tl.zeros([BLOCK, RADIX], tl.int64)  # per lane, reduced once per pass
        for c0 in range(0, V, BLOCK):
            cols = c0 + offs
            mask = cols < V
            x = tl.load(row_ptr + cols.to(tl.int64) * stride, mask=mask, other=0.0).to(tl.float32)
            s = scale_logit(x, t)
            kept = mask & (s >= thr) & (s > _NEG_INF)
            # +inf entries (a +inf row, answered below) weigh nothing here: never inf - inf.
            fin = kept & (s < _POS_INF)
            e = fixed_mass(tl.where(fin, tl.exp(tl.where(fin, s, 0.0) - safe_m), 0.0), scale)
            key = tl.where(kept, _float_key(s), -1)
            mass2 += tl.where(key[:, None] >= cand[None, :], e[:, None], 0)
        mass = tl.sum(mass2, axis=0)
        # Pass 0's first candidate is key 0, below every value: its mass is the total.
        total = tl.where(ps == 0, tl.sum(tl.where(digits == 0, mass, 0), axis=0), total)
        target = p.to(tl.float64) * total.to(tl.float64)
        j = tl.max(tl.where(mass.to(tl.float64) >= target, digits, 0), axis=0)
        prefix = prefix + (j << shift)
    # A row whose max is +inf: its +inf entries hold all the mass, keep just them.
    return tl.where(safe_m == _POS_INF, _POS_INF, tl.where(total > 0, key_to_float(prefix), thr))


@triton.jit
def _filter_active(topk_ptr, topp_ptr, b, V, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr):
    """(k, k_active, p, p_active) of request b: top_k in (0, V), top_p in (0, 1) (the
    one copy of the top-k / top-p parameter loads of every sampling kernel)."""
    if HAS_TOPK:
        k = tl.load(topk_ptr + b).to(tl.int64)
    else:
        k = tl.zeros([], tl.int64)
    if HAS_TOPP:
        p = tl.load(topp_ptr + b).to(tl.float32)
    else:
        p = tl.full([], 1.0, tl.float32)
    k_on = (k > 0) & (k < V)
    p_on = (p > 0.0) & (p < 1.0)
    return k, k_on, p, p_on


@triton.jit
def _min_p_log_at(lmp_ptr, b, HAS_MINP: tl.constexpr):
    """min_p_log(min_p[b]) (the launcher takes the fp64 log: sampling.h), -inf when off."""
    if HAS_MINP:
        lmp = tl.load(lmp_ptr + b).to(tl.float32)
    else:
        lmp = tl.full([], _NEG_INF, tl.float32)
    return lmp


@triton.jit
def _min_p_threshold(m, lmp):
    """sampling.h min_p_threshold: m + log(min_p), -inf when off or for a row of -inf."""
    on = (lmp > _NEG_INF) & (m > _NEG_INF)
    return tl.where(on, tl.where(on, m, 0.0) + tl.where(on, lmp, 0.0), _NEG_INF)
