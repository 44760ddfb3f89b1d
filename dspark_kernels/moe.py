"""MoE ops for the target's verify pass (DESIGN.md §5 "MoE grouped GEMM"): public wrappers.

``moe_align``, ``grouped_gemm``, ``grouped_gemm_masked`` (the expert-parallel layout)
and ``fused_moe``, each a documented function with ``backend=None`` ∈ {"reference",
"cpu", "triton", "cuda"} and a custom op ``torch.ops.dspark.<op>``
(``grouped_gemm(out=...)`` goes to ``torch.ops.dspark.grouped_gemm_out``).

Backends:

* ``reference`` (``reference/moe.py``): float32 loops, the spec.
* ``cpu``: PyTorch, registered under the CPU dispatch key from Python (there is
  no C++ kernel: a loop over the touched experts of two GEMMs each *is* the right
  CPU implementation, the GEMMs are oneDNN's: bf16 as it is with fp32
  accumulation, fp16 / fp32 in fp32). ``moe_align``'s is a vectorised,
  sync-free PyTorch version that runs on any device.
* ``triton``: the GPU backend (``triton/{moe_align,grouped_gemm,grouped_gemm_masked,
  fused_moe}.py``), registered under the CUDA dispatch key; ``backend=None`` on CUDA
  tensors runs it through ``torch.ops.dspark.*`` (so ``torch.compile`` and CUDA graphs
  see one op).
* ``cuda``: none (Triton is the GPU backend; a CUDA C++ kernel would only be added
  where it wins).
"""

from __future__ import annotations

import torch

from . import _backend
from ._validation import _FLOAT_DTYPES, _INT_DTYPES, _check_tensor, _debug_checks_enabled, _fail
from .reference import moe as _ref
from .reference.moe import (align_sizes, dequantize_fp8_blocks, dequantize_fp8_groups, quantize_fp8_groups,
                             silu_and_mul)

_FP8 = torch.float8_e4m3fn

def _mode(op: str, device: torch.device, backend: str | None) -> str:
    """"op" (torch.ops.dspark: the CPU / CUDA dispatch key), "triton" (direct call) or "reference"."""
    if backend is None and device.type == "cuda" and _backend.backends(op)["triton"]:
        return "op"  # the CUDA key runs the Triton kernel (no CUDA C++ kernel for the MoE ops)
    name = _backend.choose_backend(op, device, backend)
    return "op" if name in ("cpu", "cuda") else name


# --------------------------------------------------------------------------- validation


def _check_moe_align(topk_ids, num_experts, block_m):
    op = "moe_align"
    _check_tensor(op, "topk_ids", topk_ids, dim=2, dtypes=_INT_DTYPES)
    for name, v in (("num_experts", num_experts), ("block_m", block_m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _fail(op, f"{name} must be an int >= 1, got {v!r}")
    length, _ = align_sizes(topk_ids.numel(), num_experts, block_m)
    if length >= 2**31:
        _fail(op, f"topk_ids.numel() + num_experts * (block_m - 1) must be < 2^31, got {length}")
    if _debug_checks_enabled(topk_ids.device):
        _check_ids(op, topk_ids, num_experts)


def _check_ids(op, topk_ids, num_experts):
    ids = topk_ids.detach().cpu()
    bad = (ids < -1) | (ids >= num_experts)
    if bad.any():
        t, j = (int(v) for v in torch.nonzero(bad)[0])
        _fail(op, f"topk_ids[{t}, {j}] = {int(ids[t, j])} is outside [-1, E) with E = {num_experts}")


def _check_grouped_gemm(a, w, expert_offsets, out=None):
    op = "grouped_gemm"
    _check_tensor(op, "a", a, dim=2, dtypes=_FLOAT_DTYPES)
    device = a.device
    _check_tensor(op, "w", w, dim=3, dtypes=(a.dtype,), device=device)
    if w.shape[2] != a.shape[1]:
        _fail(op, f"w must be [E, N, K] with K = a.size(1) = {a.shape[1]}, got shape {tuple(w.shape)}")
    num_experts = w.shape[0]
    _check_tensor(op, "expert_offsets", expert_offsets, dim=1, shape=(num_experts + 1,), dtypes=_INT_DTYPES,
                  device=device)
    if out is not None:
        _check_tensor(op, "out", out, dim=2, shape=(a.shape[0], w.shape[1]), dtypes=(a.dtype,), device=device)
    if _debug_checks_enabled(device):
        offs = expert_offsets.detach().cpu().to(torch.int64)
        if int(offs[0]) != 0:
            _fail(op, f"expert_offsets[0] must be 0, got {int(offs[0])}")
        step = offs[1:] - offs[:-1]
        if (step < 0).any():
            e = int(torch.nonzero(step < 0)[0])
            _fail(op, f"expert_offsets must be non-decreasing, got expert_offsets[{e}] = {int(offs[e])} > "
                      f"expert_offsets[{e + 1}] = {int(offs[e + 1])}")
        if int(offs[-1]) > a.shape[0]:
            _fail(op, f"expert_offsets[E] must be <= a.size(0) = {a.shape[0]}, got {int(offs[-1])}")


def _check_grouped_gemm_masked(a, w, masked_m):
    op = "grouped_gemm_masked"
    _check_tensor(op, "a", a, dim=3, dtypes=_FLOAT_DTYPES)
    device = a.device
    num_experts, max_m, k = a.shape
    _check_tensor(op, "w", w, dim=3, dtypes=(a.dtype,), device=device)
    if w.shape[0] != num_experts or w.shape[2] != k:
        _fail(op, f"w must be [E, N, K] with E = a.size(0) = {num_experts} and K = a.size(2) = {k}, "
                  f"got shape {tuple(w.shape)}")
    _check_tensor(op, "masked_m", masked_m, dim=1, shape=(num_experts,), dtypes=_INT_DTYPES, device=device)
    if max_m >= 2**31:
        _fail(op, f"a.size(1) (max_m) must be < 2^31, got {max_m}")
    if _debug_checks_enabled(device):
        counts = masked_m.detach().cpu().to(torch.int64)
        bad = (counts < 0) | (counts > max_m)
        if bad.any():
            e = int(torch.nonzero(bad)[0])
            _fail(op, f"masked_m[{e}] = {int(counts[e])} is outside [0, max_m] with max_m = a.size(1) = {max_m}")


def _check_routing(op, topk_weights, topk_ids, activation, m, num_experts, device):
    """The routing arguments of fused_moe / fused_moe_fp8: ``topk_ids [M, k]``, weights alike."""
    _check_tensor(op, "topk_ids", topk_ids, dim=2, dtypes=_INT_DTYPES, device=device)
    if topk_ids.shape[0] != m:
        _fail(op, f"topk_ids must be [M, k] with M = x.size(0) = {m}, got shape {tuple(topk_ids.shape)}")
    _check_tensor(op, "topk_weights", topk_weights, dim=2, shape=tuple(topk_ids.shape), dtypes=_FLOAT_DTYPES,
                  device=device)
    if activation != "silu":
        _fail(op, f"activation must be 'silu', got {activation!r}")
    if topk_ids.numel() >= 2**31:
        _fail(op, f"topk_ids.numel() must be < 2^31, got {topk_ids.numel()}")
    if _debug_checks_enabled(device):
        _check_ids(op, topk_ids, num_experts)


def _check_fused_moe(x, w13, w2, topk_weights, topk_ids, activation):
    op = "fused_moe"
    _check_tensor(op, "x", x, dim=2, dtypes=_FLOAT_DTYPES)
    device = x.device
    m, hidden = x.shape
    _check_tensor(op, "w13", w13, dim=3, dtypes=(x.dtype,), device=device)
    num_experts, two_i, _ = w13.shape
    if w13.shape[2] != hidden or two_i % 2:
        _fail(op, f"w13 must be [E, 2I, H] with H = x.size(1) = {hidden} (gate rows, then up rows), "
                  f"got shape {tuple(w13.shape)}")
    _check_tensor(op, "w2", w2, dim=3, shape=(num_experts, hidden, two_i // 2), dtypes=(x.dtype,), device=device)
    _check_routing(op, topk_weights, topk_ids, activation, m, num_experts, device)


def _check_block_shape(op, block_shape):
    ok = (isinstance(block_shape, (list, tuple)) and len(block_shape) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in block_shape))
    if not ok:
        _fail(op, f"block_shape must be two ints >= 1 [block_n, block_k], got {block_shape!r}")
    return int(block_shape[0]), int(block_shape[1])


def _check_fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape, activation):
    op = "fused_moe"
    bn, bk = _check_block_shape(op, block_shape)
    _check_tensor(op, "x", x, dim=2, dtypes=_FLOAT_DTYPES)
    device = x.device
    m, hidden = x.shape
    _check_tensor(op, "w13", w13, dim=3, dtypes=(_FP8,), device=device)
    num_experts, two_i, _ = w13.shape
    if w13.shape[2] != hidden or two_i % 2:
        _fail(op, f"w13 must be [E, 2I, H] with H = x.size(1) = {hidden} (gate rows, then up rows), "
                  f"got shape {tuple(w13.shape)}")
    inter = two_i // 2
    _check_tensor(op, "w2", w2, dim=3, shape=(num_experts, hidden, inter), dtypes=(_FP8,), device=device)
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    for name, t, n, k in (("w13_scale", w13_scale, two_i, hidden), ("w2_scale", w2_scale, hidden, inter)):
        want = (num_experts, cdiv(n, bn), cdiv(k, bk))
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a float32 tensor of shape {list(want)} (one scale per "
                      f"{bn}x{bk} block), got {type(t).__name__}")
        if tuple(t.shape) != want:
            _fail(op, f"{name} must have shape {list(want)} = [E, ceil({n}/{bn}), ceil({k}/{bk})] (one scale "
                      f"per block_shape = [{bn}, {bk}] block), got {tuple(t.shape)}")
        _check_tensor(op, name, t, dtypes=(torch.float32,), device=device)
    _check_routing(op, topk_weights, topk_ids, activation, m, num_experts, device)


def _check_scales_match_weights(w13, w2, w13_scale, w2_scale):
    """fp8 weights take block scales, other weights none: which path, or a clear error."""
    op = "fused_moe"
    fp8 = {name: isinstance(t, torch.Tensor) and t.dtype == _FP8 for name, t in (("w13", w13), ("w2", w2))}
    if fp8["w13"] != fp8["w2"]:
        _fail(op, f"w13 and w2 must both be float8_e4m3fn or both not, got w13 {getattr(w13, 'dtype', None)} "
                  f"and w2 {getattr(w2, 'dtype', None)}")
    for name, weight, scale in (("w13", w13, w13_scale), ("w2", w2, w2_scale)):
        if fp8[name] and scale is None:
            _fail(op, f"{name} is float8_e4m3fn: {name}_scale (float32 block scales) is required")
        if not fp8[name] and scale is not None:
            _fail(op, f"{name}_scale was given but {name} is {getattr(weight, 'dtype', None)}: block scales go "
                      f"with float8_e4m3fn weights")
    return fp8["w13"]


# --------------------------------------------------------------------------- the cpu backend (PyTorch)


def _torch_moe_align(topk_ids, num_experts, block_m):
    """moe_align in PyTorch: fixed-size outputs, no host sync (any device)."""
    device = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)
    numel = ids.numel()
    length, num_blocks = align_sizes(numel, num_experts, block_m)
    key = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)  # E: dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    counts[num_experts] = 0
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    seg_start = ends - padded
    seg_start[num_experts] = length  # dropped slots are scattered past the end
    unpadded_start = torch.cumsum(counts, 0) - counts
    order = torch.sort(key, stable=True).indices                # by expert, then flat index
    k_sorted = key[order]
    rank = torch.arange(numel, device=device) - unpadded_start[k_sorted]
    dest = torch.where(k_sorted < num_experts, seg_start[k_sorted] + rank, length)
    sorted_ids = torch.full((length + 1,), numel, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    total = ends[num_experts - 1]
    block_start = torch.arange(num_blocks, device=device, dtype=torch.int64) * block_m
    expert = torch.searchsorted(ends[:num_experts].contiguous(), block_start, right=True)
    expert_ids = torch.where(block_start < total, expert, -1).to(torch.int32)
    return sorted_ids[:length].clone(), expert_ids, total.reshape(1).to(torch.int32)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The CPU GEMMs' operand dtype: bf16 as it is (oneDNN accumulates in fp32, AMX /
    AVX512-BF16 where present; no copy of the weights), fp16 and fp32 in fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _mm_into(out, a, w):
    """``out = a @ w^T`` with ``w`` converted to ``out``'s dtype only where it must be."""
    torch.mm(a, w.t() if w.dtype == out.dtype else w.t().to(out.dtype), out=out)


def _torch_grouped_gemm_out(a, w, expert_offsets, out):
    offs = expert_offsets.tolist()
    cdt = _compute_dtype(a.dtype)
    for e in range(w.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            res = torch.empty((hi - lo, w.shape[1]), dtype=cdt, device=a.device)
            _mm_into(res, a[lo:hi].to(cdt), w[e])
            out[lo:hi] = res
    out[offs[-1]:] = 0


def _torch_grouped_gemm_masked(a, w, masked_m):
    """One GEMM per expert with tokens over its first ``masked_m[e]`` rows (the padding rows
    of ``a`` are never read); the output's padding rows are zeroed, nothing else twice."""
    num_experts, max_m, _ = a.shape
    out = torch.empty((num_experts, max_m, w.shape[1]), dtype=a.dtype, device=a.device)
    cdt = _compute_dtype(a.dtype)
    for e, m in enumerate(masked_m.tolist()):
        m = min(max(m, 0), max_m)
        if m:
            if cdt == a.dtype:
                _mm_into(out[e, :m], a[e, :m], w[e])
            else:
                res = torch.empty((m, w.shape[1]), dtype=cdt, device=a.device)
                _mm_into(res, a[e, :m].to(cdt), w[e])
                out[e, :m] = res
        out[e, m:] = 0
    return out


def _torch_fused_moe(x, w13, w2, topk_weights, topk_ids):
    """Slots sorted by expert, rows gathered once; per touched expert only its two GEMMs
    (into slices of sorted buffers); SiLU-and-mul, the routed weights and the top-k sum
    in slot order (deterministic) once over the batch."""
    m, k = topk_ids.shape
    num_experts, two_i, _ = w13.shape
    ids = topk_ids.reshape(-1).to(torch.int64)
    key = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1).tolist()
    n = m * k - counts[num_experts]
    slots = order[:n]
    cdt = _compute_dtype(x.dtype)
    xs = x[slots // k].to(cdt)
    h = torch.empty((n, two_i), dtype=cdt, device=x.device)
    ys = torch.empty((n, w2.shape[1]), dtype=cdt, device=x.device)
    bounds = [0]
    for c in counts[:num_experts]:
        bounds.append(bounds[-1] + c)
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            _mm_into(h[lo:hi], xs[lo:hi], w13[e])
    act = silu_and_mul(h.float()).to(cdt)
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            _mm_into(ys[lo:hi], act[lo:hi], w2[e])
    y = torch.zeros(m * k, w2.shape[1], dtype=torch.float32, device=x.device)  # slot t·k + j
    y[slots] = ys.float() * topk_weights.reshape(-1).float()[slots, None]
    return y.view(m, k, w2.shape[1]).sum(dim=1).to(x.dtype)


def _torch_fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape):
    """fp8 fused_moe in PyTorch (any device): x quantised once per token, slots sorted by
    expert; per touched expert its two weights dequantised (float32) and two GEMMs;
    the intermediate quantised per row group between them. The reference's numerics
    (float32, the same quantisation), only the summation order differs."""
    bk = block_shape[1]
    m, k = topk_ids.shape
    num_experts, two_i, _ = w13.shape
    ids = topk_ids.reshape(-1).to(torch.int64)
    key = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1).tolist()
    n = m * k - counts[num_experts]
    slots = order[:n]
    xs = dequantize_fp8_groups(*quantize_fp8_groups(x, bk), bk)[slots // k]
    h = torch.empty((n, two_i), dtype=torch.float32, device=x.device)
    ys = torch.empty((n, w2.shape[1]), dtype=torch.float32, device=x.device)
    bounds = [0]
    for c in counts[:num_experts]:
        bounds.append(bounds[-1] + c)
    touched = [e for e in range(num_experts) if bounds[e + 1] > bounds[e]]
    for e in touched:
        torch.mm(xs[bounds[e]:bounds[e + 1]], dequantize_fp8_blocks(w13[e], w13_scale[e], block_shape).t(),
                 out=h[bounds[e]:bounds[e + 1]])
    act = dequantize_fp8_groups(*quantize_fp8_groups(silu_and_mul(h), bk), bk)
    for e in touched:
        torch.mm(act[bounds[e]:bounds[e + 1]], dequantize_fp8_blocks(w2[e], w2_scale[e], block_shape).t(),
                 out=ys[bounds[e]:bounds[e + 1]])
    y = torch.zeros(m * k, w2.shape[1], dtype=torch.float32, device=x.device)  # slot t·k + j
    y[slots] = ys * topk_weights.reshape(-1).float()[slots, None]
    return y.view(m, k, w2.shape[1]).sum(dim=1).to(x.dtype)


# Implementations registered under the dispatch keys (dspark_kernels/_registration.py).
# Each checks its arguments, so a direct torch.ops.dspark.* call gets the same errors.


def moe_align_cpu(topk_ids, num_experts, block_m):
    _check_moe_align(topk_ids, num_experts, block_m)
    return _torch_moe_align(topk_ids, num_experts, block_m)


def grouped_gemm_cpu(a, w, expert_offsets):
    _check_grouped_gemm(a, w, expert_offsets)
    out = torch.empty((a.shape[0], w.shape[1]), dtype=a.dtype, device=a.device)
    _torch_grouped_gemm_out(a, w, expert_offsets, out)
    return out


def grouped_gemm_out_cpu(a, w, expert_offsets, out):
    _check_grouped_gemm(a, w, expert_offsets, out)
    _torch_grouped_gemm_out(a, w, expert_offsets, out)


def grouped_gemm_masked_cpu(a, w, masked_m):
    _check_grouped_gemm_masked(a, w, masked_m)
    return _torch_grouped_gemm_masked(a, w, masked_m)


def fused_moe_cpu(x, w13, w2, topk_weights, topk_ids, activation="silu"):
    _check_fused_moe(x, w13, w2, topk_weights, topk_ids, activation)
    return _torch_fused_moe(x, w13, w2, topk_weights, topk_ids)


def fused_moe_fp8_cpu(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape=(128, 128),
                      activation="silu"):
    _check_fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape, activation)
    return _torch_fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, tuple(block_shape))


def moe_align_triton(topk_ids, num_experts, block_m):
    from .triton.moe_align import moe_align as impl

    _check_moe_align(topk_ids, num_experts, block_m)
    return impl(topk_ids, num_experts, block_m)


def grouped_gemm_triton(a, w, expert_offsets):
    from .triton.grouped_gemm import grouped_gemm as impl

    _check_grouped_gemm(a, w, expert_offsets)
    return impl(a, w, expert_offsets)


def grouped_gemm_out_triton(a, w, expert_offsets, out):
    from .triton.grouped_gemm import grouped_gemm_out as impl

    _check_grouped_gemm(a, w, expert_offsets, out)
    impl(a, w, expert_offsets, out)


def grouped_gemm_masked_triton(a, w, masked_m):
    from .triton.grouped_gemm_masked import grouped_gemm_masked as impl

    _check_grouped_gemm_masked(a, w, masked_m)
    return impl(a, w, masked_m)


def fused_moe_triton(x, w13, w2, topk_weights, topk_ids, activation="silu"):
    from .triton.fused_moe import fused_moe as impl

    _check_fused_moe(x, w13, w2, topk_weights, topk_ids, activation)
    return impl(x, w13, w2, topk_weights, topk_ids, activation)


def fused_moe_fp8_triton(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape=(128, 128),
                         activation="silu"):
    from .triton.fused_moe_fp8 import fp8_supported
    from .triton.fused_moe_fp8 import fused_moe_fp8 as impl

    _check_fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape, activation)
    if not fp8_supported(x.device):  # Triton has no float8_e4m3fn before sm_89
        _backend.warn_once("fused_moe_fp8:pre-sm89", "dspark_kernels.fused_moe: fp8 weights on a GPU before sm_89 "
                           "run the PyTorch implementation (Triton has no float8_e4m3fn there; it syncs the host)")
        return _torch_fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, tuple(block_shape))
    return impl(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, tuple(block_shape), activation)


# --------------------------------------------------------------------------- public functions


def _device_of(op, name, t):
    _check_tensor(op, name, t)
    return t.device


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, *,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Group the routed slots by expert in blocks of ``block_m`` (vLLM's ``moe_align_block_size``).

    The slots of ``topk_ids [M, k]`` are numbered ``i = t·k + j`` (``numel = M·k``).
    With ``c_e`` the number of slots routed to expert ``e`` and
    ``P_e = ceil(c_e / block_m)·block_m``::

        sorted_token_ids[S_e + r] = r-th slot of expert e (ascending i),  r < c_e
                                  = numel (sentinel),                    c_e <= r < P_e
        S_e = Σ_{e' < e} P_e'     (experts in ascending order)
        num_tokens_post_pad = Σ_e P_e
        expert_ids[b] = the expert whose segment holds entries [b·block_m, (b+1)·block_m),
                        −1 for blocks at or past num_tokens_post_pad

    Entries at or past ``num_tokens_post_pad`` are the sentinel. Slots whose id is
    −1 (padding rows, experts of other expert-parallel ranks) get no entry, and an
    expert with no slot gets no block. All sizes come from the shapes (no host
    sync, CUDA-graph safe): the worst case ``numel + E·(block_m − 1)`` entries.

    Args:
        topk_ids: ``[M, k]`` int32 / int64 expert ids in ``[-1, E)`` (checked on CPU,
            and on CUDA under ``DSPARK_DEBUG=1``; elsewhere an id outside is dropped).
        num_experts: E (local experts). block_m: the GEMM's row block.
        backend: "reference" | "cpu" | "triton" | "cuda" | None.

    Returns:
        ``sorted_token_ids [numel + E·(block_m − 1)]`` int32,
        ``expert_ids [cdiv(numel + E·(block_m − 1), block_m)]`` int32,
        ``num_tokens_post_pad [1]`` int32.
    """
    op = "moe_align"
    mode = _mode(op, _device_of(op, "topk_ids", topk_ids), backend)
    if mode == "op":
        return torch.ops.dspark.moe_align(topk_ids, num_experts, block_m)
    _check_moe_align(topk_ids, num_experts, block_m)
    if mode == "triton":
        from .triton.moe_align import moe_align as impl

        return impl(topk_ids, num_experts, block_m)
    return _ref.moe_align(topk_ids, num_experts, block_m)


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, *,
                 out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    r"""Grouped GEMM over contiguous expert segments: ``out[t] = a[t] @ w[e]^T``.

    Rows ``expert_offsets[e] <= t < expert_offsets[e+1]`` belong to expert ``e``;
    rows at or past ``expert_offsets[E]`` are written as 0. fp32 accumulation, the
    output in ``a``'s dtype. Empty segments cost nothing; no host sync on CUDA.

    Args:
        a: ``[T, K]`` bfloat16 / float16 / float32, any strides.
        w: ``[E, N, K]`` (nn.Linear layout), ``a``'s dtype, any strides: a transposed
            view of ``[E, K, N]`` storage is read as it is, no copy.
        expert_offsets: ``[E + 1]`` int32 / int64, ``0 = offs[0] <= … <= offs[E] <= T``
            (checked on CPU, and on CUDA under ``DSPARK_DEBUG=1``).
        out: optional ``[T, N]`` output in ``a``'s dtype (any strides), written in
            place (``torch.ops.dspark.grouped_gemm_out``) and returned.
        backend: "reference" | "cpu" | "triton" | "cuda" | None.

    Returns:
        ``[T, N]``.
    """
    op = "grouped_gemm"
    mode = _mode(op, _device_of(op, "a", a), backend)
    if mode == "op":
        if out is None:
            return torch.ops.dspark.grouped_gemm(a, w, expert_offsets)
        torch.ops.dspark.grouped_gemm_out(a, w, expert_offsets, out=out)
        return out
    _check_grouped_gemm(a, w, expert_offsets, out)
    if mode == "triton":
        from .triton.grouped_gemm import grouped_gemm_out as impl

        if out is None:
            out = torch.empty((a.shape[0], w.shape[1]), dtype=a.dtype, device=a.device)
        impl(a, w, expert_offsets, out)
        return out
    result = _ref.grouped_gemm(a, w, expert_offsets)
    if out is None:
        return result
    out.copy_(result)
    return out


def grouped_gemm_masked(a: torch.Tensor, w: torch.Tensor, masked_m: torch.Tensor, *,
                        backend: str | None = None) -> torch.Tensor:
    r"""Grouped GEMM in the masked (expert-parallel) layout: ``out[e, i] = a[e, i] @ w[e]^T``.

    ::

        out[e, i] = a[e, i] @ w[e]^T    for i <  masked_m[e]
                  = 0                   for masked_m[e] <= i < max_m

    The layout after expert-parallel dispatch (DeepGEMM's ``m_grouped_gemm_masked``):
    expert ``e`` owns the ``max_m`` rows ``a[e]``, of which the first ``masked_m[e]``
    hold tokens. Rows at or past ``masked_m[e]`` of ``a`` are never read (garbage or
    NaN there is fine) and the same rows of the output are written as zeros (a
    decision: the output is fully defined, so a caller can reduce over it without
    a mask; it costs a store of the padding rows). fp32 accumulation, the output in
    ``a``'s dtype. The counts stay on the device: no host sync on CUDA, the GPU
    kernel (Triton) skips the tiles without tokens before loading any weight, so
    the cost follows the tokens present, not the capacity ``max_m``.

    Args:
        a: ``[E, max_m, K]`` bfloat16 / float16 / float32, any strides.
        w: ``[E, N, K]`` (nn.Linear layout), ``a``'s dtype, any strides (a transposed
            view of ``[E, K, N]`` storage is read as it is).
        masked_m: ``[E]`` int32 / int64, ``0 <= masked_m[e] <= max_m`` (checked on CPU,
            and on CUDA under ``DSPARK_DEBUG=1``; elsewhere a value outside is clamped
            to ``[0, max_m]``).
        backend: "reference" | "cpu" | "triton" | "cuda" | None.

    Returns:
        ``[E, max_m, N]`` in ``a``'s dtype.
    """
    op = "grouped_gemm_masked"
    mode = _mode(op, _device_of(op, "a", a), backend)
    if mode == "op":
        return torch.ops.dspark.grouped_gemm_masked(a, w, masked_m)
    _check_grouped_gemm_masked(a, w, masked_m)
    if mode == "triton":
        from .triton.grouped_gemm_masked import grouped_gemm_masked as impl

        return impl(a, w, masked_m)
    return _ref.grouped_gemm_masked(a, w, masked_m)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              block_shape: tuple[int, int] = (128, 128), activation: str = "silu",
              backend: str | None = None) -> torch.Tensor:
    r"""A mixture-of-experts MLP on routed tokens (the target's MoE layer on the verify batch).

    ::

        out[t] = Σ_j topk_weights[t, j] · w2[e] (silu(w13[e, :I] x_t) ⊙ w13[e, I:] x_t),
        e = topk_ids[t, j];  an id of −1 contributes nothing

    ``w13`` rows ``[0, I)`` are the gate projection and ``[I, 2I)`` the up projection
    (vLLM's layout). bf16 / fp16 in (fp32 accepted), fp32 accumulation, output in
    ``x``'s dtype. The GPU kernel (Triton) gathers rows by index (no permute), fuses
    gate + up + SiLU-and-mul into GEMM1 and the routed weight into GEMM2, sums the
    top-k slots deterministically, and its work grows with the experts the routing
    touches; no host sync (CUDA-graph safe), M from 1 to 64k.

    fp8 weights (DeepSeek-V3 / vLLM ``block_shape=[128, 128]``): ``w13`` and ``w2`` in
    float8_e4m3fn with float32 block scales ``w13_scale [E, ceil(2I/bn), ceil(H/bk)]``,
    ``w2_scale [E, ceil(H/bn), ceil(I/bk)]`` (``(bn, bk) = block_shape``; a weight is its
    fp8 value times the scale of its ``bn × bk`` block). The activations are quantised
    on the fly, and this is part of the contract (every backend, the reference
    included, computes it exactly so): ``x`` per token in groups of ``bk`` columns to
    e4m3 with the fp32 scale ``amax / 448`` (round to nearest even, saturating; a group
    of zeros has scale 0), and the float32 intermediate ``silu(g) ⊙ u`` the same way
    before GEMM2; the products are summed in fp32 and scaled per K block (the GPU
    kernel uses fp8 tensor cores, sm_89+; older GPUs run the PyTorch implementation). Runs as ``torch.ops.dspark.fused_moe_fp8`` (a
    separate op: see ``_registration.py``). Scales are required iff the weights are fp8.

    Args:
        x: ``[M, H]``, any strides.
        w13: ``[E, 2I, H]``, ``x``'s dtype or float8_e4m3fn. w2: ``[E, H, I]``, likewise.
        topk_weights: ``[M, k]`` float (any float dtype; used in fp32).
        topk_ids: ``[M, k]`` int32 / int64 in ``[-1, E)`` (checked on CPU, and on CUDA
            under ``DSPARK_DEBUG=1``; elsewhere an id outside contributes nothing).
        w13_scale, w2_scale: float32 block scales (fp8 weights only; any strides).
        block_shape: ``(block_n, block_k)`` of the weight scales, also the activation
            group size ``block_k`` (fp8 only; the Triton kernel needs ``block_k % 32 == 0``).
        activation: "silu" (the only one).
        backend: "reference" | "cpu" | "triton" | "cuda" | None.

    Returns:
        ``[M, H]`` in ``x``'s dtype.
    """
    if _check_scales_match_weights(w13, w2, w13_scale, w2_scale):
        return _fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape, activation,
                              backend)
    op = "fused_moe"
    mode = _mode(op, _device_of(op, "x", x), backend)
    if mode == "op":
        return torch.ops.dspark.fused_moe(x, w13, w2, topk_weights, topk_ids, activation=activation)
    _check_fused_moe(x, w13, w2, topk_weights, topk_ids, activation)
    if mode == "triton":
        from .triton.fused_moe import fused_moe as impl

        return impl(x, w13, w2, topk_weights, topk_ids, activation)
    return _ref.fused_moe(x, w13, w2, topk_weights, topk_ids, activation)


def _fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape, activation, backend):
    op = "fused_moe_fp8"
    mode = _mode(op, _device_of("fused_moe", "x", x), backend)
    if mode == "op":
        block_shape = list(_check_block_shape("fused_moe", block_shape))
        return torch.ops.dspark.fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale,
                                              block_shape=block_shape, activation=activation)
    _check_fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape, activation)
    if mode == "triton":
        return fused_moe_fp8_triton(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape,
                                    activation)
    return _ref.fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, tuple(block_shape),
                              activation)
