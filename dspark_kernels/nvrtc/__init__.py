"""The NVRTC backend: the CUDA C++ device code of ``csrc/include/dspark`` compiled at
first use (no toolkit, no build) and launched on torch's current stream.

See docs/building.md ("CUDA without a toolkit"). ``available()`` says whether it can
run here; ``DSPARK_NO_NVRTC=1`` turns it off.
"""

from __future__ import annotations

import functools
import os

from ._compiler import NvrtcError, nvrtc_version  # noqa: F401


@functools.cache
def importable() -> bool:
    """cuda-bindings imports and loads a libnvrtc (no GPU needed)."""
    if os.environ.get("DSPARK_NO_NVRTC") == "1":
        return False
    try:
        nvrtc_version()
        from cuda.bindings import driver  # noqa: F401
    except (NvrtcError, ImportError, OSError, RuntimeError):
        return False
    try:
        from . import _source
        _source.include_dir()
    except FileNotFoundError:
        return False
    return True


def unavailable_reason() -> str | None:
    if os.environ.get("DSPARK_NO_NVRTC") == "1":
        return "DSPARK_NO_NVRTC=1"
    try:
        nvrtc_version()
    except NvrtcError as exc:
        return str(exc)
    try:
        from . import _source
        _source.include_dir()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def available() -> bool:
    """The NVRTC backend can run CUDA tensors here: importable and a CUDA GPU present."""
    import torch
    return importable() and torch.cuda.is_available()
