"""fused_moe in Triton: align, GEMM1 (gate + up + SiLU-and-mul), GEMM2 (+ routed weight), top-k sum.

Pipeline (4 launches when the align fits one, e.g. up to 64 slots at E = 256; 5-6
otherwise; no host sync, CUDA-graph safe):

1. ``moe_align(topk_ids, E, BLOCK_M)`` (``triton/moe_align.py``): the flat slots
   ``i = t·k + j`` grouped by expert, each expert's segment padded to ``BLOCK_M``.
   Rows are never permuted: the GEMMs gather ``x[i // k]`` by index.
2. ``_gemm1_kernel``, grid ``(row blocks, cdiv(I, BLOCK_N/2))``: one program
   computes a ``BLOCK_M × BLOCK_N/2`` tile of the gate *and* of the up projection
   (two accumulators over the same gathered rows), applies ``silu(g)·u`` in fp32 in
   its epilogue and writes the intermediate ``h [M·k, I]`` (input dtype) once.
3. ``_gemm2_kernel``, grid ``(row blocks, cdiv(H, BLOCK_N))``: ``h[i] @ w2[e]^T``
   times ``topk_weights[i]`` in the epilogue, written to an fp32 buffer
   ``y [M·k, H]`` (``reduce="ordered"``), or atomically added into an fp32
   ``[M, H]`` accumulator (``reduce="atomic"``).
4. ``_topk_sum_kernel`` (ordered only), grid ``(M, cdiv(H, BLOCK_H))``:
   ``out[t] = Σ_j y[t·k + j]`` in fixed order ``j = 0..k-1``, skipping slots whose
   id is outside ``[0, E)``, cast to the output dtype.

The top-k reduction. The default, ``"ordered"``, is deterministic (bitwise the
same on every run) at the cost of one write and one read of the fp32 ``y``
buffer (``8·M·k·H`` bytes): negligible in the verify regime (M ≤ 256: the weights
are hundreds of MB), a few percent of the GEMM time at M in the thousands.
``"atomic"`` (fp32 ``atomic_add`` into ``[M, H]``) skips that buffer but the
order of the k additions, hence the last bits, vary from run to run.

Schedule (``_moe_common``'s docstring; the config's ``"persistent"``, else
``prefers_persistent``: persistent in the verify regime, the grid above it). Both
GEMMs cover the same tiles, (row block, N tile), row blocks varying fastest so
that the programs of one expert's weight tile run together (L2 reuse at large M).

* grid ``(bound, N tiles)``, ``bound = min(len/BLOCK_M, cdiv(M·k, BLOCK_M) +
  min(E, M·k))`` (each touched expert adds at most one partial block); blocks at or
  past ``num_tokens_post_pad`` return at once, so the work grows with the experts
  the routing touches, never with E;
* persistent: ``min(bound · N tiles, SMs × programs per SM)`` programs, each looping
  over ``tile = pid, pid + P, …`` below ``cdiv(num_tokens_post_pad, BLOCK_M) · N
  tiles``, a count the kernel loads from ``num_tokens_post_pad`` itself (no host
  sync, CUDA-graph safe). Only touched (expert, N tile) pairs exist as tiles; a
  block whose expert id is −1 loads no weight.

Very large M is processed in chunks of tokens so that the scratch buffers stay
under ``_SCRATCH_BYTES`` (M·k·H fp32 at M = 64k, H = 7168, k = 8 would be 15 GB).
Addressing is 64-bit throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _moe_common
from ._moe_common import check_config, fused_moe_config, interpreting
from .moe_align import moe_align

_SCRATCH_BYTES = 2 * 2**30


@triton.jit
def _row_block(pid_m, total, sorted_ptr, expert_ids_ptr, numel, top_k, BLOCK_M: tl.constexpr):
    """(live, expert, slots [BM], slot_ok [BM], tokens [BM] int64) of row block ``pid_m``;
    a block at or past ``total`` (num_tokens_post_pad) or of expert −1 is not live."""
    live = pid_m * BLOCK_M < total
    e = tl.load(expert_ids_ptr + pid_m, mask=live, other=-1)
    live = live & (e >= 0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # a scalar condition enters a mask through tl.where, not `&` (see triton/__init__.py)
    slots = tl.load(sorted_ptr + rows, mask=tl.where(live, rows >= 0, False), other=numel)
    slot_ok = slots < numel
    tokens = (slots // top_k).to(tl.int64)
    return live, e.to(tl.int64), slots.to(tl.int64), slot_ok, tokens


@triton.jit
def _num_tiles(total, max_blocks, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(row blocks, tiles) of a persistent launch: the row blocks that exist, read from
    num_tokens_post_pad on the device (and never more than the host's bound), times the
    N tiles."""
    row_blocks = tl.minimum(tl.cdiv(total, BLOCK_M), max_blocks)
    return row_blocks, row_blocks * tl.cdiv(n_cols, BLOCK_N)


@triton.jit
def _gemm1_tile(pid_m, pid_n, total, x_ptr, s_xm, s_xk, w_ptr, s_we, s_wn, s_wk, up_offset, h_ptr, s_hm,
                sorted_ptr, expert_ids_ptr, numel, top_k, K, I,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    live, e, slots, slot_ok, tokens = _row_block(pid_m, total, sorted_ptr, expert_ids_ptr, numel, top_k, BLOCK_M)
    if live:  # no weight byte is loaded for a block without an expert
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tokens[:, None] * s_xm + offs_k[None, :] * s_xk
        g_ptrs = w_ptr + e * s_we + offs_n[None, :].to(tl.int64) * s_wn + offs_k[:, None] * s_wk
        u_ptrs = g_ptrs + up_offset  # I · stride(1): the up half
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=slot_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K * s_xk
            g_ptrs += BLOCK_K * s_wk
            u_ptrs += BLOCK_K * s_wk
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(h_ptr + slots[:, None] * s_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=slot_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm1_kernel(x_ptr, s_xm, s_xk, w_ptr, s_we, s_wn, s_wk, up_offset, h_ptr, s_hm,
                  sorted_ptr, expert_ids_ptr, post_pad_ptr, numel, top_k, K, I, max_blocks,
                  PERSISTENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr):
    total = tl.load(post_pad_ptr)
    if PERSISTENT:
        row_blocks, num_tiles = _num_tiles(total, max_blocks, I, BLOCK_M, BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            # row blocks fastest: the programs running together share an expert's weight tile (L2)
            _gemm1_tile(tile % row_blocks, tile // row_blocks, total, x_ptr, s_xm, s_xk, w_ptr, s_we, s_wn, s_wk,
                        up_offset, h_ptr, s_hm, sorted_ptr, expert_ids_ptr, numel, top_k, K, I,
                        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    else:
        _gemm1_tile(tl.program_id(0), tl.program_id(1), total, x_ptr, s_xm, s_xk, w_ptr, s_we, s_wn, s_wk,
                    up_offset, h_ptr, s_hm, sorted_ptr, expert_ids_ptr, numel, top_k, K, I,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def _gemm2_tile(pid_m, pid_n, total, h_ptr, s_hm, w_ptr, s_we, s_wn, s_wk, y_ptr, s_ym, weights_ptr,
                sorted_ptr, expert_ids_ptr, numel, top_k, K, N,
                ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    live, e, slots, slot_ok, tokens = _row_block(pid_m, total, sorted_ptr, expert_ids_ptr, numel, top_k, BLOCK_M)
    if live:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = h_ptr + slots[:, None] * s_hm + offs_k[None, :]
        w_ptrs = w_ptr + e * s_we + offs_n[None, :].to(tl.int64) * s_wn + offs_k[:, None] * s_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=slot_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * s_wk
        wt = tl.load(weights_ptr + slots, mask=slot_ok, other=0.0).to(tl.float32)
        acc = acc * wt[:, None]
        mask = slot_ok[:, None] & n_ok[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptr + tokens[:, None] * s_ym + offs_n[None, :], acc, mask=mask)
        else:
            tl.store(y_ptr + slots[:, None] * s_ym + offs_n[None, :], acc, mask=mask)


@triton.jit
def _gemm2_kernel(h_ptr, s_hm, w_ptr, s_we, s_wn, s_wk, y_ptr, s_ym, weights_ptr,
                  sorted_ptr, expert_ids_ptr, post_pad_ptr, numel, top_k, K, N, max_blocks,
                  PERSISTENT: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    total = tl.load(post_pad_ptr)
    if PERSISTENT:
        row_blocks, num_tiles = _num_tiles(total, max_blocks, N, BLOCK_M, BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _gemm2_tile(tile % row_blocks, tile // row_blocks, total, h_ptr, s_hm, w_ptr, s_we, s_wn, s_wk,
                        y_ptr, s_ym, weights_ptr, sorted_ptr, expert_ids_ptr, numel, top_k, K, N,
                        ATOMIC, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    else:
        _gemm2_tile(tl.program_id(0), tl.program_id(1), total, h_ptr, s_hm, w_ptr, s_we, s_wn, s_wk,
                    y_ptr, s_ym, weights_ptr, sorted_ptr, expert_ids_ptr, numel, top_k, K, N,
                    ATOMIC, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def _topk_sum_kernel(y_ptr, ids_ptr, E, out_ptr, s_om, s_on, N, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + j)
        ok = (e >= 0) & (e < E)
        acc += tl.load(y_ptr + (t * TOP_K + j) * N + offs_n, mask=tl.where(ok, n_ok, False), other=0.0)
    tl.store(out_ptr + t * s_om + offs_n * s_on, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def _row_blocks(numel: int, num_experts: int, block_m: int, num_blocks: int) -> int:
    """Upper bound on the row blocks moe_align can produce (the GEMM grids' first axis)."""
    return min(num_blocks, triton.cdiv(numel, block_m) + min(num_experts, numel))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu", *, reduce: str = "ordered",
              config: dict | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """Triton fused_moe (see ``dspark_kernels.fused_moe``).

    ``reduce``: "ordered" (deterministic, default) or "atomic" (see the module
    docstring). ``config``: a launch config (else tuned file / heuristic); its
    optional ``"persistent"`` (bool) forces the schedule.
    ``chunk_tokens``: tokens per chunk (default: from ``_SCRATCH_BYTES``).
    """
    if activation != "silu":
        raise ValueError(f"fused_moe: activation must be 'silu', got {activation!r}")
    if reduce not in ("ordered", "atomic"):
        raise ValueError(f"fused_moe: reduce must be 'ordered' or 'atomic', got {reduce!r}")
    M, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    top_k = topk_ids.shape[1]
    out = torch.empty((M, H), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if top_k == 0 or I == 0:
        return out.zero_()
    cfg = check_config(config, "fused_moe") if config else fused_moe_config(M, E, H, I, top_k, x.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if bn < 32:
        raise ValueError(f"fused_moe: config BLOCK_N must be >= 32 (two halves of >= 16), got {bn}")
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    persistent = _moe_common.schedule_for(cfg, M * top_k, E)
    elem = x.element_size()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    atomic = reduce == "atomic"

    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    weights = topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous()
    per_token = top_k * H * 4 if not atomic else H * 4
    chunk = chunk_tokens or max(1, _SCRATCH_BYTES // max(per_token, 1))
    chunk = min(chunk, M)
    h = torch.empty((chunk * top_k, I), dtype=x.dtype, device=x.device)
    if atomic:
        acc = out if x.dtype == torch.float32 else torch.empty((M, H), dtype=torch.float32, device=x.device)
        acc.zero_()
    else:
        y = torch.empty((chunk * top_k, H), dtype=torch.float32, device=x.device)
    sum_block = 1024 if not interpreting() else 128
    for c0 in range(0, M, chunk):
        c1 = min(M, c0 + chunk)
        xc, idc, wc = x[c0:c1], ids[c0:c1], weights[c0:c1]
        numel = (c1 - c0) * top_k
        sorted_ids, expert_ids, post_pad = moe_align(idc, E, bm)
        blocks = _row_blocks(numel, E, bm, expert_ids.numel())
        n1, n2 = triton.cdiv(I, bn // 2), triton.cdiv(H, bn)
        grid1 = _moe_common.gemm_grid(persistent, blocks, n1, cfg, elem, x.device)
        grid2 = _moe_common.gemm_grid(persistent, blocks, n2, cfg, elem, x.device)
        _gemm1_kernel[grid1](
            xc, xc.stride(0), xc.stride(1), w13, w13.stride(0), w13.stride(1), w13.stride(2), I * w13.stride(1),
            h, h.stride(0),
            sorted_ids, expert_ids, post_pad, numel, top_k, H, I, blocks,
            PERSISTENT=persistent, BLOCK_M=bm, BLOCK_N=bn // 2, BLOCK_K=bk, PRECISION=precision, **launch)
        target = acc[c0:c1] if atomic else y
        _gemm2_kernel[grid2](
            h, h.stride(0), w2, w2.stride(0), w2.stride(1), w2.stride(2), target, target.stride(0), wc,
            sorted_ids, expert_ids, post_pad, numel, top_k, I, H, blocks,
            PERSISTENT=persistent, ATOMIC=atomic, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision,
            **launch)
        if not atomic:
            oc = out[c0:c1]
            _topk_sum_kernel[(c1 - c0, triton.cdiv(H, sum_block))](
                y, idc, E, oc, oc.stride(0), oc.stride(1), H, TOP_K=top_k, BLOCK_N=sum_block,
                num_warps=4 if not interpreting() else 1)
    if atomic and acc is not out:
        out.copy_(acc)
    return out


# --------------------------------------------------------------------------- tuner

DEFAULT_TUNE_M = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096)


def default_candidates(dtype: torch.dtype) -> list[dict]:
    """A modest search space (each must fit the shared-memory budget); tiles with
    BLOCK_M <= 32 (the verify regime) in both schedules, larger ones on the grid."""
    elem = torch.empty((), dtype=dtype).element_size()
    out = []
    for bm in (16, 32, 64, 128):
        for bn in (64, 128, 256):
            for bk in (64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
                        if _moe_common.fit_stages(cfg, elem)["num_stages"] != stages:
                            continue
                        for persistent in (False, True) if bm <= 32 else (False,):
                            out.append(dict(cfg, persistent=persistent))
    return out


def tune(E: int, H: int, I: int, top_k: int, dtype: torch.dtype = torch.bfloat16, *,
         batch_sizes=DEFAULT_TUNE_M, candidates: list[dict] | None = None, out_dir: str | None = None,
         timer=None, device: str = "cuda", seed: int = 0, log=print) -> str:
    """Time candidate configs for each M and write the tuned JSON the heuristic then reads.

    Inputs: bf16/fp16 weights scaled by 0.1, uniform random routing (distinct
    experts per token, softmax weights). ``timer(fn) -> seconds`` defaults to
    ``triton.testing.do_bench`` (median, ms → s). Candidates that fail to compile
    or run are skipped. Returns the path written:
    ``<out_dir or config_dir()>/E=..,N={I},K={H},dtype=..,device=<GPU name>.json``.
    """
    if timer is None:
        def timer(fn):
            return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e-3
    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=gen, device=device) * 0.1).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen, device=device) * 0.1).to(dtype)
    cands = candidates or default_candidates(dtype)
    table = {}
    for M in batch_sizes:
        x = (torch.randn(M, H, generator=gen, device=device) * 0.1).to(dtype)
        scores = torch.rand(M, E, generator=gen, device=device)
        topk_w, topk_ids = torch.topk(torch.softmax(scores, -1), top_k, dim=-1)
        best = None
        for cfg in cands:
            try:
                t = timer(lambda: fused_moe(x, w13, w2, topk_w, topk_ids, config=cfg))
            except Exception as exc:  # noqa: BLE001 - out of resources, unsupported shape: skip it
                log(f"tune M={M} {cfg}: skipped ({type(exc).__name__})")
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        if best is not None:
            table[M] = best[1]
            log(f"tune M={M}: {best[1]} {best[0] * 1e6:.1f} us")
    name = _moe_common.config_file_name(E, I, H, dtype, _moe_common.device_name(device))
    return _moe_common.write_tuned(f"{out_dir or _moe_common.config_dir()}/{name}", table)
