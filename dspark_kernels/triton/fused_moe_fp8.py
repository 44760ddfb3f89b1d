"""fused_moe with fp8 e4m3 block-scaled weights in Triton (DeepSeek-V3 / vLLM ``block_shape``).

The pipeline of ``fused_moe.py`` (align, GEMM1 with gate + up + SiLU-and-mul, GEMM2
with the routed weight, deterministic top-k sum; same schedules, no host sync) with
fp8 operands and two per-token-group quantisation passes:

1. ``_group_quant_kernel`` on ``x``: per token and group of ``bk`` columns,
   ``scale = amax / 448`` and ``q = e4m3(x / scale)`` (IEEE division ``div_rn``,
   round to nearest even by ``_round_e4m3``, saturating), ``x_q`` float8_e4m3fn
   ``[M, H]`` and ``x_s`` float32 ``[M, ceil(H/bk)]``;
2. ``_gemm1_fp8_kernel``: per K tile (``BLOCK_K`` divides ``bk``, so a tile lies in
   one scale group) ``acc += dot(x_q, w_q) · x_s[row] · w_s[col]`` (fp8 operands,
   fp32 partial sums scaled and promoted per K tile, as DeepSeek / vLLM do), then
   ``silu(g) · u`` in fp32, written as float32 ``h [M·k, I]``;
3. ``_group_quant_kernel`` on ``h`` (the dequantised values never exist);
4. ``_gemm2_fp8_kernel``: the same K loop on ``h_q``, ``w2``; routed weight; fp32 ``y``;
5. ``_topk_sum_kernel`` (``fused_moe.py``).

The quantiser rounds in fp32 with integer operations instead of a float → fp8 cast:
the Triton interpreter's cast rounds wrongly when rounding carries into the next
binade (31.1 → 16), while the cast of an exactly representable value is exact
everywhere; so the tests under the interpreter run the same arithmetic as the GPU.

The GEMMs use ``tl.dot`` on fp8 operands (fp8 tensor cores; the interpreter runs
fp8 loads and dots correctly). Triton has no float8_e4m3fn before sm_89 (it
refuses the type at compile time), so there ``fp8_supported`` is false and
``dspark_kernels.moe`` runs the PyTorch implementation instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _moe_common
from ._moe_common import check_config, fused_moe_config, interpreting
from .fused_moe import _num_tiles, _row_block, _row_blocks, _topk_sum_kernel
from .moe_align import moe_align

_SCRATCH_BYTES = 2 * 2**30


@triton.jit
def _round_e4m3(a):
    """The e4m3 value nearest to ``a`` (fp32, ``0 <= a <= 448``), ties to even, as fp32.

    Normal range (``a >= 2^-6``): keep 3 mantissa bits of the fp32 pattern, round to
    nearest even on the 20 dropped ones (a carry moves to the exponent, as it should).
    Subnormal range: multiples of ``2^-9``; ``(a + 2^14) - 2^14`` rounds to them
    (the ulp of fp32 at ``2^14`` is ``2^-9``, round to nearest even)."""
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = bits.to(tl.float32, bitcast=True)
    sub = (a + 16384.0) - 16384.0
    return tl.where(a < 0.015625, sub, normal)


@triton.jit
def _group_quant_kernel(in_ptr, s_im, s_ik, q_ptr, s_qm, sc_ptr, s_sm, K,
                        GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, group): ``q = e4m3(x / (amax / 448))`` and the scale of one group."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    lane = tl.arange(0, BLOCK)
    offs = g * GROUP + lane
    ok = (lane < GROUP) & (offs < K)
    v = tl.load(in_ptr + row * s_im + offs.to(tl.int64) * s_ik, mask=ok, other=0.0).to(tl.float32)
    a = tl.abs(v)
    scale = tl.math.div_rn(tl.max(a, axis=0), 448.0)
    r = tl.minimum(tl.math.div_rn(a, tl.where(scale > 0, scale, 1.0)), 448.0)
    q = _round_e4m3(r)
    q = tl.where(v < 0, -q, q)
    tl.store(q_ptr + row * s_qm + offs, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(sc_ptr + row * s_sm + g, scale)


@triton.jit
def _gemm1_fp8_tile(pid_m, pid_n, total, xq_ptr, s_xm, xs_ptr, s_xsm, w_ptr, s_we, s_wn, s_wk,
                    ws_ptr, s_se, s_sn, s_sk, h_ptr, s_hm, sorted_ptr, expert_ids_ptr, numel, top_k, K, I,
                    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    live, e, slots, slot_ok, tokens = _row_block(pid_m, total, sorted_ptr, expert_ids_ptr, numel, top_k, BLOCK_M)
    if live:  # no weight byte is loaded for a block without an expert
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = xq_ptr + tokens[:, None] * s_xm + offs_k[None, :]
        as_ptrs = xs_ptr + tokens * s_xsm
        rows_g = offs_n.to(tl.int64)
        rows_u = rows_g + I  # the up half: rows [I, 2I) of w13
        g_ptrs = w_ptr + e * s_we + rows_g[None, :] * s_wn + offs_k[:, None] * s_wk
        u_ptrs = w_ptr + e * s_we + rows_u[None, :] * s_wn + offs_k[:, None] * s_wk
        gs_ptrs = ws_ptr + e * s_se + (rows_g // GROUP_N) * s_sn
        us_ptrs = ws_ptr + e * s_se + (rows_u // GROUP_N) * s_sn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kk * BLOCK_K
            kg = (kk * BLOCK_K) // GROUP_K
            a = tl.load(a_ptrs, mask=slot_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            a_s = tl.load(as_ptrs + kg, mask=slot_ok, other=0.0)
            g_s = tl.load(gs_ptrs + kg * s_sk, mask=n_ok, other=0.0)
            u_s = tl.load(us_ptrs + kg * s_sk, mask=n_ok, other=0.0)
            acc_g += tl.dot(a, g) * a_s[:, None] * g_s[None, :]  # fp32 partial sum of one K tile, scaled
            acc_u += tl.dot(a, u) * a_s[:, None] * u_s[None, :]
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K * s_wk
            u_ptrs += BLOCK_K * s_wk
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(h_ptr + slots[:, None] * s_hm + offs_n[None, :], h, mask=slot_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm1_fp8_kernel(xq_ptr, s_xm, xs_ptr, s_xsm, w_ptr, s_we, s_wn, s_wk, ws_ptr, s_se, s_sn, s_sk, h_ptr, s_hm,
                      sorted_ptr, expert_ids_ptr, post_pad_ptr, numel, top_k, K, I, max_blocks,
                      PERSISTENT: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    total = tl.load(post_pad_ptr)
    if PERSISTENT:
        row_blocks, num_tiles = _num_tiles(total, max_blocks, I, BLOCK_M, BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _gemm1_fp8_tile(tile % row_blocks, tile // row_blocks, total, xq_ptr, s_xm, xs_ptr, s_xsm,
                            w_ptr, s_we, s_wn, s_wk, ws_ptr, s_se, s_sn, s_sk, h_ptr, s_hm,
                            sorted_ptr, expert_ids_ptr, numel, top_k, K, I,
                            GROUP_N, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _gemm1_fp8_tile(tl.program_id(0), tl.program_id(1), total, xq_ptr, s_xm, xs_ptr, s_xsm,
                        w_ptr, s_we, s_wn, s_wk, ws_ptr, s_se, s_sn, s_sk, h_ptr, s_hm,
                        sorted_ptr, expert_ids_ptr, numel, top_k, K, I,
                        GROUP_N, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _gemm2_fp8_tile(pid_m, pid_n, total, hq_ptr, s_hm, hs_ptr, s_hsm, w_ptr, s_we, s_wn, s_wk,
                    ws_ptr, s_se, s_sn, s_sk, y_ptr, s_ym, weights_ptr, sorted_ptr, expert_ids_ptr, numel, top_k,
                    K, N, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    live, e, slots, slot_ok, tokens = _row_block(pid_m, total, sorted_ptr, expert_ids_ptr, numel, top_k, BLOCK_M)
    if live:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = hq_ptr + slots[:, None] * s_hm + offs_k[None, :]
        as_ptrs = hs_ptr + slots * s_hsm
        rows = offs_n.to(tl.int64)
        w_ptrs = w_ptr + e * s_we + rows[None, :] * s_wn + offs_k[:, None] * s_wk
        ws_ptrs = ws_ptr + e * s_se + (rows // GROUP_N) * s_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kk * BLOCK_K
            kg = (kk * BLOCK_K) // GROUP_K
            a = tl.load(a_ptrs, mask=slot_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            a_s = tl.load(as_ptrs + kg, mask=slot_ok, other=0.0)
            b_s = tl.load(ws_ptrs + kg * s_sk, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * s_wk
        wt = tl.load(weights_ptr + slots, mask=slot_ok, other=0.0).to(tl.float32)
        acc = acc * wt[:, None]
        tl.store(y_ptr + slots[:, None] * s_ym + offs_n[None, :], acc, mask=slot_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm2_fp8_kernel(hq_ptr, s_hm, hs_ptr, s_hsm, w_ptr, s_we, s_wn, s_wk, ws_ptr, s_se, s_sn, s_sk,
                      y_ptr, s_ym, weights_ptr, sorted_ptr, expert_ids_ptr, post_pad_ptr, numel, top_k, K, N,
                      max_blocks, PERSISTENT: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    total = tl.load(post_pad_ptr)
    if PERSISTENT:
        row_blocks, num_tiles = _num_tiles(total, max_blocks, N, BLOCK_M, BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _gemm2_fp8_tile(tile % row_blocks, tile // row_blocks, total, hq_ptr, s_hm, hs_ptr, s_hsm,
                            w_ptr, s_we, s_wn, s_wk, ws_ptr, s_se, s_sn, s_sk, y_ptr, s_ym, weights_ptr,
                            sorted_ptr, expert_ids_ptr, numel, top_k, K, N,
                            GROUP_N, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _gemm2_fp8_tile(tl.program_id(0), tl.program_id(1), total, hq_ptr, s_hm, hs_ptr, s_hsm,
                        w_ptr, s_we, s_wn, s_wk, ws_ptr, s_se, s_sn, s_sk, y_ptr, s_ym, weights_ptr,
                        sorted_ptr, expert_ids_ptr, numel, top_k, K, N,
                        GROUP_N, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K)


def fp8_supported(device: torch.device) -> bool:
    """Triton's float8_e4m3fn (loads, stores, fp8 MMA): sm_89 and newer, and the interpreter."""
    if interpreting() or device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_groups(t: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-row group quantisation of ``t [R, K]`` (any float dtype, any strides):
    ``(q float8_e4m3fn [R, K], scale float32 [R, ceil(K/group)])``, bit-identical to
    ``reference.moe.quantize_fp8_groups``."""
    rows, k = t.shape
    groups = triton.cdiv(k, group)
    q = torch.empty((rows, k), dtype=torch.float8_e4m3fn, device=t.device)
    s = torch.empty((rows, groups), dtype=torch.float32, device=t.device)
    if rows and k:
        _group_quant_kernel[(rows, groups)](t, t.stride(0), t.stride(1), q, q.stride(0), s, s.stride(0), k,
                                            GROUP=group, BLOCK=triton.next_power_of_2(group),
                                            num_warps=4 if not interpreting() else 1)
    return q, s


def fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                  block_shape: tuple[int, int] = (128, 128), activation: str = "silu", *,
                  config: dict | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """Triton fp8 fused_moe (see ``dspark_kernels.fused_moe``; needs ``fp8_supported``).
    ``config``: a launch config (else the bf16 heuristic with 1-byte weights), ``BLOCK_K``
    lowered to divide ``block_k``. ``chunk_tokens``: tokens per chunk."""
    if activation != "silu":
        raise ValueError(f"fused_moe: activation must be 'silu', got {activation!r}")
    gn, gk = (int(v) for v in block_shape)
    M, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    top_k = topk_ids.shape[1]
    out = torch.empty((M, H), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if top_k == 0 or I == 0:
        return out.zero_()
    cfg = check_config(config, "fused_moe") if config else fused_moe_config(M, E, H, I, top_k, torch.float8_e4m3fn)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    # The largest power of two dividing block_k, at least 32 (Triton's 8-bit tl.dot needs
    # K >= 32 on NVIDIA GPUs) and at most max(BLOCK_K, 32).
    bk = min(max(cfg["BLOCK_K"], 32), gk & -gk)
    if bk < 32:
        raise ValueError(f"fused_moe: the Triton fp8 kernel needs block_shape[1] (block_k) to be a multiple of 32 "
                         f"(8-bit tl.dot needs K >= 32), got {gk}")
    if bn < 32:
        raise ValueError(f"fused_moe: config BLOCK_N must be >= 32 (two halves of >= 16), got {bn}")
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    persistent = _moe_common.schedule_for(cfg, M * top_k, E)

    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    weights = topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous()
    xq, xs = quantize_groups(x, gk)
    per_token = top_k * (H * 4 + I * 5 + triton.cdiv(I, gk) * 4)
    chunk = min(chunk_tokens or max(1, _SCRATCH_BYTES // per_token), M)
    h = torch.empty((chunk * top_k, I), dtype=torch.float32, device=x.device)
    y = torch.empty((chunk * top_k, H), dtype=torch.float32, device=x.device)
    sum_block = 1024 if not interpreting() else 128
    s13, s2 = w13_scale.stride(), w2_scale.stride()
    for c0 in range(0, M, chunk):
        c1 = min(M, c0 + chunk)
        xqc, xsc, idc, wc = xq[c0:c1], xs[c0:c1], ids[c0:c1], weights[c0:c1]
        numel = (c1 - c0) * top_k
        sorted_ids, expert_ids, post_pad = moe_align(idc, E, bm)
        blocks = _row_blocks(numel, E, bm, expert_ids.numel())
        n1, n2 = triton.cdiv(I, bn // 2), triton.cdiv(H, bn)
        grid1 = _moe_common.gemm_grid(persistent, blocks, n1, cfg, 1, x.device)
        grid2 = _moe_common.gemm_grid(persistent, blocks, n2, cfg, 1, x.device)
        _gemm1_fp8_kernel[grid1](
            xqc, xqc.stride(0), xsc, xsc.stride(0), w13, w13.stride(0), w13.stride(1), w13.stride(2),
            w13_scale, s13[0], s13[1], s13[2], h, h.stride(0),
            sorted_ids, expert_ids, post_pad, numel, top_k, H, I, blocks,
            PERSISTENT=persistent, GROUP_N=gn, GROUP_K=gk, BLOCK_M=bm, BLOCK_N=bn // 2, BLOCK_K=bk, **launch)
        hq, hs = quantize_groups(h[:numel], gk)  # rows of dropped slots are quantised too, never read
        _gemm2_fp8_kernel[grid2](
            hq, hq.stride(0), hs, hs.stride(0), w2, w2.stride(0), w2.stride(1), w2.stride(2),
            w2_scale, s2[0], s2[1], s2[2], y, y.stride(0), wc,
            sorted_ids, expert_ids, post_pad, numel, top_k, I, H, blocks,
            PERSISTENT=persistent, GROUP_N=gn, GROUP_K=gk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **launch)
        oc = out[c0:c1]
        _topk_sum_kernel[(c1 - c0, triton.cdiv(H, sum_block))](
            y, idc, E, oc, oc.stride(0), oc.stride(1), H, TOP_K=top_k, BLOCK_N=sum_block,
            num_warps=4 if not interpreting() else 1)
    return out
