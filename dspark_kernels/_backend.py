"""Loading the compiled extension, registering fallbacks, choosing a backend.

`import dspark_kernels` never fails because a backend is missing: the schema is
always defined (by the extension, or here in Python when it is absent), and an
op whose preferred backend is missing falls back to the next one and warns once.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

_here = os.path.dirname(os.path.abspath(__file__))
_load_error: str | None = None


def _load_extension() -> bool:
    """Load the compiled ops: $DSPARK_KERNELS_LIBRARY (e.g. the CMake build an engine
    vendors) if set, else the extension built into the package."""
    global _load_error
    override = os.environ.get("DSPARK_KERNELS_LIBRARY")
    if override:
        candidates = [override]
    else:
        candidates = sorted(glob.glob(os.path.join(_here, "_C*.so")) + glob.glob(os.path.join(_here, "_C*.pyd")))
    if not candidates:
        _load_error = "no compiled extension dspark_kernels/_C*.so (build with `pip install -e .`)"
        return False
    try:
        torch.ops.load_library(candidates[0])
        return True
    except OSError as exc:  # built against another torch, missing libcudart, ...
        _load_error = f"{candidates[0]}: {exc}"
        return False


HAS_EXTENSION = _load_extension()


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dspark::{op}", key)
    except RuntimeError:
        return False


def _compiled_kernels() -> dict[str, set[str]]:
    """{op: {"CPU", "CUDA"}} of the compiled extension, read before any Python
    registration (which may add a Triton impl under the CUDA key)."""
    if not HAS_EXTENSION:
        return {}
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("dspark::")]
    return {n: {k for k in ("CPU", "CUDA") if _has_kernel(n, k)} for n in names}


COMPILED = _compiled_kernels()
CUDA_COMPILED = "CUDA" in COMPILED.get("verify_block", ())
CPU_COMPILED = "CPU" in COMPILED.get("verify_block", ())


def _triton_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# Fixed at import (not per call) so that the backend choice traces under torch.compile.
TRITON_AVAILABLE = _triton_available()
TRITON_OPS = frozenset(f[:-3] for f in os.listdir(os.path.join(_here, "triton")) if f.endswith(".py"))


def triton_available() -> bool:
    return TRITON_AVAILABLE


# Ops whose cpu backend is PyTorch code registered under the CPU key from Python
# (_registration.py), not a C++ kernel: always available.
PYTORCH_CPU_OPS = frozenset({"moe_align", "grouped_gemm", "grouped_gemm_masked", "fused_moe",
                             "fused_moe_fp8", "draft_block_attention"})


def backends(op: str = "verify_block") -> dict[str, bool]:
    """Which implementations of `op` can run here: {"reference", "cpu", "triton", "cuda"} -> bool."""
    kernels = COMPILED.get(op, set())
    return {
        "reference": True,
        "cpu": "CPU" in kernels or op in PYTORCH_CPU_OPS,
        "triton": TRITON_AVAILABLE and op in TRITON_OPS,
        "cuda": "CUDA" in kernels and torch.cuda.is_available(),
    }


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def choose_backend(op: str, device: torch.device, backend: str | None) -> str:
    """The backend an op call runs on: the forced one, else the best available for `device`."""
    available = backends(op)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
        if not available[backend]:
            why = f" ({_load_error})" if backend in ("cpu", "cuda") and _load_error else ""
            raise RuntimeError(f"{op}: backend {backend!r} is not available here{why}; available: "
                               f"{[b for b, ok in available.items() if ok]}")
        if backend in ("cuda",) and device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if backend == "cpu" and device.type != "cpu":
            raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got tensors on {device}")
        return backend
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for name in order:
        if available[name]:
            # Ops with no C++ at all (PYTORCH_CPU_OPS) have Triton as their GPU backend by
            # design: choosing it is not a fallback worth a warning.
            if name != order[0] and not (name == "triton" and op in PYTORCH_CPU_OPS):
                warn_once(f"{op}:{device.type}", f"dspark_kernels.{op}: backend {order[0]!r} is not available "
                          f"({_load_error or 'not built'}); falling back to {name!r}")
            return name
    return "reference"
