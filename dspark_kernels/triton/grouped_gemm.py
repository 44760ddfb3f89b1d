"""grouped_gemm in Triton: ``out[t] = a[t] @ w[e]^T`` over contiguous expert segments.

One kernel, two schedules (``_moe_common``'s docstring; the config's
``"persistent"``, else ``prefers_persistent(T / E)``):

* grid ``(cdiv(T, BLOCK_M) + E + 1, cdiv(N, BLOCK_N))``: an upper bound on the row
  tiles (each segment adds at most one partial tile); program ``(m, n)`` does tile
  ``(m, n)``, and tiles past the last one return at once;
* persistent: ``persistent_programs`` programs loop over ``tile = pid, pid + P, …``
  below the real number of tiles (row tiles fastest).

A program finds a tile's segment from ``expert_offsets`` alone: it loads the
``E + 1`` offsets, counts every segment's tiles, takes a cumulative sum (once per
program) and picks the segment that holds row tile ``m`` (a ``[G]`` compare, no
search loop, no prepass, no host sync), so empty segments cost nothing. Segment
``E`` is the tail ``[offs[E], T)``: its rows are written as zeros.

fp32 accumulation (``tl.dot``; fp32 inputs use IEEE products, not TF32), output in
``a``'s dtype, any strides for ``a``, ``w`` and ``out`` (a unit stride is
specialised by Triton; ``w`` as a transposed view ``[E, K, N]^T`` is read along N,
which is coalesced too), 64-bit row and expert offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._moe_common import check_config, gemm_grid, grouped_gemm_config, schedule_for


@triton.jit
def _segment_tiles(offs_ptr, T, E, BLOCK_M: tl.constexpr, G_BLOCK: tl.constexpr):
    """(lo, hi, tiles, cum), each ``[G]``: the rows and row tiles of segments 0..E-1 and
    of E, the zero tail ``[offs[E], T)``; ``cum`` the inclusive sum of ``tiles``."""
    g = tl.arange(0, G_BLOCK)
    lo = tl.load(offs_ptr + g, mask=g <= E, other=0).to(tl.int64)
    hi = tl.load(offs_ptr + g + 1, mask=g < E, other=0).to(tl.int64)
    hi = tl.where(g == E, T, hi)
    lo = tl.minimum(tl.maximum(lo, 0), T)  # a kernel never trusts the offsets
    hi = tl.minimum(tl.maximum(hi, lo), T)
    tiles = tl.where(g <= E, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0).to(tl.int32)
    return lo, hi, tiles, tl.cumsum(tiles, axis=0)


@triton.jit
def _grouped_gemm_tile(pid_m, pid_n, lo, hi, tiles, cum, a_ptr, s_am, s_ak, w_ptr, s_we, s_wn, s_wk,
                       out_ptr, s_om, s_on, N, K, E,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       G_BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    g = tl.arange(0, G_BLOCK)
    seg = tl.sum((cum <= pid_m).to(tl.int32), axis=0)
    if seg <= E:  # past the last tile: nothing
        sel = g == seg
        seg_lo = tl.sum(tl.where(sel, lo, 0), axis=0)
        seg_hi = tl.sum(tl.where(sel, hi, 0), axis=0)
        first_tile = tl.sum(tl.where(sel, cum - tiles, 0), axis=0)
        rows = seg_lo + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < seg_hi
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        out_ptrs = out_ptr + rows[:, None] * s_om + offs_n[None, :].to(tl.int64) * s_on
        out_mask = row_ok[:, None] & n_ok[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if seg < E:  # segment E (the tail) stores the zeros
            offs_k = tl.arange(0, BLOCK_K)
            a_ptrs = a_ptr + rows[:, None] * s_am + offs_k[None, :] * s_ak
            w_ptrs = w_ptr + seg.to(tl.int64) * s_we + offs_n[None, :].to(tl.int64) * s_wn + offs_k[:, None] * s_wk
            for kk in range(0, tl.cdiv(K, BLOCK_K)):
                k_ok = offs_k < K - kk * BLOCK_K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K * s_ak
                w_ptrs += BLOCK_K * s_wk
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_gemm_kernel(a_ptr, s_am, s_ak, w_ptr, s_we, s_wn, s_wk, out_ptr, s_om, s_on, offs_ptr,
                         T, N, K, E,
                         PERSISTENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, G_BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    lo, hi, tiles, cum = _segment_tiles(offs_ptr, T, E, BLOCK_M, G_BLOCK)
    if PERSISTENT:
        row_tiles = tl.sum(tiles, axis=0)
        num_tiles = row_tiles * tl.cdiv(N, BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            # row tiles fastest: the programs running together share an expert's weight tile (L2)
            _grouped_gemm_tile(tile % row_tiles, tile // row_tiles, lo, hi, tiles, cum, a_ptr, s_am, s_ak,
                               w_ptr, s_we, s_wn, s_wk, out_ptr, s_om, s_on, N, K, E,
                               BLOCK_M, BLOCK_N, BLOCK_K, G_BLOCK, PRECISION)
    else:
        _grouped_gemm_tile(tl.program_id(0), tl.program_id(1), lo, hi, tiles, cum, a_ptr, s_am, s_ak,
                           w_ptr, s_we, s_wn, s_wk, out_ptr, s_om, s_on, N, K, E,
                           BLOCK_M, BLOCK_N, BLOCK_K, G_BLOCK, PRECISION)


def grouped_gemm_out(a: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, out: torch.Tensor,
                     config: dict | None = None) -> None:
    """Write ``grouped_gemm(a, w, expert_offsets)`` into ``out [T, N]`` (any strides)."""
    T, K = a.shape
    E, N, _ = w.shape
    if T == 0 or N == 0:
        return
    cfg = check_config(config, "grouped_gemm") if config else grouped_gemm_config(T, E, N, K, a.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    persistent = schedule_for(cfg, T, E)
    row_tiles, n_tiles = triton.cdiv(T, bm) + E + 1, triton.cdiv(N, bn)  # the row-tile bound
    grid = gemm_grid(persistent, row_tiles, n_tiles, cfg, a.element_size(), a.device)
    _grouped_gemm_kernel[grid](
        a, a.stride(0), a.stride(1), w, w.stride(0), w.stride(1), w.stride(2), out, out.stride(0), out.stride(1),
        expert_offsets, T, N, K, E,
        PERSISTENT=persistent, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, G_BLOCK=max(16, triton.next_power_of_2(E + 1)),
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor,
                 config: dict | None = None) -> torch.Tensor:
    """Triton grouped_gemm (see ``dspark_kernels.grouped_gemm``)."""
    out = torch.empty((a.shape[0], w.shape[1]), dtype=a.dtype, device=a.device)
    grouped_gemm_out(a, w, expert_offsets, out, config)
    return out
