"""draft_block_attention on the CPU: one batched ``scaled_dot_product_attention`` call in fp32.

PyTorch's SDPA already is the right CPU implementation of this attention (a fused,
vectorised, multi-threaded flash kernel), so the CPU backend is SDPA rather than
C++ of our own. The ragged batch is padded into one call:

* queries ``[B, H, M, D]`` with ``M`` the longest block (rows past a block's end
  repeat its last row and are dropped afterwards; when every block has ``M`` rows,
  the common case, these are views of the inputs and the output, no gathers);
* keys / values ``[B, Hkv, W + M (+1), D]``: every slot of the circular context
  window (a slot is visible iff it holds one of the last ``min(L, W, window)``
  positions: ``((L - 1 - slot) mod W) < n_vis``), then the block's own rows, then,
  with sinks, one zero key / value whose logit the mask sets to ``sinks[h]``;
* an additive mask ``[B, H, 1, keys]``: 0 for visible keys, ``-inf`` for slots
  and padded rows that are not, ``sinks[h]`` for the sink column. It does not
  depend on the query, so no row is ever fully masked;
* GQA / MQA through ``enable_gqa`` (kv head ``h // (H / Hkv)``), no copy of K / V
  per query head.

Inputs are converted to fp32, the output to ``q.dtype``.

Non-finite input (docs/attention.md): SDPA alone would hide a bad key behind a
``-inf`` score and turn an all ``-inf`` row into zeros, so every output row
``(i, h)`` gets ``+ flag`` where ``flag = sum(x * 0)`` over what the row reads
(``q[i, h]``; the visible context and the block rows of kv head ``g``; ``sinks[h]``
unless ``-inf``): 0 for finite input, NaN as soon as one term is NaN or +-inf.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _alloc_out(num_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The output buffer (tests replace this to poison it with NaN)."""
    return torch.empty((num_tokens, num_heads, head_dim), dtype=dtype, device=device)


def _nonfinite_flag(qp, kc, vc, kb, vb, valid, sinks, group: int) -> torch.Tensor:
    """``[B, H, M, 1]``: 0 where a row reads only finite numbers, NaN where it reads a NaN / inf.

    ``x * 0`` is 0 for finite ``x`` and NaN for NaN / +-inf, so sums of it are an
    exact "anything non-finite?" test. ``kc / vc`` already hold 0 in invisible
    slots; padded block rows (``~valid``) repeat a real row and are excluded."""
    q_flag = (qp * 0).sum(-1, keepdim=True)                        # [B, H, M, 1]
    blk = ((kb * 0).sum(-1) + (vb * 0).sum(-1))                    # [B, Hkv, M]
    blk = torch.where(valid[:, None, :], blk, 0.0).sum(-1)        # [B, Hkv]
    ctx = (kc * 0).sum((-1, -2)) + (vc * 0).sum((-1, -2))          # [B, Hkv]
    kv_flag = (blk + ctx).repeat_interleave(group, dim=1)          # [B, H]
    flag = q_flag + kv_flag[:, :, None, None]
    if sinks is not None:
        s = sinks.to(qp.dtype)
        flag = flag + torch.where(s == float("-inf"), 0.0, s * 0)[None, :, None, None]
    return flag


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
    max_block_len: int | None = None,
    *,
    compute_dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """Arguments validated by the caller (shapes, and the data checks: cu_block
    monotone from 0 to T, ctx_lens >= 0). ``max_block_len`` is not needed here.
    ``compute_dtype=None`` computes in the inputs' dtype on their device (the
    benchmark's "eager SDPA" baseline: what an engine without this op would write)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_block.shape[1]
    batch, cache_window = k_ctx.shape[0], k_ctx.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    out = _alloc_out(num_tokens, num_heads, head_dim, q.dtype, q.device)
    if num_tokens == 0 or batch == 0:
        return out

    cu = cu_block.to(torch.int64)
    n = cu[1:] - cu[:-1]                                           # [B]
    longest = int(n.max())
    uniform = longest * batch == num_tokens   # every block has `longest` rows: views, no gather
    i = torch.arange(longest, device=q.device)
    valid = i[None, :] < n[:, None]                                # [B, M]
    rows = (cu[:-1, None] + torch.minimum(i[None, :], (n[:, None] - 1).clamp_min(0))).clamp(0, num_tokens - 1)

    f32 = compute_dtype or q.dtype
    device = q.device

    def blocks(t: torch.Tensor) -> torch.Tensor:                   # [T, h, D] -> [B, h, M, D]
        t = t.to(f32)
        return (t.unflatten(0, (batch, longest)) if uniform else t[rows]).transpose(1, 2)

    qp = blocks(q)                                                 # [B, H, M, D]
    kb = blocks(k_block)                                           # [B, Hkv, M, D]
    vb = blocks(v_block)
    kc = k_ctx.to(f32).transpose(1, 2)                             # [B, Hkv, W, D]
    vc = v_ctx.to(f32).transpose(1, 2)

    lens = ctx_lens.to(torch.int64).clamp_min(0)
    limit = cache_window if window is None else min(cache_window, int(window))
    n_vis = lens.clamp_max(max(limit, 0))
    if cache_window > 0:
        slot = torch.arange(cache_window, device=device)
        visible = torch.remainder(lens[:, None] - 1 - slot[None, :], cache_window) < n_vis[:, None]
    else:
        visible = torch.zeros(batch, 0, dtype=torch.bool, device=device)
    # A slot that is not visible (e.g. a torch.empty window not yet full) is never read
    # into arithmetic: a -inf mask alone would still multiply its NaN / inf by zero.
    kc = torch.where(visible[:, None, :, None], kc, 0.0)
    vc = torch.where(visible[:, None, :, None], vc, 0.0)
    ninf = torch.tensor(float("-inf"), dtype=f32, device=device)
    zero = torch.tensor(0.0, dtype=f32, device=device)
    mask = torch.cat([torch.where(visible, zero, ninf), torch.where(valid, zero, ninf)], dim=1)  # [B, W + M]
    mask = mask[:, None, None, :].expand(batch, num_heads, 1, mask.shape[1])
    keys, values = [kc, kb], [vc, vb]
    if sinks is not None:
        null = torch.zeros(batch, num_kv_heads, 1, head_dim, dtype=f32, device=device)
        keys.append(null)
        values.append(null)
        sink_col = sinks.to(f32)[None, :, None, None].expand(batch, num_heads, 1, 1)
        mask = torch.cat([mask, sink_col], dim=3)
    res = F.scaled_dot_product_attention(qp, torch.cat(keys, dim=2), torch.cat(values, dim=2),
                                         attn_mask=mask.contiguous(), scale=scale,
                                         enable_gqa=num_kv_heads != num_heads)
    res = res.transpose(1, 2)                                      # [B, M, H, D]
    if compute_dtype is not None:  # the op (the eager baseline is plain SDPA, as an engine would write it)
        res = res + _nonfinite_flag(qp, kc, vc, kb, vb, valid, sinks, num_heads // num_kv_heads).transpose(1, 2)
    if uniform:
        out.view(batch, longest, num_heads, head_dim).copy_(res)
    else:
        out[rows[valid]] = res[valid].to(q.dtype)
    return out
