"""One declaration per op, one registration, one dispatch path.

Every op is declared once, beside its public function, by an :class:`OpSpec`
(schema, fake, checks, and the implementations that exist). This module turns the
specs into ``torch.ops.dspark.*`` the same way for every op:

* the schema is defined here, from the spec: it is the only copy of the schema
  text (the compiled extension registers kernels only, ``TORCH_LIBRARY_IMPL``),
  so ``torch.ops.dspark.<op>`` exists on every install, with the schema's keyword
  defaults;
* the ``Meta`` key runs the spec's fake (exact output shapes: torch.compile,
  CUDA-graph capture);
* the ``CPU`` key runs the C++ kernel where the extension has one, else the
  spec's PyTorch CPU implementation, else its reference (with a one-time warning
  when a C++ kernel was expected);
* the ``CUDA`` key runs the CUDA C++ kernel where the extension has one, else the
  same device code compiled at run time through NVRTC (``dspark_kernels.nvrtc``,
  where cuda-bindings and libnvrtc are installed and ``DSPARK_NO_NVRTC`` is not 1),
  else the spec's Triton kernel, else the reference with a one-time warning (it
  reads the data on the host: slow, never silent).

Validation: each Python implementation registered here runs the spec's checks
first (shape / dtype / device, then the data-dependent ones on CPU tensors and,
under ``DSPARK_DEBUG=1``, on CUDA tensors); the C++ kernels check their own
arguments. So every entry point, a direct ``torch.ops.dspark.*`` call included,
is checked once, by the implementation that runs, before any work.

``dispatch(spec, backend, *args)`` is the single exit of every public wrapper:
``backend=None`` calls ``torch.ops.dspark.<op>`` (one opaque op for
torch.compile and CUDA graphs); a named backend calls that implementation
directly, or raises an error that names the backend.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import numbers
import os
from collections.abc import Callable

import torch

from . import _backend

BACKENDS = ("reference", "cpu", "triton", "cuda", "nvrtc")

Impl = Callable | str | None


@dataclasses.dataclass(eq=False)
class OpSpec:
    """The declaration of one op.

    Every callable takes the schema's arguments in the schema's order, positionally
    (keyword-only ones included); implementations given as ``"module:function"``
    (relative to ``dspark_kernels``) are imported on first use.

    Attributes:
        schema: the full schema, ``"name(Tensor a, *, int b=1) -> Tensor"``.
        fake: the Meta kernel (shapes only, no data reads).
        reference: the executable spec (pure PyTorch).
        check: shape / dtype / device / scalar checks (no data reads); raises
            ``ValueError("<op>: <argument> ...")``.
        check_data: the data-dependent checks (host reads): run on CPU tensors
            always and on CUDA tensors under ``DSPARK_DEBUG=1``.
        cpu: the PyTorch CPU implementation, for ops without a C++ CPU kernel.
        triton: the Triton implementation.
        nvrtc: the NVRTC implementation (``dspark_kernels.nvrtc.ops``): the CUDA C++
            device code compiled at run time, for installs without the CUDA build.
        cpp: the dispatch keys the compiled extension provides for this op
            ({"CPU", "CUDA"}); a build without them falls back, with a warning.
        device_arg: the argument whose device decides the backend (default:
            the first tensor argument).
    """

    schema: str
    fake: Callable
    reference: Impl
    check: Callable
    check_data: Callable | None = None
    cpu: Impl = None
    triton: Impl = None
    nvrtc: Impl = None
    cpp: frozenset = frozenset()
    device_arg: str | None = None

    def __post_init__(self) -> None:
        parsed = torch._C.parse_schema(self.schema)
        self.name = parsed.name
        self.arguments = list(parsed.arguments)
        self.signature = inspect.Signature([
            inspect.Parameter(
                a.name, inspect.Parameter.KEYWORD_ONLY if a.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=a.default_value if a.has_default_value() else inspect.Parameter.empty)
            for a in parsed.arguments])
        # Plain Python copies of the schema's facts: torch.compile traces the public
        # functions down to the op call and cannot trace the C++ schema objects.
        self._kwarg_only = [a.kwarg_only for a in parsed.arguments]
        self._names = names = [a.name for a in parsed.arguments]
        self._types = [str(a.type) for a in parsed.arguments]
        if self.device_arg is None:
            self.device_arg = next(a.name for a in parsed.arguments if "Tensor" in str(a.type))
        self._device_index = names.index(self.device_arg)
        self._resolved: dict[str, Callable] = {}

    # ------------------------------------------------------------------ arguments

    def ordered(self, args, kwargs) -> tuple:
        """The call's arguments in schema order, defaults filled in (how the dispatcher
        hands them to Python kernels varies: kwarg-only arguments come as keywords, and
        those left at their defaults may be absent)."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments.values())

    def split(self, ordered: tuple) -> tuple[list, dict]:
        """Schema-ordered arguments as the (positional, keyword) call ``torch.ops`` takes."""
        pos, kw = [], {}
        for name, v, kwarg_only in zip(self._names, ordered, self._kwarg_only):
            if kwarg_only:
                kw[name] = v
            else:
                pos.append(v)
        return pos, kw

    def check_types(self, ordered: tuple) -> None:
        """Every argument has its schema type (before the dispatcher converts it, whose
        errors do not say which op is at fault); ints fit in int64."""
        for name, kind, value in zip(self._names, self._types, ordered):
            what = _type_error(kind, value)
            if what is not None:
                raise ValueError(f"{self.name}: {name} must be {what}, got {_describe(value)}")

    def device(self, ordered: tuple) -> torch.device:
        value = ordered[self._device_index]
        if isinstance(value, (list, tuple)):  # a Tensor[] argument: its first tensor
            value = value[0] if value else None
        return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")

    # ------------------------------------------------------------------ implementations

    def impl(self, which: str) -> Callable:
        """The implementation ``which`` ("reference" | "cpu" | "triton" | "nvrtc"), imported on first use."""
        fn = self._resolved.get(which)
        if fn is None:
            target = getattr(self, which)
            if isinstance(target, str):
                module, _, attr = target.partition(":")
                fn = getattr(importlib.import_module(module, __package__), attr)
            else:
                fn = target
            self._resolved[which] = fn
        return fn

    def run_checked(self, which: str, ordered: tuple):
        """Checks, then the Python implementation ``which``."""
        self.check(*ordered)
        if self.check_data is not None and _debug_checks_enabled(self.device(ordered)):
            self.check_data(*ordered)
        return self.impl(which)(*ordered)

    def call_op(self, ordered: tuple):
        """Through the dispatcher: ``torch.ops.dspark.<op>``."""
        pos, kw = self.split(ordered)
        return getattr(torch.ops.dspark, self.name).default(*pos, **kw)


_INT64 = (-(2**63), 2**63 - 1)


def _is_int(v) -> bool:
    return (isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool)
            and (isinstance(v, torch.SymInt) or _INT64[0] <= v <= _INT64[1]))


def _type_error(kind: str, value) -> str | None:
    """What ``value`` should have been for the schema type ``kind``, or None if it is one."""
    if kind.startswith("Optional["):
        return None if value is None else _type_error(kind[len("Optional["):-1], value)
    if kind == "Tensor":
        return None if isinstance(value, torch.Tensor) else "a torch.Tensor"
    if kind == "List[Tensor]":
        ok = isinstance(value, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in value)
        return None if ok else "a list of torch.Tensor"
    if kind == "int":
        return None if _is_int(value) else "an int in [-2^63, 2^63)"
    if kind == "List[int]":
        ok = isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)
        return None if ok else "a list of ints"
    if kind == "float":
        ok = isinstance(value, (numbers.Real, torch.SymFloat)) and not isinstance(value, bool)
        return None if ok else "a float"
    if kind == "bool":
        return None if isinstance(value, bool) else "a bool"
    if kind == "str":
        return None if isinstance(value, str) else "a str"
    return None


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _debug_checks_enabled(device: torch.device) -> bool:
    return device.type == "cpu" or os.environ.get("DSPARK_DEBUG") == "1"


REGISTRY: dict[str, OpSpec] = {}
_LIB = torch.library.Library("dspark", "DEF")


def declare(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the registry and define its schema (kernels come in :func:`finalize`)."""
    if spec.name in REGISTRY:
        raise RuntimeError(f"dspark_kernels: op {spec.name!r} is declared twice")
    REGISTRY[spec.name] = spec
    _LIB.define(spec.schema)
    return spec


# ---------------------------------------------------------------------- registration


def _kernel(spec: OpSpec, which: str, warning: str | None = None) -> Callable:
    """A dispatcher kernel running the Python implementation ``which`` of ``spec``."""

    def kernel(*args, **kwargs):
        if warning is not None:
            _backend.warn_once(f"{spec.name}:{which}", warning)
        return spec.run_checked(which, spec.ordered(args, kwargs))

    kernel.__name__ = f"{spec.name}_{which}"
    return kernel


def _fake(spec: OpSpec) -> Callable:
    def fake(*args, **kwargs):
        return spec.fake(*spec.ordered(args, kwargs))

    return fake


def finalize() -> None:
    """Load the extension, then give every declared op its fake and, for the dispatch
    keys the extension left empty, its fallback kernels."""
    _backend.load_extension(REGISTRY)
    why_no_cpp = _backend.load_error() or "the extension was built without this op"
    for name, spec in REGISTRY.items():
        torch.library.register_fake(f"dspark::{name}", _fake(spec), lib=_LIB)
        compiled = _backend.COMPILED.get(name, set())
        if "CPU" not in compiled:
            if spec.cpu is not None:
                _LIB.impl(name, _kernel(spec, "cpu"), "CPU")
            else:
                warning = (f"dspark_kernels.{name}: the C++ CPU kernel is not available ({why_no_cpp}); "
                           "running the reference") if "CPU" in spec.cpp else None
                _LIB.impl(name, _kernel(spec, "reference", warning), "CPU")
        if "CUDA" not in compiled:
            _LIB.impl(name, _cuda_fallback(spec, why_no_cpp), "CUDA")


def _nvrtc_importable() -> bool:
    """cuda-bindings and libnvrtc are there and DSPARK_NO_NVRTC is not 1 (no GPU needed)."""
    from . import nvrtc
    return nvrtc.importable()


def _cuda_fallback(spec: OpSpec, why_no_cpp: str) -> Callable:
    """The CUDA kernel of an op the extension has no CUDA kernel for: NVRTC > Triton >
    the reference with a warning (chosen here, once, so that it traces under torch.compile)."""
    if spec.nvrtc is not None and _nvrtc_importable():
        return _kernel(spec, "nvrtc")
    if spec.triton is not None and _backend.TRITON_IMPORTABLE:
        warning = (f"dspark_kernels.{spec.name}: the CUDA C++ kernel is not available ({why_no_cpp}); "
                   "running the Triton kernel") if "CUDA" in spec.cpp else None
        return _kernel(spec, "triton", warning)
    why = "the op has no Triton kernel" if spec.triton is None else "triton is not installed"
    if spec.nvrtc is not None:
        from . import nvrtc
        why = f"{why}, NVRTC is not available ({nvrtc.unavailable_reason()})"
    if "CUDA" in spec.cpp:
        why = f"{why}, and the CUDA C++ kernel is not available: {why_no_cpp}"
    return _kernel(spec, "reference", f"dspark_kernels.{spec.name}: no GPU kernel for CUDA tensors here ({why}); "
                                      "running the reference, which reads the data on the host (slow); build the "
                                      "extension with a CUDA toolkit or pip install 'dspark_kernels[nvrtc]'")


# ---------------------------------------------------------------------- backends and dispatch


def backends(op: str | None = None):
    """Which implementations of ``op`` run here: ``{"reference", "cpu", "triton", "cuda", "nvrtc"} -> bool``,
    True iff ``dspark_kernels.<op>(..., backend=name)`` works. Without ``op``: ``{op: {...}}``
    for every op."""
    if op is None:
        return {name: backends(name) for name in REGISTRY}
    spec = REGISTRY.get(op)
    if spec is None:
        raise ValueError(f"backends: unknown op {op!r}; ops: {sorted(REGISTRY)}")
    compiled = _backend.COMPILED.get(op, set())
    return {
        "reference": True,
        "cpu": "CPU" in compiled or spec.cpu is not None,
        "triton": spec.triton is not None and _backend.TRITON_AVAILABLE,
        "cuda": "CUDA" in compiled and torch.cuda.is_available(),
        "nvrtc": spec.nvrtc is not None and torch.cuda.is_available() and _nvrtc_importable(),
    }


def _nvrtc_reason() -> str:
    from . import nvrtc
    return nvrtc.unavailable_reason() or "?"


def _unavailable(spec: OpSpec, backend: str) -> str:
    reasons = {
        "cpu": f"no C++ CPU kernel ({_backend.load_error() or 'not in this build'})",
        "triton": ("the op has no Triton kernel" if spec.triton is None else
                   "triton is not installed" if not _backend.TRITON_IMPORTABLE else
                   "no GPU and TRITON_INTERPRET is not 1"),
        "cuda": ("the op has no CUDA C++ kernel" if "CUDA" not in spec.cpp else
                 "no CUDA GPU" if not torch.cuda.is_available() else
                 f"the CUDA kernels are not built ({_backend.load_error() or 'built without CUDA'})"),
        "nvrtc": ("the op has no CUDA C++ device code" if spec.nvrtc is None else
                  "no CUDA GPU" if not torch.cuda.is_available() else _nvrtc_reason()),
    }
    ok = [b for b, yes in backends(spec.name).items() if yes]
    return f"dspark_kernels.{spec.name}: backend {backend!r} is not available here: {reasons[backend]}; available: {ok}"


def dispatch(spec: OpSpec, backend: str | None, *ordered):
    """Run ``spec`` on schema-ordered arguments: through ``torch.ops.dspark`` for
    ``backend=None``, else on the named implementation."""
    spec.check_types(ordered)
    if backend is None:
        return spec.call_op(ordered)
    if backend not in BACKENDS:
        raise ValueError(f"{spec.name}: backend must be one of {BACKENDS} or None, got {backend!r}")
    if not backends(spec.name)[backend]:
        raise RuntimeError(_unavailable(spec, backend))
    device = spec.device(ordered)
    if device.type == "meta":
        raise ValueError(f"{spec.name}: backend {backend!r} needs real tensors, got {spec.device_arg} on meta "
                         "(meta tensors go through backend=None, which runs the fake kernel)")
    if backend in ("cpu", "cuda", "nvrtc") and device.type != ("cpu" if backend == "cpu" else "cuda"):
        raise ValueError(f"{spec.name}: backend {backend!r} needs {'CPU' if backend == 'cpu' else 'CUDA'} tensors, "
                         f"got {spec.device_arg} on {device}")
    if backend == "triton" and not (device.type == "cuda" or
                                    (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError(f"{spec.name}: backend 'triton' needs CUDA tensors (or CPU tensors under "
                         f"TRITON_INTERPRET=1), got {spec.device_arg} on {device}")
    if backend in ("reference", "triton", "nvrtc") or (backend == "cpu" and "CPU" not in _backend.COMPILED.get(spec.name, ())):
        return spec.run_checked(backend, ordered)
    return spec.call_op(ordered)  # the C++ kernel under the tensors' own key
