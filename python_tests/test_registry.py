"""The registry: every declared op through every entry point equals its reference.

Parametrised over ``dspark_kernels._registry.REGISTRY`` (so a new op is covered as
soon as it is declared, and must bring sample inputs in ``registry_samples.py``):

* ``torch.ops.dspark.<op>`` with only its required arguments plus the keywords it
  needs, in this process and in subprocesses with and without the compiled
  extension (``DSPARK_NO_EXTENSION=1``), equals the reference;
* ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` for each op;
* every (op, backend) that ``backends()`` marks True runs and equals the
  reference; every one marked False raises an error naming the backend;
* the schemas torch holds are exactly the declared ones, and the extension
  registers kernels only for declared ops.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels import _backend, _registry
from dspark_kernels._registry import REGISTRY

import registry_samples as rs

OPS = sorted(REGISTRY)
HERE = os.path.dirname(os.path.abspath(__file__))


def _device(backend: str) -> str:
    return "cuda" if backend in ("cuda", "nvrtc") or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def test_every_op_has_samples():
    assert set(rs.SAMPLES) == set(REGISTRY), "each declared op needs sample inputs in registry_samples.py"


def test_schemas_are_the_declared_ones():
    for name, spec in REGISTRY.items():
        held = getattr(torch.ops.dspark, name).default._schema
        assert str(held) == "dspark::" + str(torch._C.parse_schema(spec.schema)), name


def test_extension_registers_declared_ops_only():
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("dspark::")}
    assert names == set(REGISTRY)
    assert set(_backend.COMPILED) <= set(REGISTRY)
    for name, keys in _backend.COMPILED.items():
        assert keys <= REGISTRY[name].cpp, f"{name}: the extension has {keys}, the spec expects {REGISTRY[name].cpp}"


def test_backends_table_covers_every_op():
    table = dk.backends()
    assert set(table) == set(REGISTRY)
    for name, avail in table.items():
        assert set(avail) == set(_registry.BACKENDS) and avail["reference"], name
        assert avail == dk.backends(name)
    with pytest.raises(ValueError, match="unknown op"):
        dk.backends("no_such_op")


@pytest.mark.parametrize("op", OPS)
def test_torch_ops_equals_reference(op):
    args, kwargs = rs.sample(op)
    got = rs.outputs(op, args, kwargs, getattr(torch.ops.dspark, op)(*args, **kwargs))
    rs.assert_same(op, got, rs.reference_outputs(op))


@pytest.mark.parametrize("no_extension", [True, False], ids=["no-extension", "extension"])
def test_torch_ops_in_a_fresh_process(no_extension):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    env.pop("DSPARK_NO_EXTENSION", None)
    if no_extension:
        env["DSPARK_NO_EXTENSION"] = "1"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "registry_samples.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    # With the variable unset, a built extension must load (a stale or broken build fails here).
    assert lines[0] == f"extension loaded: {not no_extension and bool(_backend._candidates())}"
    assert sorted(line.split(":")[0] for line in lines[1:]) == OPS


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    args, kwargs = rs.sample(op)
    torch.library.opcheck(getattr(torch.ops.dspark, op).default, args, kwargs)


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(op):
    torch._dynamo.reset()  # one code object for every op: start each from an empty cache
    fn = getattr(torch.ops.dspark, op)
    compiled = torch.compile(lambda *a, **k: fn(*a, **k), fullgraph=True, backend="aot_eager")
    args, kwargs = rs.sample(op)
    got = rs.outputs(op, args, kwargs, compiled(*args, **kwargs))
    rs.assert_same(op, got, rs.reference_outputs(op))


@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_every_backend_equals_reference_or_names_itself(op, backend):
    spec = REGISTRY[op]
    device = _device(backend) if dk.backends(op)[backend] else "cpu"  # the refusal comes before any device use
    args, kwargs = rs.sample(op, device)
    ordered = spec.ordered(args, kwargs)
    if not dk.backends(op)[backend]:
        with pytest.raises(RuntimeError, match=f"backend '{backend}'"):
            _registry.dispatch(spec, backend, *ordered)
        return
    result = _registry.dispatch(spec, backend, *ordered)
    rs.assert_same(op, rs.outputs(op, args, kwargs, result), rs.reference_outputs(op))


@pytest.mark.parametrize("op", OPS)
def test_meta_tensors_are_refused_by_named_backends(op):
    args, kwargs = rs.sample(op, "meta")
    ordered = REGISTRY[op].ordered(args, kwargs)
    for backend in ("reference", "cpu"):
        if dk.backends(op)[backend]:
            with pytest.raises((ValueError, RuntimeError), match="meta"):
                _registry.dispatch(REGISTRY[op], backend, *ordered)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.random_words(torch.tensor([1]), torch.tensor([1]), torch.tensor([1]), 3, backend="tpu")
