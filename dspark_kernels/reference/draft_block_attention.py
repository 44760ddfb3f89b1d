"""draft_block_attention, pure PyTorch in float64: the executable spec (docs/attention.md).

Written for clarity, one request and one query head at a time. For request ``b``
with block rows ``s = cu_block[b] .. e = cu_block[b+1]`` and ``L = ctx_lens[b]``
context tokens, query head ``h`` (kv head ``g = h // (H / Hkv)``) sees

* the visible context keys: positions ``L - n_vis .. L - 1`` with
  ``n_vis = min(L, W, window)`` (``window=None``: ``W``), position ``t`` read from
  slot ``t % W`` of ``k_ctx[b] / v_ctx[b]``;
* every key of its own block, rows ``s .. e - 1`` of ``k_block / v_block``
  (non-causal);
* with ``sinks``, one more logit ``sinks[h]`` that has no value.

    out[i, h] = sum_j softmax([scale * q[i, h] . K[j, g] ; sinks[h]])_j  V[j, g]

Non-finite input (docs/attention.md "Non-finite input"): the row ``out[i, h]`` is
NaN, all ``D`` entries, when anything it reads is NaN or +-inf: ``q[i, h]``, a
key or value it sees (the visible context of kv head ``g`` and its block's own
rows), or ``sinks[h]`` unless that is ``-inf`` (a sink of ``-inf`` adds
``exp(-inf) = 0``: the same as no sink). Invisible window slots are never read.
Attention has no limit to take for such input, so it reports it where it lands
instead of averaging it away (a ``-inf`` score would otherwise hide a bad key).

Every backend must match this within the FlashAttention tolerance rule (its error
against this float64 result at most twice that of plain PyTorch math in the
inputs' dtype, plus a small epsilon).
"""

from __future__ import annotations

import math

import torch


def visible_positions(ctx_len: int, cache_window: int, window: int | None) -> list[int]:
    """Absolute positions of the context tokens a request's queries see (oldest first)."""
    limit = cache_window if window is None else min(cache_window, window)
    n_vis = max(0, min(ctx_len, limit))
    return list(range(ctx_len - n_vis, ctx_len))


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
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The spec (arguments already validated). ``max_block_len`` is accepted and
    ignored (only the GPU kernel's grid needs it). Returns ``[T, H, D]`` in
    ``out_dtype`` (default ``q.dtype``) on ``q.device``; computed in float64."""
    device = q.device
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_block.shape[1]
    group = num_heads // num_kv_heads
    cache_window = k_ctx.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)

    f64 = torch.float64
    q64, kb64, vb64 = (t.detach().cpu().to(f64) for t in (q, k_block, v_block))
    kc64, vc64 = k_ctx.detach().cpu().to(f64), v_ctx.detach().cpu().to(f64)
    sinks64 = sinks.detach().cpu().to(f64) if sinks is not None else None
    cu = cu_block.cpu().to(torch.int64).tolist()
    lens = ctx_lens.cpu().to(torch.int64).tolist()

    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=f64)
    for b in range(len(cu) - 1):
        start, end = cu[b], cu[b + 1]
        if end <= start:
            continue
        slots = [t % cache_window for t in visible_positions(lens[b], cache_window, window)]
        keys = torch.cat([kc64[b, slots], kb64[start:end]])                 # [n_vis + n, Hkv, D]
        values = torch.cat([vc64[b, slots], vb64[start:end]])
        if sinks64 is not None:  # the sink: one more logit, with a zero value
            values = torch.cat([values, torch.zeros(1, num_kv_heads, head_dim, dtype=f64)])
        # a NaN / inf that a kv head's rows read (keys or values, context or block)
        kv_bad = ~(torch.isfinite(keys).all(dim=2).all(dim=0) & torch.isfinite(values).all(dim=2).all(dim=0))
        for h in range(num_heads):
            g = h // group
            logits = (q64[start:end, h] @ keys[:, g].T) * scale             # [n, n_vis + n]
            if sinks64 is not None:
                logits = torch.cat([logits, sinks64[h].expand(end - start, 1)], dim=1)
            probs = torch.softmax(logits, dim=1)
            out[start:end, h] = probs @ values[:, g]
            sink_bad = sinks64 is not None and bool(torch.isnan(sinks64[h]) or sinks64[h] == math.inf)
            row_bad = ~torch.isfinite(q64[start:end, h]).all(dim=1) | bool(kv_bad[g]) | sink_bad
            out[start:end, h][row_bad] = math.nan
    return out.to(out_dtype or q.dtype).to(device)
