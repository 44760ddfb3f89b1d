"""MoE ops for the target's verify pass: public functions and declarations (docs/moe.md).

``moe_align``, ``grouped_gemm`` (``out=`` goes to ``torch.ops.dspark.grouped_gemm_out``),
``grouped_gemm_masked`` (the expert-parallel layout) and ``fused_moe`` (bf16 / fp16 /
fp32 weights, or fp8 e4m3 with block scales, through one op), each a documented
function with ``backend=None`` ∈ {"reference", "cpu", "triton", "cuda"}.

Backends: ``reference`` (``reference/moe.py``, float32 loops, the spec); ``cpu``
(PyTorch, ``cpu/<op>.py``: a loop over the touched experts of oneDNN GEMMs is the
right CPU implementation); ``triton`` (``triton/<op>.py``, the GPU backend, the CUDA
key of the op); no CUDA C++ kernel.
"""

from __future__ import annotations

import torch

from . import _backend, _registry
from ._validation import _ANY_FLOAT_DTYPES, _FLOAT_DTYPES, _INT_DTYPES, _check_tensor, _fail
from .reference.moe import align_sizes

_FP8 = torch.float8_e4m3fn


# --------------------------------------------------------------------------- checks


def _check_moe_align(topk_ids, num_experts, block_m):
    op = "moe_align"
    _check_tensor(op, "topk_ids", topk_ids, dim=2, dtypes=_INT_DTYPES)
    for name, v in (("num_experts", num_experts), ("block_m", block_m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _fail(op, f"{name} must be an int >= 1, got {v!r}")
    length, _ = align_sizes(topk_ids.numel(), num_experts, block_m)
    if length >= 2**31:
        _fail(op, f"topk_ids.numel() + num_experts * (block_m - 1) must be < 2^31, got {length}")


def _check_moe_align_data(topk_ids, num_experts, block_m):
    _check_ids("moe_align", topk_ids, num_experts)


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


def _check_grouped_gemm_data(a, w, expert_offsets, out=None):
    op = "grouped_gemm"
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


def _check_grouped_gemm_masked_data(a, w, masked_m):
    op = "grouped_gemm_masked"
    max_m = a.shape[1]
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
    _check_tensor(op, "topk_weights", topk_weights, dim=2, shape=tuple(topk_ids.shape), dtypes=_ANY_FLOAT_DTYPES,
                  device=device)
    if activation != "silu":
        _fail(op, f"activation must be 'silu', got {activation!r}")
    if topk_ids.numel() >= 2**31:
        _fail(op, f"topk_ids.numel() must be < 2^31, got {topk_ids.numel()}")


def _check_fused_moe_plain(x, w13, w2, topk_weights, topk_ids, activation):
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


def _check_fused_moe(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape, activation):
    """bf16 / fp16 / fp32 weights without scales, or fp8 weights with block scales."""
    if _check_scales_match_weights(w13, w2, w13_scale, w2_scale):
        _check_fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape, activation)
    else:
        _check_fused_moe_plain(x, w13, w2, topk_weights, topk_ids, activation)


def _check_fused_moe_data(x, w13, w2, topk_weights, topk_ids, *rest):
    _check_ids("fused_moe", topk_ids, w13.shape[0])


# --------------------------------------------------------------------------- implementations with the schema's arguments


def _fused_moe_reference(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape, activation):
    from .reference import moe as ref

    if w13_scale is not None:
        return ref.fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, tuple(block_shape),
                                 activation)
    return ref.fused_moe(x, w13, w2, topk_weights, topk_ids, activation)


def _fused_moe_triton(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape, activation):
    if w13_scale is None:
        from .triton.fused_moe import fused_moe as impl

        return impl(x, w13, w2, topk_weights, topk_ids, activation)
    from .triton.fused_moe_fp8 import fp8_supported
    from .triton.fused_moe_fp8 import fused_moe_fp8 as impl

    if not fp8_supported(x.device):  # Triton has no float8_e4m3fn before sm_89
        from .cpu.fused_moe import fused_moe_fp8 as torch_impl

        _backend.warn_once("fused_moe_fp8:pre-sm89", "dspark_kernels.fused_moe: fp8 weights on a GPU before sm_89 "
                           "run the PyTorch implementation (Triton has no float8_e4m3fn there; it syncs the host)")
        return torch_impl(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, tuple(block_shape))
    return impl(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, tuple(block_shape), activation)


def _grouped_gemm_out_reference(a, w, expert_offsets, out):
    from .reference import moe as ref

    out.copy_(ref.grouped_gemm(a, w, expert_offsets))


# --------------------------------------------------------------------------- public functions


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

    Example:

    >>> import torch, dspark_kernels as dk
    >>> sorted_ids, expert_ids, total = dk.moe_align(torch.tensor([[0, 1], [1, -1]]), 2, 2)
    >>> sorted_ids.tolist(), expert_ids.tolist(), total.tolist()
    ([0, 4, 1, 2, 4, 4], [0, 1, -1], [4])
    """
    return _registry.dispatch(MOE_ALIGN, backend, topk_ids, num_experts, block_m)


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

    Example:

    >>> import torch, dspark_kernels as dk
    >>> a = torch.ones(3, 2)
    >>> w = torch.stack([torch.eye(2), 2 * torch.eye(2)])   # expert 0: identity, expert 1: doubles
    >>> dk.grouped_gemm(a, w, torch.tensor([0, 1, 3])).tolist()
    [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
    """
    if out is None:
        return _registry.dispatch(GROUPED_GEMM, backend, a, w, expert_offsets)
    _registry.dispatch(GROUPED_GEMM_OUT, backend, a, w, expert_offsets, out)
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

    Example:

    >>> import torch, dspark_kernels as dk
    >>> a, w = torch.ones(2, 2, 3), torch.ones(2, 1, 3)
    >>> dk.grouped_gemm_masked(a, w, torch.tensor([1, 2])).squeeze(-1).tolist()
    [[3.0, 0.0], [3.0, 3.0]]
    """
    return _registry.dispatch(GROUPED_GEMM_MASKED, backend, a, w, masked_m)


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
    kernel uses fp8 tensor cores, sm_89+; older GPUs run the PyTorch implementation). Scales are required iff the weights are fp8
    (one op, ``torch.ops.dspark.fused_moe``, for both: docs/moe.md).

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

    Example:

    >>> import torch, dspark_kernels as dk
    >>> _ = torch.manual_seed(0)
    >>> x, w13, w2 = torch.randn(4, 8), torch.randn(2, 6, 8), torch.randn(2, 8, 3)   # H = 8, I = 3, E = 2
    >>> ids, weights = torch.tensor([[0, 1], [1, -1], [0, 0], [1, 0]]), torch.rand(4, 2)
    >>> out = dk.fused_moe(x, w13, w2, weights, ids)
    >>> out.shape, torch.allclose(out, dk.fused_moe(x, w13, w2, weights, ids, backend="reference"), atol=1e-5)
    (torch.Size([4, 8]), True)
    """
    if isinstance(block_shape, tuple):
        block_shape = list(block_shape)
    return _registry.dispatch(FUSED_MOE, backend, x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale,
                              block_shape, activation)


# --------------------------------------------------------------------------- declarations


def _moe_align_fake(topk_ids, num_experts, block_m):
    length, num_blocks = align_sizes(topk_ids.numel(), num_experts, block_m)
    i32 = dict(dtype=torch.int32)
    return (topk_ids.new_empty((length,), **i32), topk_ids.new_empty((num_blocks,), **i32),
            topk_ids.new_empty((1,), **i32))


MOE_ALIGN = _registry.declare(_registry.OpSpec(
    schema="moe_align(Tensor topk_ids, int num_experts, int block_m) "
           "-> (Tensor sorted_token_ids, Tensor expert_ids, Tensor num_tokens_post_pad)",
    fake=_moe_align_fake, reference=".reference.moe:moe_align", cpu=".cpu.moe_align:moe_align",
    triton=".triton.moe_align:moe_align", check=_check_moe_align, check_data=_check_moe_align_data,
))
GROUPED_GEMM = _registry.declare(_registry.OpSpec(
    schema="grouped_gemm(Tensor a, Tensor w, Tensor expert_offsets) -> Tensor",
    fake=lambda a, w, expert_offsets: a.new_empty((a.shape[0], w.shape[1])),
    reference=".reference.moe:grouped_gemm", cpu=".cpu.grouped_gemm:grouped_gemm",
    triton=".triton.grouped_gemm:grouped_gemm", check=_check_grouped_gemm, check_data=_check_grouped_gemm_data,
))
GROUPED_GEMM_OUT = _registry.declare(_registry.OpSpec(
    schema="grouped_gemm_out(Tensor a, Tensor w, Tensor expert_offsets, *, Tensor(a!) out) -> ()",
    fake=lambda a, w, expert_offsets, out: None,
    reference=_grouped_gemm_out_reference, cpu=".cpu.grouped_gemm:grouped_gemm_out",
    triton=".triton.grouped_gemm:grouped_gemm_out", check=_check_grouped_gemm, check_data=_check_grouped_gemm_data,
))
GROUPED_GEMM_MASKED = _registry.declare(_registry.OpSpec(
    schema="grouped_gemm_masked(Tensor a, Tensor w, Tensor masked_m) -> Tensor",
    fake=lambda a, w, masked_m: a.new_empty((a.shape[0], a.shape[1], w.shape[1])),
    reference=".reference.moe:grouped_gemm_masked", cpu=".cpu.grouped_gemm_masked:grouped_gemm_masked",
    triton=".triton.grouped_gemm_masked:grouped_gemm_masked", check=_check_grouped_gemm_masked,
    check_data=_check_grouped_gemm_masked_data,
))
FUSED_MOE = _registry.declare(_registry.OpSpec(
    schema="fused_moe(Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, *, "
           "Tensor? w13_scale=None, Tensor? w2_scale=None, int[] block_shape=[128, 128], "
           "str activation=\"silu\") -> Tensor",
    fake=lambda x, w13, w2, *rest: x.new_empty((x.shape[0], w2.shape[1])),
    reference=_fused_moe_reference, cpu=".cpu.fused_moe:fused_moe", triton=_fused_moe_triton,
    check=_check_fused_moe, check_data=_check_fused_moe_data,
))
