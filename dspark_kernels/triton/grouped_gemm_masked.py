"""grouped_gemm_masked in Triton: the expert-parallel ("masked", DeepGEMM's
``m_grouped_gemm_masked``) layout, ``out[e, i] = a[e, i] @ w[e]^T`` for ``i < masked_m[e]``.

After expert-parallel dispatch every local expert owns a fixed slab of ``max_m``
rows of ``a [E, max_m, K]``, of which the first ``masked_m[e]`` hold tokens. The
slab size is a capacity (fixed by the shapes, CUDA-graph safe), the counts live
on the device; the point of the layout is that the GPU pays for the rows present.

One kernel, grid ``(cdiv(max_m, BLOCK_M), cdiv(N, BLOCK_N), E)``, row tiles
fastest so that the programs sharing one expert's weight tile run together (L2
reuse). Program ``(m, n, e)`` loads ``masked_m[e]`` (clamped to ``[0, max_m]``: a
kernel never trusts it, whatever the wrapper checked):

* a tile wholly at or past ``masked_m[e]`` stores its zeros and loads nothing, no
  weight and no row of ``a``: an expert without tokens costs a store of zeros;
* a tile holding some tokens masks the rows at or past ``masked_m[e]`` out of its
  ``a`` loads: the padding rows of ``a`` are never read (garbage or NaN there cannot
  leak) and their output rows come out as zeros from the zeroed operand (exact for
  finite weights).

fp32 accumulation (``tl.dot``; fp32 inputs use IEEE products, not TF32), output in
``a``'s dtype, any strides for ``a`` and ``w`` (a transposed view of ``[E, K, N]``
storage is read along N, coalesced too), 64-bit expert and row offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._moe_common import check_config, grouped_gemm_config

_MAX_GRID_YZ = 65535  # CUDA's limit on the grid's second and third axes


@triton.jit
def _grouped_gemm_masked_kernel(a_ptr, s_ae, s_am, s_ak, w_ptr, s_we, s_wn, s_wk, out_ptr, s_oe, s_om, s_on,
                                masked_m_ptr, max_m, N, K,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    m = tl.minimum(tl.maximum(tl.load(masked_m_ptr + e), 0), max_m).to(tl.int32)  # clamp before narrowing
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if pid_m * BLOCK_M < m:  # a tile without tokens loads no weight
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + e * s_ae + rows[:, None].to(tl.int64) * s_am + offs_k[None, :] * s_ak
        w_ptrs = w_ptr + e * s_we + offs_n[None, :].to(tl.int64) * s_wn + offs_k[:, None] * s_wk
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * s_ak
            w_ptrs += BLOCK_K * s_wk
        # Padding rows are 0 from their zeroed operand already, unless w[e] holds inf/NaN
        # (0·inf): select so the documented exact zeros hold for any weights.
        acc = tl.where(row_ok[:, None], acc, 0.0)
    out_ptrs = out_ptr + e * s_oe + rows[:, None].to(tl.int64) * s_om + offs_n[None, :].to(tl.int64) * s_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < max_m)[:, None] & n_ok[None, :])


def masked_gemm_config(E: int, max_m: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """grouped_gemm's heuristic at ``max_m`` rows per expert: the counts are on the device,
    the capacity is what the host knows (an upper bound on the rows of each expert)."""
    return grouped_gemm_config(E * max_m, E, N, K, dtype)


def grouped_gemm_masked(a: torch.Tensor, w: torch.Tensor, masked_m: torch.Tensor,
                        config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton grouped_gemm_masked (see ``dspark_kernels.grouped_gemm_masked``): ``[E, max_m, N]``.

    ``out``: an ``[E, max_m, N]`` tensor in ``a``'s dtype (any strides) to write every
    element of, instead of a new one (tests poison it first).
    """
    E, max_m, K = a.shape
    N = w.shape[1]
    if out is None:
        out = torch.empty((E, max_m, N), dtype=a.dtype, device=a.device)
    elif out.shape != (E, max_m, N) or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(f"grouped_gemm_masked: out must be [{E}, {max_m}, {N}] {a.dtype} on {a.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if out.numel() == 0:
        return out
    cfg = check_config(config, "grouped_gemm_masked") if config else masked_gemm_config(E, max_m, N, K, a.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (triton.cdiv(max_m, bm), triton.cdiv(N, bn), E)
    if grid[1] > _MAX_GRID_YZ or grid[2] > _MAX_GRID_YZ:
        raise ValueError(f"grouped_gemm_masked: E = {E} and cdiv(N, {bn}) = {grid[1]} must be <= {_MAX_GRID_YZ}")
    _grouped_gemm_masked_kernel[grid](
        a, a.stride(0), a.stride(1), a.stride(2), w, w.stride(0), w.stride(1), w.stride(2),
        out, out.stride(0), out.stride(1), out.stride(2), masked_m, max_m, N, K,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
