"""The drafter's attention: ``dspark_kernels.draft_block_attention`` (docs/attention.md).

Backends: "reference" (float64 loops, the spec), "cpu" (PyTorch SDPA in fp32,
``dspark_kernels/cpu/draft_block_attention.py``, the CPU key of
``torch.ops.dspark.draft_block_attention``) and "triton" (FlashAttention-style,
``dspark_kernels/triton/draft_block_attention.py``, the CUDA key). There is no
CUDA C++ kernel: on CUDA tensors Triton is the GPU backend (docs/attention.md).
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _registry
from ._validation import _ANY_FLOAT_DTYPES, _FLOAT_DTYPES, _INT_DTYPES, _check_offsets, _check_tensor, _fail

OP = "draft_block_attention"


def draft_block_attention(
    q: torch.Tensor,
    k_block: torch.Tensor,
    v_block: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    cu_block: torch.Tensor,
    ctx_lens: torch.Tensor,
    *,
    sinks: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    window: int | None = None,
    max_block_len: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Block attention of a parallel drafter: each block attends to itself and its context window.

    ``B`` requests drafted blocks of ``n_b = cu_block[b+1] - cu_block[b]`` tokens
    (ragged, ``n_b = 0`` allowed), flattened into ``T = sum n_b`` rows. Request
    ``b`` has ``L_b = ctx_lens[b]`` context tokens (absolute positions
    ``0 .. L_b - 1``) whose keys / values live in a per-request circular window
    cache: position ``t`` in slot ``t % W`` of ``k_ctx[b] / v_ctx[b]``. Only the
    last ``n_vis = min(L_b, W, window)`` positions are visible (``window=None``:
    ``W``; ``window`` caps the context at that many most recent tokens).

    Query ``i`` of request ``b`` (row ``r = cu_block[b] + i``), head ``h``, kv head
    ``g = h // (H / Hkv)`` (GQA / MQA) attends **non-causally** to all its block's
    keys and to the visible context keys::

        K = [k_ctx[b, t % W, g] for t in L_b - n_vis .. L_b - 1] ++ [k_block[r', g] for r' in block b]
        V = likewise from v_ctx / v_block
        s_j = softmax_scale * <q[r, h], K_j>
        out[r, h] = sum_j exp(s_j) V_j / (sum_j exp(s_j) + exp(sinks[h]))

    The sink term is absent when ``sinks`` is None (an attention sink is an extra
    logit with no value, as in gpt-oss / DeepSeek-V4; it is not scaled by
    ``softmax_scale``). ``softmax_scale`` defaults to ``1 / sqrt(D)``. Math in fp32
    or better (reference: float64), output in q's dtype.

    Args:
        q: ``[T, H, D]`` float32 / float16 / bfloat16; any strides.
        k_block, v_block: ``[T, Hkv, D]`` the block's own keys / values (q's dtype),
            ``H % Hkv == 0``.
        k_ctx, v_ctx: ``[B, W, Hkv, D]`` the circular context window caches (q's dtype).
        cu_block: ``[B + 1]`` int32 / int64 offsets, ``cu[0] = 0``, non-decreasing, ``cu[B] = T``.
        ctx_lens: ``[B]`` int32 / int64, ``>= 0`` (may exceed ``W``: the window wraps).
        sinks: ``[H]`` float tensor of per-head sink logits, or None.
        softmax_scale: a float, default ``1 / sqrt(D)``.
        window: an int ``>= 0``, at most this many most recent context tokens; None: ``W``.
        max_block_len: an int ``>=`` the longest block; it only sizes the GPU grid
            (a smaller value is still correct, just slower). None reads it from
            ``cu_block`` (one host read: pass it under CUDA graphs / torch.compile).
        backend: "reference" | "cpu" | "triton" | None ("cuda" does not exist for
            this op: Triton is its GPU backend).

    Returns:
        ``out [T, H, D]`` in q's dtype, contiguous.

    Example:

    >>> import torch, dspark_kernels as dk
    >>> _ = torch.manual_seed(0)
    >>> q, k_block, v_block = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)   # H = 4, Hkv = 2
    >>> k_ctx, v_ctx = torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)                      # W = 16
    >>> cu, ctx_lens = torch.tensor([0, 2, 3]), torch.tensor([5, 20])       # blocks of 2 and 1; 20 > W wraps
    >>> out = dk.draft_block_attention(q, k_block, v_block, k_ctx, v_ctx, cu, ctx_lens, max_block_len=2)
    >>> ref = dk.draft_block_attention(q, k_block, v_block, k_ctx, v_ctx, cu, ctx_lens, max_block_len=2,
    ...                                backend="reference")
    >>> out.shape, torch.allclose(out, ref, atol=1e-5)
    (torch.Size([3, 4, 8]), True)
    """
    if max_block_len is None:
        _check_tensor(OP, "cu_block", cu_block, dim=1, dtypes=_INT_DTYPES)
        _check_tensor(OP, "q", q, dim=3)
        n = _check_offsets(OP, "cu_block", cu_block, q.shape[0], "q.size(0)") if cu_block.shape[0] > 0 else None
        max_block_len = int(n.max()) if n is not None and n.numel() else 0
    if isinstance(softmax_scale, numbers.Real) and not isinstance(softmax_scale, bool):
        softmax_scale = float(softmax_scale)
    return _registry.dispatch(DRAFT_BLOCK_ATTENTION, backend, q, k_block, v_block, k_ctx, v_ctx, cu_block, ctx_lens,
                              sinks, softmax_scale, window, max_block_len)


# --------------------------------------------------------------------------- checks


def _validate(q, k_block, v_block, k_ctx, v_ctx, cu_block, ctx_lens, sinks, softmax_scale, window,
              max_block_len) -> None:
    """Shape / dtype / device checks (no data reads): every message names the argument."""
    op = OP
    _check_tensor(op, "q", q, dim=3, dtypes=_FLOAT_DTYPES)
    device, dtype = q.device, q.dtype
    num_tokens, num_heads, head_dim = q.shape
    if head_dim < 1 or num_heads < 1:
        _fail(op, f"q must have at least one head of dimension >= 1, got shape {tuple(q.shape)}")
    _check_tensor(op, "k_block", k_block, dim=3, device=device)
    num_kv_heads = k_block.shape[1]
    if k_block.shape[0] != num_tokens or k_block.shape[2] != head_dim:
        _fail(op, f"k_block must have shape [T, Hkv, D] = [{num_tokens}, Hkv, {head_dim}] (T, D from q), "
                  f"got {tuple(k_block.shape)}")
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        _fail(op, f"k_block must have Hkv kv heads dividing the H = {num_heads} query heads, "
                  f"got shape {tuple(k_block.shape)}")
    _check_tensor(op, "v_block", v_block, dim=3, shape=k_block.shape, device=device)
    _check_tensor(op, "k_ctx", k_ctx, dim=4, device=device)
    batch = k_ctx.shape[0]
    if tuple(k_ctx.shape[2:]) != (num_kv_heads, head_dim):
        _fail(op, f"k_ctx must have shape [B, W, Hkv, D] = [B, W, {num_kv_heads}, {head_dim}], "
                  f"got {tuple(k_ctx.shape)}")
    _check_tensor(op, "v_ctx", v_ctx, dim=4, shape=k_ctx.shape, device=device)
    for name, t in (("k_block", k_block), ("v_block", v_block), ("k_ctx", k_ctx), ("v_ctx", v_ctx)):
        if t.dtype != dtype:
            _fail(op, f"{name} must have q's dtype {dtype}, got {t.dtype}")
    _check_tensor(op, "cu_block", cu_block, dim=1, shape=(batch + 1,), dtypes=_INT_DTYPES, device=device)
    _check_tensor(op, "ctx_lens", ctx_lens, dim=1, shape=(batch,), dtypes=_INT_DTYPES, device=device)
    if sinks is not None:
        _check_tensor(op, "sinks", sinks, dim=1, shape=(num_heads,), dtypes=_ANY_FLOAT_DTYPES, device=device)
    if softmax_scale is not None and (not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool)
                                      or not math.isfinite(float(softmax_scale))):
        _fail(op, f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    if window is not None and (not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 0):
        _fail(op, f"window must be an int >= 0 or None, got {window!r}")
    if max_block_len is not None and (not isinstance(max_block_len, (numbers.Integral, torch.SymInt))
                                      or isinstance(max_block_len, bool) or max_block_len < 0):
        _fail(op, f"max_block_len must be an int >= 0 or None, got {max_block_len!r}")


def _check_data(q, k_block, v_block, k_ctx, v_ctx, cu_block, ctx_lens, *rest) -> None:
    """Data-dependent checks (host reads): CPU always, CUDA under DSPARK_DEBUG=1."""
    op = OP
    num_tokens = q.shape[0]
    _check_offsets(op, "cu_block", cu_block, num_tokens, "q.size(0)")
    if ctx_lens.numel() and int(ctx_lens.min()) < 0:
        b = int(torch.argmin(ctx_lens))
        _fail(op, f"ctx_lens[{b}] must be >= 0, got {int(ctx_lens[b])}")


# --------------------------------------------------------------------------- declaration


def _fake(q, k_block, v_block, k_ctx, v_ctx, cu_block, ctx_lens, sinks, softmax_scale, window, max_block_len):
    return q.new_empty(q.shape)


DRAFT_BLOCK_ATTENTION = _registry.declare(_registry.OpSpec(
    schema="draft_block_attention(Tensor q, Tensor k_block, Tensor v_block, Tensor k_ctx, Tensor v_ctx, "
           "Tensor cu_block, Tensor ctx_lens, *, Tensor? sinks=None, float? softmax_scale=None, "
           "int? window=None, SymInt max_block_len) -> Tensor",
    fake=_fake,
    reference=".reference.draft_block_attention:draft_block_attention",
    cpu=".cpu.draft_block_attention:draft_block_attention",
    triton=".triton.draft_block_attention:draft_block_attention",
    check=_validate,
    check_data=_check_data,
))
