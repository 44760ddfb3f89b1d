"""The compiled extension and Triton: what this install has.

``load_extension`` loads ``dspark_kernels._C`` (or ``$DSPARK_KERNELS_LIBRARY``, e.g.
the CMake build an engine vendors) unless ``DSPARK_NO_EXTENSION=1``, and records
which dispatch keys it filled for each op (``COMPILED``). A library that cannot be
loaded (built against another torch, missing libcudart, built by an older version
of this package that still defined the schemas) leaves the package working on
its Python implementations; ``load_error()`` says why.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import warnings

import torch

_here = os.path.dirname(os.path.abspath(__file__))
_load_error: str | None = None

HAS_EXTENSION = False
# {op: {"CPU", "CUDA"}}: the dispatch keys the compiled extension registered, read
# before any Python registration.
COMPILED: dict[str, set[str]] = {}
CUDA_COMPILED = False
CPU_COMPILED = False

TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
# Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter. Fixed at
# import (not per call) so that the backend choice traces under torch.compile.
TRITON_AVAILABLE = TRITON_IMPORTABLE and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def load_error() -> str | None:
    """Why the compiled extension is not loaded (None when it is)."""
    return _load_error


def _candidates() -> list[str]:
    override = os.environ.get("DSPARK_KERNELS_LIBRARY")
    if override:
        return [override]
    return sorted(glob.glob(os.path.join(_here, "_C*.so")) + glob.glob(os.path.join(_here, "_C*.pyd")))


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dspark::{op}", key)
    except RuntimeError:
        return False


def load_extension(ops) -> bool:
    """Load the compiled kernels (once); fill COMPILED for the declared ``ops``."""
    global HAS_EXTENSION, _load_error, COMPILED, CUDA_COMPILED, CPU_COMPILED
    if os.environ.get("DSPARK_NO_EXTENSION") == "1":
        _load_error = "DSPARK_NO_EXTENSION=1"
        return False
    candidates = _candidates()
    if not candidates:
        _load_error = "no compiled extension dspark_kernels/_C*.so (build with `pip install -e .`)"
        return False
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError) as exc:  # another torch, missing libcudart, an old build defining schemas
        _load_error = f"{candidates[0]}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        return False
    HAS_EXTENSION = True
    COMPILED = {op: {k for k in ("CPU", "CUDA") if _has_kernel(op, k)} for op in ops}
    COMPILED = {op: keys for op, keys in COMPILED.items() if keys}
    CUDA_COMPILED = "CUDA" in COMPILED.get("verify_block", ())
    CPU_COMPILED = "CPU" in COMPILED.get("verify_block", ())
    return True


def triton_available() -> bool:
    return TRITON_AVAILABLE


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
