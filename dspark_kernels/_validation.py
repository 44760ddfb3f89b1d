"""Argument validation shared by every public wrapper: errors name the op and the
argument, and say what was expected and what was given."""

from __future__ import annotations

import numbers

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Small per-head / per-slot float arguments (sinks, topk_weights) used in fp32: any float dtype.
_ANY_FLOAT_DTYPES = _FLOAT_DTYPES + (torch.float64,)
_INT_DTYPES = (torch.int32, torch.int64)


def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _check_tensor(op, name, t, *, dim=None, dtypes=None, device=None, shape=None):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        _fail(op, f"{name} must be a {dim}-D tensor, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(op, f"{name} must have dtype in {[str(d).replace('torch.', '') for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        _fail(op, f"{name} must be on {device}, got {t.device}")


_INT32_MAX = 2**31 - 1


def _python_number(op, name, value, floating):
    """A Python scalar argument, checked: a real number (floating) or an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real if floating else numbers.Integral):
        _fail(op, f"{name} must be a {'float' if floating else 'int'} or a [B] tensor, got "
                  f"{type(value).__name__} {value!r}")
    return float(value) if floating else int(value)


def _per_request(op, name, value, batch, device, dtype):
    """A per-request [B] tensor from a tensor (passed on as it is: the op checks it), a
    Python scalar (the same value for every request) or None.

    A Python ``top_k`` outside int32 is clamped to ``[0, 2^31 - 1]``: ``k <= 0`` and
    ``k >= V`` both mean "off", so the clamp changes nothing."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    value = _python_number(op, name, value, dtype.is_floating_point)
    if dtype == torch.int32:
        value = min(max(value, 0), _INT32_MAX)
    return torch.full((batch,), value, dtype=dtype, device=device)



def _per_request_sampling(op, temperature, top_k, top_p, min_p, batch, device):
    """``(temperature, top_k, top_p, min_p)`` as per-request ``[B]`` tensors or None
    (``_per_request`` each: fp32, int32, fp32, fp32), the sampling parameters every
    sampling op takes."""
    return (_per_request(op, "temperature", temperature, batch, device, torch.float32),
            _per_request(op, "top_k", top_k, batch, device, torch.int32),
            _per_request(op, "top_p", top_p, batch, device, torch.float32),
            _per_request(op, "min_p", min_p, batch, device, torch.float32))

def _python_int64(op, name, value, lo, hi):
    value = _python_number(op, name, value, floating=False)
    if not lo <= value < hi:
        _fail(op, f"{name} must be an int in [{_pow2(lo)}, {_pow2(hi)}), got {value}")
    return value


def _pow2(v: int) -> str:
    return ("-" if v < 0 else "") + f"2^{abs(v).bit_length() - 1}"


def _default_seed_offset(op, seed, offset, batch, device):
    """seed / offset as [B] int64 tensors. A Python seed may be any 64-bit pattern
    (``[-2^63, 2^64)``; values from 2^63 are the same bits as int64), an offset any
    int64 (positions ``offset + i`` wrap modulo 2^64, on every backend)."""
    if seed is None:
        # From torch's default generator of the device: reproducible under
        # torch.manual_seed, no host sync on CUDA.
        seed = torch.randint(0, 2**62, (batch,), dtype=torch.int64, device=device)
    elif not isinstance(seed, torch.Tensor):
        value = _python_int64(op, "seed", seed, -(2**63), 2**64)
        seed = torch.full((batch,), value - 2**64 if value >= 2**63 else value, dtype=torch.int64, device=device)
    if offset is None:
        offset = torch.zeros(batch, dtype=torch.int64, device=device)
    elif not isinstance(offset, torch.Tensor):
        offset = torch.full((batch,), _python_int64(op, "offset", offset, -(2**63), 2**63), dtype=torch.int64,
                            device=device)
    return seed, offset


def _check_sampling_tensors(op, batch, device, temperature, top_k, top_p, seed, offset):
    """The per-request sampling arguments of verify_block / draft_sample_block, as tensors."""
    for name, t, floating in (("temperature", temperature, True), ("top_k", top_k, False), ("top_p", top_p, True)):
        if t is not None:
            _check_tensor(op, name, t, dim=1, shape=(batch,), device=device)
            if t.dtype.is_floating_point != floating:
                _fail(op, f"{name} must be a {'floating' if floating else 'integer'} tensor, got {t.dtype}")
    for name, t in (("seed", seed), ("offset", offset)):
        _check_tensor(op, name, t, dim=1, shape=(batch,), dtypes=_INT_DTYPES, device=device)


def _check_offsets(op, name, cu, total, total_name) -> torch.Tensor:
    """Ragged offsets ``cu [B + 1]``: ``cu[0] = 0``, non-decreasing, ``cu[B] = total``
    (host reads; comparisons only, in int64, so no value can overflow). Returns the
    per-request counts ``cu[1:] - cu[:-1]`` (int64, on the CPU)."""
    c = cu.detach().cpu().to(torch.int64)
    if c.numel() == 0:
        _fail(op, f"{name} must have B + 1 >= 1 entries, got shape {tuple(cu.shape)}")
    if int(c[0]) != 0:
        _fail(op, f"{name}[0] must be 0, got {int(c[0])}")
    if int(c[-1]) != total:
        _fail(op, f"{name}[B] must equal {total_name} = {total}, got {name}[{c.numel() - 1}] = {int(c[-1])}")
    dec = c[1:] < c[:-1]
    if dec.any():
        b = int(torch.nonzero(dec)[0])
        _fail(op, f"{name} must be non-decreasing, got {name}[{b}] = {int(c[b])} > {name}[{b + 1}] = {int(c[b + 1])}")
    return c[1:] - c[:-1]


def _check_min_p(op, min_p, batch, device):
    """``min_p [B]`` (optional): a floating tensor, like top_p."""
    if min_p is not None:
        _check_tensor(op, "min_p", min_p, dim=1, shape=(batch,), device=device)
        if not min_p.dtype.is_floating_point:
            _fail(op, f"min_p must be a floating tensor, got {min_p.dtype}")


def _check_draft_ids(op, draft_tokens, vocab: int, vocab_name: str = "V") -> None:
    """Every draft id is -1 (padding) or in ``[0, vocab)`` (host read)."""
    d = draft_tokens.detach().cpu()
    bad = (d < -1) | (d >= vocab)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        _fail(op, f"draft_tokens[{i}] = {int(d[i])} is outside [-1, {vocab_name}) with {vocab_name} = {vocab}")


def _check_draft_index(op, draft_index, num_draft, draft_logits, draft_probs, device):
    """``draft_index [N]`` (optional, int32 / int64): q of draft i is row draft_index[i] of
    draft_logits / draft_probs, so one of them must be given."""
    if draft_index is None:
        return
    _check_tensor(op, "draft_index", draft_index, dim=1, shape=(num_draft,), dtypes=_INT_DTYPES, device=device)
    if draft_logits is None and draft_probs is None:
        _fail(op, "draft_index needs draft_logits or draft_probs (it selects their rows)")
    q = draft_logits if draft_logits is not None else draft_probs
    if num_draft > 0 and q.dim() == 2 and q.shape[0] < 1:
        _fail(op, f"draft_index needs at least one row of {'draft_logits' if draft_logits is not None else 'draft_probs'}"
                  f" (got shape {tuple(q.shape)}) for N = {num_draft} drafts")


def _check_draft_index_data(op, draft_index, draft_logits, draft_probs):
    """Every draft_index entry names a row of draft_logits / draft_probs (host read)."""
    if draft_index is None:
        return
    rows = (draft_logits if draft_logits is not None else draft_probs).shape[0]
    name = "draft_logits" if draft_logits is not None else "draft_probs"
    d = draft_index.detach().cpu().to(torch.int64)
    bad = (d < 0) | (d >= rows)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        _fail(op, f"draft_index[{i}] = {int(d[i])} is outside [0, {name}.size(0)) = [0, {rows})")
