"""What every engine adapter shares: request-index maps computed on the device, seeds,
the min-p pass-through.

Nothing here reads a tensor back to the host.
"""

from __future__ import annotations

import torch

SEED_HIGH = 2**62  # random per-request seeds are drawn in [0, 2^62), like verify_block's own default


def min_p_kwargs(min_p: torch.Tensor | None, needed: bool) -> dict:
    """``{"min_p": min_p}`` when a request needs it (``needed`` is a host-side fact, e.g.
    vLLM's ``MinPLogitsProcessor.min_p_count > 0``: no device read), else ``{}`` (the
    kernels then skip the min-p pass)."""
    return {"min_p": min_p} if min_p is not None and needed else {}


# ----------------------------------------------------------------------------------------
# Index maps of the ragged layout, on the device (no host reads).


def request_of(cu: torch.Tensor, count: int) -> torch.Tensor:
    """For ``i = 0 .. count-1``, the request ``b`` with ``cu[b] <= i < cu[b+1]`` (int64).
    ``cu`` is ``[B + 1]`` with ``cu[0] = 0``."""
    i = torch.arange(count, device=cu.device, dtype=torch.int64)
    return torch.searchsorted(cu[1:].to(torch.int64).contiguous(), i, right=True)


def exclusive_offsets(inclusive: torch.Tensor) -> torch.Tensor:
    """``[0, c_0, c_1, ...]`` from an inclusive cumsum without the leading 0 (vLLM's
    ``cu_num_draft_tokens``), as int64."""
    zero = torch.zeros(1, dtype=torch.int64, device=inclusive.device)
    return torch.cat([zero, inclusive.to(torch.int64)])


def rows_with_bonus(target_rows: torch.Tensor, cu: torch.Tensor, batch: int) -> torch.Tensor:
    """``[N, V]`` rows of the drafts only (vLLM V1's ``target_probs``) laid out as the
    ``[N + B, V]`` verify layout: request ``b``'s draft rows, then a filler row where the
    bonus row would be (a copy of a neighbouring row: its content is never used, the
    caller supplies the bonus token). One ``[N + B, V]`` gather."""
    num_draft, vocab = target_rows.shape
    if num_draft == 0:
        return target_rows.new_zeros((batch, vocab))
    ext = cu.to(torch.int64) + torch.arange(batch + 1, device=cu.device, dtype=torch.int64)
    req = request_of(ext, num_draft + batch)
    src = (torch.arange(num_draft + batch, device=cu.device) - req).clamp_(max=num_draft - 1)
    return target_rows.index_select(0, src)


def log_of_probs(probs: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Log-probabilities as logits (``softmax(log p) = p`` for a normalised row; zeros
    become -inf, so a token of probability 0 is never accepted nor drawn). ``inplace``
    only for the adapters' own temporaries; otherwise one new ``[rows, V]`` tensor, the
    one pass an engine that hands over probabilities instead of logits costs."""
    if probs.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return torch.log(probs.float())
    return probs.log_() if inplace else torch.log(probs)


def random_seeds(batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B]`` int64 seeds drawn on the device (from ``generator``, else torch's default
    generator of the device): no host sync, CUDA-graph safe."""
    return torch.randint(0, SEED_HIGH, (batch,), dtype=torch.int64, device=device, generator=generator)


def as_int64_bits(value: int) -> int:
    """A 64-bit pattern (``[0, 2^64)`` or ``[-2^63, 2^63)``) as a signed int64 value."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= (1 << 63) else value


def host_to_device(values: list[int], device) -> torch.Tensor:
    """A short host list as an int64 device tensor, copied without a host sync (pinned
    staging buffer and a non-blocking copy on CUDA)."""
    t = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def per_request(value, batch: int, device, dtype) -> torch.Tensor:
    """A Python scalar, a ``[1]`` tensor or a ``[B]`` tensor as a ``[B]`` tensor."""
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).to(device=device, dtype=dtype)
        return value.expand(batch).contiguous() if value.numel() == 1 else value
    return torch.full((batch,), value, dtype=dtype, device=device)
