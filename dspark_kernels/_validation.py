"""Argument validation shared by every public wrapper: errors name the op and the
argument, and say what was expected and what was given."""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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


def _per_request(op, name, value, batch, device, dtype):
    """A per-request [B] tensor from a tensor, a Python scalar or None."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        return torch.full((batch,), value, dtype=dtype, device=device)
    _check_tensor(op, name, value, dim=1, shape=(batch,), device=device)
    if value.dtype.is_floating_point != dtype.is_floating_point:
        _fail(op, f"{name} must be a {'floating' if dtype.is_floating_point else 'integer'} tensor, got {value.dtype}")
    return value


def _default_seed_offset(op, seed, offset, batch, device):
    if seed is None:
        # From torch's default generator of the device: reproducible under
        # torch.manual_seed, no host sync on CUDA.
        seed = torch.randint(0, 2**62, (batch,), dtype=torch.int64, device=device)
    elif not isinstance(seed, torch.Tensor):
        seed = torch.full((batch,), int(seed), dtype=torch.int64, device=device)
    if offset is None:
        offset = torch.zeros(batch, dtype=torch.int64, device=device)
    elif not isinstance(offset, torch.Tensor):
        offset = torch.full((batch,), int(offset), dtype=torch.int64, device=device)
    _check_tensor(op, "seed", seed, dim=1, shape=(batch,), dtypes=_INT_DTYPES, device=device)
    _check_tensor(op, "offset", offset, dim=1, shape=(batch,), dtypes=_INT_DTYPES, device=device)
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
