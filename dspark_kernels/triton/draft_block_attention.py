"""draft_block_attention in Triton (docs/attention.md): FlashAttention-style, one pass over K / V.

Grid ``(B * Hkv, tiles)``. Program ``(b * Hkv + g, t)`` serves kv head ``g`` of
request ``b``: every query head of the group ``h = g * G .. g * G + G - 1``
(``G = H / Hkv``) shares that kv head, so the ``n_b * G`` (query token, head)
pairs of the group are flattened into the M dimension of one tile
(``row = i * G + hh`` for block row ``i`` and head ``g * G + hh``: for a contiguous
``q`` a tile reads consecutive heads of consecutive tokens). Each K / V tile is
loaded once for all ``G`` heads of its group (MQA: ``G = H`` heads per load). With
``tiles = cdiv(max_block_len * G, BLOCK_M)`` the tile loop is grid-strided
(``for m0 in range(t * BLOCK_M, n_b * G, tiles * BLOCK_M)``), so every row is
written even if ``max_block_len`` were too small (it only sizes the grid), and
tiles past a short block's end do nothing.

Per tile, an online softmax in base 2 (``s = q.k * scale * log2(e)``):

1. the running max / sum start at the sink (``m = sinks[h] * log2(e)``, ``l = 1``)
   or at ``(-inf, 0)`` without sinks;
2. the visible context: positions ``L - n_vis + j`` (``n_vis = min(L, W, window)``),
   ``j < n_vis`` in chunks of ``BLOCK_N``, each key row gathered from slot
   ``(L - n_vis + j) % W`` of the circular cache (one contiguous ``D`` vector per
   key), the tail of the last chunk masked;
3. the block's own rows ``cu[b] .. cu[b+1] - 1``, non-causal, in chunks of ``BLOCK_N``.

Every chunk holds at least one valid key, so the running max is finite after the
first chunk and no ``-inf - -inf`` arises. ``out = acc / l`` is stored in q's dtype.
Non-finite input makes the row NaN (docs/attention.md): ``s * 0`` of every raw score
is added into ``l``, ``sinks[h] * 0`` into its start, ``acc * 0`` at the end.

Numerics: ``q.k`` and ``p.v`` are ``tl.dot`` with fp32 accumulation; fp32 inputs
use ``input_precision="ieee"`` (no TF32, matching PyTorch's default for fp32
matmuls); ``p`` is rounded to the value dtype before ``p.v`` (as FlashAttention).
``D`` is padded to the next power of two (at least 16) with masked loads, so
``D = 80, 192`` work. Addresses are 64-bit; every tensor is addressed through its
strides (any strides, no copies). ``cu_block`` and ``ctx_lens`` are clamped
(``0 <= cu <= T``, ``L >= 0``): a kernel never reads or writes out of bounds,
whatever the input.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 512


@triton.jit
def _attend_chunk(q, k_t, v, key_ok, acc, m_i, l_i, qk_scale, FP32: tl.constexpr):
    """One online-softmax step: q [M, D], k_t [D, N], v [N, D], key_ok [N]."""
    if FP32:
        s = tl.dot(q, k_t, input_precision="ieee")
    else:
        s = tl.dot(q, k_t)
    # s_raw * 0 is 0 for a finite score and NaN for a NaN / +-inf one (a non-finite q or
    # key): folded into l it makes the row NaN (docs/attention.md), at the cost of one
    # add per score; a -inf score would otherwise just drop its key.
    bad = s * 0.0
    s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p + bad, axis=1)
    acc = acc * alpha[:, None]
    if FP32:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _draft_block_attn_kernel(
    q_ptr, sq_t, sq_h, sq_d,
    kb_ptr, skb_t, skb_h, skb_d,
    vb_ptr, svb_t, svb_h, svb_d,
    kc_ptr, skc_b, skc_w, skc_h, skc_d,
    vc_ptr, svc_b, svc_w, svc_h, svc_d,
    o_ptr, so_t, so_h, so_d,
    cu_ptr, lens_ptr, sinks_ptr,
    num_tokens, num_kv_heads, cache_window, limit, qk_scale, num_tiles,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SINKS: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bg // num_kv_heads
    g = pid_bg % num_kv_heads

    # Request b's block rows [c0, c1) and context length, clamped to what exists.
    c0 = tl.minimum(tl.maximum(tl.load(cu_ptr + b).to(tl.int64), 0), num_tokens)
    c1 = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1).to(tl.int64), c0), num_tokens)
    n = (c1 - c0).to(tl.int32)
    ctx_len = tl.maximum(tl.load(lens_ptr + b).to(tl.int64), 0)
    n_vis = tl.minimum(ctx_len, limit).to(tl.int32)     # limit = min(W, window) >= 0
    pos0 = ((ctx_len - n_vis) % cache_window).to(tl.int32)  # slot of the oldest visible position
    rows = n * G

    # 64-bit scalar bases (request, kv head); 32-bit offsets inside one request's rows.
    q_base = q_ptr + c0 * sq_t
    o_base = o_ptr + c0 * so_t
    kc_base = kc_ptr + b.to(tl.int64) * skc_b + g.to(tl.int64) * skc_h
    vc_base = vc_ptr + b.to(tl.int64) * svc_b + g.to(tl.int64) * svc_h
    kb_base = kb_ptr + c0 * skb_t + g.to(tl.int64) * skb_h
    vb_base = vb_ptr + c0 * svb_t + g.to(tl.int64) * svb_h

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    for m0 in range(pid_m * BLOCK_M, rows, num_tiles * BLOCK_M):
        r = m0 + offs_m
        r_ok = r < rows
        head = g * G + r % G
        q_offs = (r // G)[:, None] * sq_t + head[:, None] * sq_h + offs_d[None, :] * sq_d
        q_mask = r_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + q_offs, mask=q_mask, other=0.0)
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + head, mask=r_ok, other=0.0).to(tl.float32)
            m_i = sink * 1.4426950408889634
            # a NaN / +inf sink makes the row NaN; -inf is no sink (exp(-inf) = 0)
            l_i = 1.0 + tl.where(sink == float("-inf"), 0.0, sink * 0.0)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # 1. the visible context, read from the circular window cache
        for j0 in range(0, n_vis, BLOCK_N):
            j = j0 + offs_n
            j_ok = j < n_vis
            slot = (pos0 + j) % cache_window
            k_t = tl.load(kc_base + slot[None, :] * skc_w + offs_d[:, None] * skc_d,
                          mask=j_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(vc_base + slot[:, None] * svc_w + offs_d[None, :] * svc_d,
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            acc, m_i, l_i = _attend_chunk(q, k_t, v, j_ok, acc, m_i, l_i, qk_scale, FP32)

        # 2. the block's own keys, non-causal
        for j0 in range(0, n, BLOCK_N):
            j = j0 + offs_n
            j_ok = j < n
            k_t = tl.load(kb_base + j[None, :] * skb_t + offs_d[:, None] * skb_d,
                          mask=j_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(vb_base + j[:, None] * svb_t + offs_d[None, :] * svb_d,
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            acc, m_i, l_i = _attend_chunk(q, k_t, v, j_ok, acc, m_i, l_i, qk_scale, FP32)

        # a non-finite value leaves acc non-finite in some entries: the whole row is NaN
        out = acc / (l_i + tl.sum(acc * 0.0, axis=1))[:, None]
        o_offs = (r // G)[:, None] * so_t + head[:, None] * so_h + offs_d[None, :] * so_d
        tl.store(o_base + o_offs, out.to(o_ptr.dtype.element_ty), mask=q_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _alloc_out(num_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The output buffer (tests replace this to poison it with NaN)."""
    return torch.empty((num_tokens, num_heads, head_dim), dtype=dtype, device=device)


def _num_sms(device: torch.device) -> int:
    try:
        return torch.cuda.get_device_properties(device).multi_processor_count
    except (RuntimeError, AssertionError, AttributeError):
        return 132


# (BLOCK_M, BLOCK_N, num_warps) by padded head dim, for 16-bit and fp32 inputs. Chosen by
# compiling for sm_90a (triton 3.8, unit stride along D) and keeping every
# configuration within 255 registers without spills and under ~100 KB of shared
# memory; not yet tuned on a GPU.
_CONFIGS_16 = {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 64, 8), 256: (64, 32, 8),
               512: (32, 32, 8)}
_CONFIGS_32 = {16: (32, 32, 4), 32: (32, 32, 4), 64: (32, 32, 4), 128: (16, 32, 4), 256: (16, 16, 8),
               512: (16, 16, 8)}


def launch_config(head_dim: int, elem_size: int, rows_per_request: int, programs_per_tile: int,
                  device: torch.device) -> dict:
    """Tile sizes and launch options (a heuristic: the kernel is correct with any).

    ``BLOCK_D = next_pow2(D)`` (at least 16); BLOCK_M / BLOCK_N / warps from the
    tables above; BLOCK_M is then halved (down to 16) while the grid
    (``programs_per_tile`` x tiles per request) would leave SMs idle, so a single
    MQA request still spreads over several SMs.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=1, num_stages=1)
    block_m, block_n, num_warps = (_CONFIGS_32 if elem_size >= 4 else _CONFIGS_16)[block_d]
    sms = _num_sms(device)
    while block_m > 16 and programs_per_tile * triton.cdiv(rows_per_request, block_m) < sms:
        block_m //= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=2)


def draft_block_attention(
    q: torch.Tensor,
    k_block: torch.Tensor,
    v_block: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    cu_block: torch.Tensor,
    ctx_lens: torch.Tensor,
    sinks: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    window: int | None = None,
    max_block_len: int = 0,
    *,
    _config: dict | None = None,
) -> torch.Tensor:
    """Triton backend of ``dspark_kernels.draft_block_attention`` (arguments validated).

    Shapes as there: ``q [T, H, D]``, ``k_block / v_block [T, Hkv, D]``,
    ``k_ctx / v_ctx [B, W, Hkv, D]``, ``cu_block [B + 1]``, ``ctx_lens [B]``,
    ``sinks [H]`` or None; any strides. ``max_block_len`` (>= the longest block)
    sizes the grid: no host synchronisation, CUDA-graph safe. ``_config`` overrides
    the launch configuration (tests).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_block.shape[1]
    group = num_heads // num_kv_heads
    batch, cache_window = k_ctx.shape[0], k_ctx.shape[1]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"draft_block_attention: the triton backend supports head dims up to {MAX_HEAD_DIM}, "
                         f"got q of shape {tuple(q.shape)}")
    out = _alloc_out(num_tokens, num_heads, head_dim, q.dtype, q.device)
    if num_tokens == 0 or batch == 0 or num_heads == 0:
        return out
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    limit = cache_window if window is None else max(0, min(cache_window, int(window)))
    rows = max(int(max_block_len), 1) * group
    cfg = dict(launch_config(head_dim, q.element_size(), rows, batch * num_kv_heads, q.device))
    cfg.update(_config or {})
    num_tiles = max(1, min(triton.cdiv(rows, cfg["BLOCK_M"]), 65535))
    grid = (batch * num_kv_heads, num_tiles)
    _draft_block_attn_kernel[grid](
        q, *q.stride(),
        k_block, *k_block.stride(),
        v_block, *v_block.stride(),
        k_ctx, *k_ctx.stride(),
        v_ctx, *v_ctx.stride(),
        out, *out.stride(),
        cu_block, ctx_lens, sinks if sinks is not None else ctx_lens,
        num_tokens, num_kv_heads, max(cache_window, 1), limit, scale * _LOG2E, num_tiles,
        G=group, HEAD_DIM=head_dim, HAS_SINKS=sinks is not None, FP32=q.dtype == torch.float32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
