"""Fuzz suite: every op, every backend here, against its reference (docs/correctness.md).

One hypothesis strategy per op draws *valid-shaped* small inputs (V <= 40, B <= 4,
gamma <= 4, pages <= 6, ...) in one of a few modes:

* ``plain``: finite values, moderate integers, but every layout the op's docs
  allow: empty batches (B = 0, T = 0, M = 0), V = 1, int32 / int64 mixed across
  arguments, strided / transposed / padded / stride-0 (overlapping) views;
* ``nonfinite``: as plain, plus NaN, +-inf, subnormals and huge values (up to the
  dtype's max; 1e30 in GEMMs and 1e18 in attention, where a product of two huge
  values must overflow the same way in every summation order);
* ``wide_ints``: integer arguments at their extremes (seeds over the whole int64
  range, offsets and positions near 2^32, 2^62 and 2^63, page sizes past 2^31);
* ``invalid``: one argument corrupted (an id >= V or < -1, a decreasing offsets
  tensor, a negative length, a shape off by one ...);
* op-specific classes (``shared_pages``, ``invisible_nonfinite``,
  ``padding_nonfinite``, ``wide_index``).

The oracle: the reference runs first. If it raises, it must raise a ValueError /
RuntimeError naming an argument of the op, and so must every other backend. If it
returns, every backend available here (``dk.backends(op)``; "triton" under the
interpreter only without bf16, "cuda" only with a GPU) must return the same
integer outputs exactly (sampling is a function of the Philox stream, identical on
every backend by contract), the same bytes for the KV ops, and floats equal with
NaN / inf at the same places (MoE, GEMMs, attention: within rtol 1e-4 / atol 1e-5
in fp32, 1e-2 in fp16 / bf16). Every tensor an op writes lives inside a larger
buffer filled with a sentinel (guard regions before, after and between its
elements); every byte outside the view must be untouched, and every input the op
does not write must be unchanged.

Known failures are listed in ``KNOWN_FAILURES`` below, by (op, mode): delete an
entry when its fix lands. ``DSPARK_FUZZ_SCALE=10`` runs ten times the examples;
``DSPARK_FUZZ_BACKENDS=cpu`` compares only the listed backends with the reference.
``test_zz_example_counts`` prints how many examples each
(op, mode) tried (run with ``-s`` or look at the summary line it prints).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from collections.abc import Callable

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dspark_kernels as dk  # noqa: E402
from dspark_kernels import _registry  # noqa: E402
from dspark_kernels._registry import REGISTRY  # noqa: E402
from helpers import interpreter_reads_fp8_nan  # noqa: E402

# --------------------------------------------------------------------------------------
# Known failures: (op, mode) -> reason. Delete an entry when the fix lands; keep them
# narrow (one op, one mode).
# --------------------------------------------------------------------------------------

KNOWN_FAILURES: dict[tuple[str, str], str] = {
    # Found by this suite and fixed: draft_block_attention "nonfinite" / "nonfinite_values" (the NaN-row
    # rule of docs/attention.md); fused_moe "fp8_nonfinite" (Triton's interpreter, see
    # interpreter_reads_fp8_nan below).
}

# Examples per op (or per (op, mode), which wins). The whole file runs in about 90 s on 2 cores, Triton
# interpreted included (docs/correctness.md).
EXAMPLES: dict = collections.defaultdict(lambda: 40)
EXAMPLES.update({
    "verify_block": 30,
    "verify_tree": 20,
    "token_logprobs": 30,
    "draft_sample_block": 30,
    "draft_block_attention": 20,
    "fused_moe": 20,
    "schedule_verify_lens": 30,
    "kv_commit": 60,
    "kv_release_pages": 60,
    "window_commit": 60,
    "state_select": 60,
    "random_words": 40,
    "grouped_gemm": 30,
    "grouped_gemm_out": 30,
    "grouped_gemm_masked": 30,
    "moe_align": 30,
    # (op, mode) overrides: classes whose failures are rarer
    ("fused_moe", "fp8_nonfinite"): 80,
    ("draft_block_attention", "nonfinite"): 80,
})

COUNTS: collections.Counter = collections.Counter()      # (op, mode) -> examples tried
RAISED: collections.Counter = collections.Counter()      # (op, mode) -> examples the reference refused

I32, I64 = torch.int32, torch.int64
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
GUARD = 3           # sentinel elements before and after every written view
SENTINEL = 0xA5     # the guard regions' byte


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------


def _specials(dtype: torch.dtype, huge: float) -> list[float]:
    fi = torch.finfo(dtype)
    big = min(huge, float(fi.max))
    sub = float(fi.tiny) / 4 if dtype != torch.float32 else 1e-40
    return [math.nan, math.inf, -math.inf, sub, -sub, big, -big, -0.0]


@st.composite
def floats(draw, shape, dtype, nonfinite=False, *, huge=3.4e38, scale=1.0, grid=False, where=None):
    """A float tensor: torch normal values (seeded by hypothesis; continuous, so GEMM sums
    never cancel exactly) with hypothesis-chosen special values at chosen places.
    ``grid``: multiples of 1/8 (every summation order exact). ``where``: a bool mask of
    the places specials may go (default: anywhere)."""
    n = math.prod(shape)
    seed = draw(st.integers(0, 2**16))
    t = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    if grid:
        t = (t * 8).round() / 8
    if nonfinite and n:
        allowed = torch.arange(n) if where is None else torch.nonzero(where.reshape(-1)).reshape(-1)
        if allowed.numel():
            picks = draw(st.lists(st.tuples(st.integers(0, allowed.numel() - 1),
                                            st.sampled_from(_specials(dtype, huge))),
                                  min_size=1, max_size=min(allowed.numel(), 6)))
            for i, v in picks:
                t[int(allowed[i])] = v
        if len(shape) >= 2 and where is None:  # whole rows of one special value (no finite score)
            rows = t.view(-1, shape[-1])
            for r, v in draw(st.lists(st.tuples(st.integers(0, rows.shape[0] - 1),
                                                st.sampled_from(_specials(dtype, huge)[:3] + [-1e30])),
                                      max_size=min(rows.shape[0], 2))):
                rows[r] = v
    return t.to(dtype).reshape(shape)


def ints(values, dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).reshape(-1) if not isinstance(values, torch.Tensor) else values.to(dtype)


def int_dtype(draw, *values) -> torch.dtype:
    """int32 or int64 (int64 when a value does not fit in int32)."""
    fits = all(-(2**31) <= int(v) < 2**31 for v in values)
    return draw(st.sampled_from([I32, I64])) if fits else I64


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def arranged(draw, t: torch.Tensor, kinds=("contiguous", "padded", "transposed", "step", "expand")):
    """``t``'s values in another layout (a view of a larger buffer): padded rows,
    a transposed storage, every other element, or a stride-0 (overlapping) dim 0."""
    kind = draw(st.sampled_from(kinds))
    if t.dim() == 0 or t.numel() == 0 and kind == "expand":
        kind = "contiguous"
    if kind == "padded":
        buf = torch.full((*t.shape[:-1], t.shape[-1] + 3), math.nan, dtype=t.dtype)
        buf[..., 1:1 + t.shape[-1]] = t
        return buf[..., 1:1 + t.shape[-1]], kind
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2), kind
    if kind == "step":
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), math.nan, dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2], kind
    if kind == "expand" and t.shape[0] > 0:
        return t[:1].expand(t.shape), kind
    return t.clone(), "contiguous"


@dataclasses.dataclass
class Guarded:
    """Views into one sentinel-filled buffer; every byte outside them must stay as it was."""

    base: torch.Tensor
    covered: torch.Tensor    # bool [base.numel()]
    snapshot: torch.Tensor | None = None

    def arm(self):
        self.snapshot = self.base.clone()

    def check(self, what: str):
        outside = ~self.covered
        got = _bytes(self.base.cpu()).reshape(self.base.numel(), -1)[outside]
        want = _bytes(self.snapshot.cpu()).reshape(self.base.numel(), -1)[outside]
        assert torch.equal(got, want), f"{what}: a guard region around the output was overwritten"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t.detach()).reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def guarded(values: list[torch.Tensor], free_dims: int, extra: list[int] | None = None,
            interleave: bool = False) -> tuple[list[torch.Tensor], Guarded]:
    """Copy each tensor of ``values`` into views of one sentinel-filled buffer, with GUARD
    elements before, after and between them. The first ``free_dims`` dims get strides
    ``extra[d]`` elements wider than dense (gaps inside the view are guarded too); the
    rest are dense. ``interleave`` (same shapes): the views alternate along dim 1 of the
    buffer, as K and V of one ``[P, 2, S, *row]`` tensor."""
    extra = list(extra or []) + [0] * 8
    dtype = values[0].dtype
    geometry = []
    if interleave:
        shape = values[0].shape
        inner = math.prod(shape[1:])
        stride = list(_dense_strides(shape))
        if stride:
            stride[0] = inner * len(values) + extra[0]
        for k in range(len(values)):
            geometry.append((shape, stride, GUARD + k * inner))
        span = (shape[0] - 1) * stride[0] + len(values) * inner if math.prod(shape) else 0
        total = GUARD + span + GUARD
    else:
        offset = GUARD
        for v in values:
            stride, span = [0] * v.dim(), 1
            for d in range(v.dim() - 1, -1, -1):
                stride[d] = span + (extra[d] if d < free_dims else 0)
                span += stride[d] * max(v.shape[d] - 1, 0)
            geometry.append((v.shape, stride, offset))
            offset += (span if v.numel() else 0) + GUARD
        total = offset
    sentinel = 1 if dtype == torch.bool else SENTINEL   # a bool byte must be 0 or 1
    base = torch.full((total * dtype.itemsize,), sentinel, dtype=torch.uint8).view(dtype)
    covered = torch.zeros(total, dtype=torch.bool)
    index = torch.arange(total)
    views = []
    for v, (shape, stride, off) in zip(values, geometry):
        view = base.as_strided(shape, stride, off)
        view.copy_(v)
        if v.numel():
            covered[index.as_strided(shape, stride, off).reshape(-1)] = True
        views.append(view)
    return views, Guarded(base, covered)


def _dense_strides(shape) -> list[int]:
    stride, acc = [0] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        stride[d] = acc
        acc *= max(shape[d], 1)
    return stride


# --------------------------------------------------------------------------------------
# a case and the oracle
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """``build()`` gives fresh schema-ordered arguments and the guards of the written ones."""

    build: Callable[[], tuple[tuple, list[Guarded]]]
    describe: dict
    triton: bool = True                       # small enough and no bf16
    tol: tuple[float, float] | None = None    # (rtol, atol) for float outputs; None: exact
    may_refuse: dict = dataclasses.field(default_factory=dict)   # backend -> argument it may refuse

    def __repr__(self):
        return f"Case({self.describe})"


def _names_argument(op: str, message: str) -> bool:
    text = message.split(f"{op}:", 1)[-1] if f"{op}:" in message else message
    for name in REGISTRY[op]._names:
        if len(name) > 2:
            if re.search(rf"\b{re.escape(name)}\b", text):
                return True
        elif re.search(rf"(?<![\w.]){re.escape(name)}(?=\[|\.size|\.shape|'s| must| =| is |,| and | or |\)|$)",
                       text):
            return True
    return False


def _written(spec) -> list[int]:
    return [i for i, a in enumerate(spec.arguments) if a.alias_info is not None and a.alias_info.is_write]


def _flatten_outputs(spec, ordered, result) -> list[torch.Tensor]:
    out = [result] if isinstance(result, torch.Tensor) else [r for r in (result or ()) if r is not None]
    for i in _written(spec):
        v = ordered[i]
        out.extend(v if isinstance(v, list) else [v])
    return [t.detach().cpu() for t in out]


def _inputs(spec, ordered) -> list[tuple[str, torch.Tensor]]:
    written = set(_written(spec))
    found = []
    for i, (name, v) in enumerate(zip(spec._names, ordered)):
        if i in written:
            continue
        for k, t in enumerate(v if isinstance(v, list) else [v]):
            if isinstance(t, torch.Tensor):
                found.append((f"{name}[{k}]" if isinstance(v, list) else name, t))
    return found


def _run(op, backend, case):
    """(outputs or exception, guards checked, inputs checked)."""
    spec = REGISTRY[op]
    ordered, guards = case.build()
    if backend in ("cuda", "nvrtc") or (backend == "triton" and torch.cuda.is_available()):
        ordered, guards = _on_gpu(ordered, guards)
    for g in guards:
        g.arm()
    inputs = [(name, t, t.clone()) for name, t in _inputs(spec, ordered)]
    try:
        result = _registry.dispatch(spec, backend, *ordered)
    except Exception as exc:  # noqa: BLE001 -- the oracle decides
        outcome = exc
    else:
        outcome = _flatten_outputs(spec, ordered, result)
    for g in guards:
        g.check(f"{op} [{backend}]")
    for name, t, before in inputs:
        assert torch.equal(_bytes(t), _bytes(before)), f"{op} [{backend}]: input {name} was modified"
    return outcome


def _on_gpu(ordered, guards):
    """The same arguments on the GPU, every view with its strides (guards included)."""
    bases = {g.base.untyped_storage().data_ptr(): Guarded(g.base.cuda(), g.covered) for g in guards}

    def move(v):
        if isinstance(v, list):
            return [move(x) for x in v]
        if not isinstance(v, torch.Tensor):
            return v
        g = bases.get(v.untyped_storage().data_ptr())
        if g is not None:
            return g.base.as_strided(v.shape, v.stride(), v.storage_offset())
        flat = torch.empty(0, dtype=v.dtype).set_(v.untyped_storage(), 0, (v.untyped_storage().nbytes() // v.element_size(),), (1,))
        return flat.cuda().as_strided(v.shape, v.stride(), v.storage_offset())

    return tuple(move(v) for v in ordered), list(bases.values())


def _assert_equal_outputs(op, backend, got, want, tol):
    assert len(got) == len(want), f"{op} [{backend}]: {len(got)} outputs, the reference has {len(want)}"
    for k, (g, w) in enumerate(zip(got, want)):
        where = f"{op} [{backend}] output {k}"
        assert g.shape == w.shape and g.dtype == w.dtype, f"{where}: {g.dtype}{tuple(g.shape)} != {w.dtype}{tuple(w.shape)}"
        if not w.dtype.is_floating_point or w.dtype.itemsize == 1:
            assert torch.equal(_bytes(g), _bytes(w)), f"{where}: {g.tolist()} != reference {w.tolist()}"
            continue
        gf, wf = g.double(), w.double()
        assert torch.equal(gf.isnan(), wf.isnan()), f"{where}: NaN at {gf.isnan().nonzero().tolist()}, " \
                                                    f"reference NaN at {wf.isnan().nonzero().tolist()}\n{g}\n{w}"
        inf_g, inf_w = gf.isinf(), wf.isinf()
        assert torch.equal(inf_g, inf_w) and torch.equal(gf[inf_g], wf[inf_w]), \
            f"{where}: inf at {inf_g.nonzero().tolist()}, reference inf at {inf_w.nonzero().tolist()}\n{g}\n{w}"
        fin = gf.isfinite()
        if tol is None:
            ok = torch.equal(gf[fin], wf[fin])
            assert ok, f"{where}: differs from the reference (exact)\n{g}\n{w}"
        else:
            rtol, atol = tol
            scale = wf.abs()
            if w.dtype != torch.float32:
                # fp16 / bf16: relative to the largest finite magnitude of the output row (docs/correctness.md)
                rtol, atol = max(rtol, 1e-2), max(atol, 1e-2)
                row = torch.where(fin, scale, torch.zeros_like(scale))
                scale = row.amax(-1, keepdim=True).expand_as(scale) if row.dim() and row.shape[-1] else row
            err = (gf[fin] - wf[fin]).abs()
            bound = atol + rtol * scale[fin]
            assert bool((err <= bound).all()), \
                f"{where}: max error {float((err - bound).max()):.3g} over rtol {rtol} / atol {atol}\n{g}\n{w}"


# DSPARK_FUZZ_BACKENDS=cpu: compare only these backends with the reference (.ci/sanitizers.sh runs the
# fuzz suite on the instrumented C++ CPU kernels, where interpreted Triton would only cost time).
ONLY_BACKENDS = (frozenset(os.environ["DSPARK_FUZZ_BACKENDS"].split(","))
                 if os.environ.get("DSPARK_FUZZ_BACKENDS") else None)


def check(op: str, mode: str, case: Case):
    COUNTS[op, mode] += 1
    note(repr(case))
    want = _run(op, "reference", case)
    backends = [b for b, ok in dk.backends(op).items() if ok and b != "reference"]
    backends = [b for b in backends if (b != "triton" or case.triton) and (ONLY_BACKENDS is None or b in ONLY_BACKENDS)]
    if isinstance(want, Exception):
        RAISED[op, mode] += 1
        assert isinstance(want, (ValueError, RuntimeError)) and _names_argument(op, str(want)), \
            f"{op} [reference] raised {type(want).__name__} not naming an argument: {want}"
    for backend in backends:
        got = _run(op, backend, case)
        if isinstance(want, Exception):
            assert isinstance(got, Exception), \
                f"{op} [{backend}] returned, the reference raised {type(want).__name__}: {want}"
            assert isinstance(got, (ValueError, RuntimeError)) and _names_argument(op, str(got)), \
                f"{op} [{backend}] raised {type(got).__name__} not naming an argument: {got}"
            continue
        if isinstance(got, Exception):
            refuse = case.may_refuse.get(backend)
            if refuse and refuse in str(got) and isinstance(got, (ValueError, RuntimeError)):
                continue
            raise AssertionError(f"{op} [{backend}] raised {type(got).__name__}, the reference returned: {got}") \
                from got
        _assert_equal_outputs(op, backend, got, want, case.tol)


def _plain_case(ordered, describe, **kw) -> Case:
    """A case without written arguments: fresh clones of the drawn tensors each call."""
    def build():
        return tuple(_clone(v) for v in ordered), []
    return Case(build, describe, **kw)


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone() if v.is_contiguous() or v.numel() == 0 else _clone_layout(v)
    if isinstance(v, list):
        return [_clone(x) for x in v]
    return v


def _clone_layout(v: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (and the same overlap), in fresh storage."""
    storage = v.untyped_storage()
    base = torch.empty(0, dtype=v.dtype).set_(storage.clone(), 0, (storage.nbytes() // v.element_size(),), (1,))
    return base.as_strided(v.shape, v.stride(), v.storage_offset())


def _describe(**kw) -> dict:
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            out[k] = (f"{str(v.dtype).replace('torch.', '')}{list(v.shape)} stride {v.stride()}: "
                      f"{v.tolist() if v.numel() <= 64 else '...'}")
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------
# strategies, one per op
# --------------------------------------------------------------------------------------


def _seeds(draw, batch, mode):
    if mode in ("wide_ints", "offset_overflow"):
        seeds = draw(st.lists(st.one_of(st.integers(INT64_MIN, INT64_MAX),
                                        st.sampled_from([INT64_MIN, INT64_MAX, -1, 2**32 - 1, 2**32, 2**31])),
                              min_size=batch, max_size=batch))
    else:
        seeds = draw(st.lists(st.integers(0, 2**31 - 1), min_size=batch, max_size=batch))
    return ints(seeds, int_dtype(draw, *seeds))


def _offsets(draw, batch, mode, room):
    """Per-request offsets; ``room``: the positions used past the offset (offset + room <= 2^63 - 1,
    except in ``offset_overflow``, where offset + i passes 2^63 - 1)."""
    if mode == "wide_ints":
        near = [2**31 - 1, 2**32 - 1, 2**32, 2**62, INT64_MAX - room]
        offs = draw(st.lists(st.one_of(st.integers(0, INT64_MAX - room),
                                       st.builds(lambda b, d: max(0, b - d), st.sampled_from(near),
                                                 st.integers(0, 4))),
                             min_size=batch, max_size=batch))
    elif mode == "offset_overflow":
        offs = draw(st.lists(st.integers(INT64_MAX - room, INT64_MAX), min_size=batch, max_size=batch))
    else:
        offs = draw(st.lists(st.integers(0, 10_000), min_size=batch, max_size=batch))
    return ints(offs, int_dtype(draw, *offs))


def _sampling(draw, batch, vocab, mode):
    """temperature, top_k, top_p for verify_block / draft_sample_block."""
    nf = mode == "nonfinite"
    temp_values = [0.0, -1.0, 0.5, 1.0, 2.0, 1e-3] + ([math.nan, math.inf, -math.inf, 1e-40, 3e38] if nf else [])
    temperature = None
    if draw(st.booleans()):
        temperature = torch.tensor(draw(st.lists(st.one_of(st.sampled_from(temp_values), st.floats(0.05, 4.0)),
                                                 min_size=batch, max_size=batch)), dtype=torch.float32).reshape(-1)
    top_k = None
    if draw(st.booleans()):
        extremes = [2**31 - 1, -(2**31)] + ([INT64_MAX, INT64_MIN] if mode == "wide_ints" else [])
        ks = draw(st.lists(st.one_of(st.integers(-1, vocab + 2), st.sampled_from(extremes)),
                           min_size=batch, max_size=batch))
        top_k = ints(ks, int_dtype(draw, *ks))
    top_p = None
    if draw(st.booleans()):
        p_values = [0.0, 1.0, 1.5, -0.5] + ([math.nan, math.inf, -math.inf, 1e-40] if nf else [])
        top_p = torch.tensor(draw(st.lists(st.one_of(st.floats(0.0, 1.0), st.sampled_from(p_values)),
                                           min_size=batch, max_size=batch)), dtype=torch.float32).reshape(-1)
    return temperature, top_k, top_p


@st.composite
def verify_block_cases(draw, mode):
    batch = draw(st.integers(0, 4))
    vocab = draw(st.integers(1, 40))
    n = draw(st.lists(st.integers(0, 4), min_size=batch, max_size=batch))
    num = sum(n)
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    nf = mode == "nonfinite"
    scale = draw(st.sampled_from([1.0, 10.0]))
    target, layout = draw(arranged(draw(floats((num + batch, vocab), dtype, nf, scale=scale))))
    tokens = draw(st.lists(st.integers(-1, vocab - 1), min_size=num, max_size=num))
    cu = [0]
    for k in n:
        cu.append(cu[-1] + k)
    max_num_draft = max(n, default=0) + draw(st.integers(0, 2))
    q_kind = draw(st.sampled_from(["point", "logits", "probs"]))
    draft_logits = draft_probs = None
    if q_kind == "logits":
        draft_logits = draw(floats((num, vocab), dtype, nf, scale=scale))
    elif q_kind == "probs":
        probs = torch.softmax(draw(floats((num, vocab), torch.float32, False, scale=scale)), -1)
        if nf and num:
            probs = draw(floats((num, vocab), torch.float32, True, scale=0.0)) + probs  # specials on valid rows
        draft_probs = probs.to(dtype)
    if mode == "invalid":
        what = draw(st.sampled_from(["token_high", "token_low", "cu_first", "cu_last", "cu_decreasing",
                                     "max_num_draft", "rows"]))
        if what == "token_high" and num:
            tokens[draw(st.integers(0, num - 1))] = vocab + draw(st.sampled_from([0, 1, 2**31 - 1 - vocab]))
        elif what == "token_low" and num:
            tokens[draw(st.integers(0, num - 1))] = draw(st.sampled_from([-2, -(2**31)]))
        elif what == "cu_first":
            cu[0] = 1
        elif what == "cu_last":
            cu[-1] += 1
        elif what == "cu_decreasing" and batch >= 2:
            cu[1] = cu[2] + 1
        elif what == "max_num_draft" and max(n, default=0) > 0:
            max_num_draft = max(n) - 1
        elif what == "rows":
            target = torch.zeros(num + batch + 1, vocab, dtype=dtype)
    draft_tokens = ints(tokens, int_dtype(draw, *tokens))
    cu_t = ints(cu, int_dtype(draw))
    temperature, top_k, top_p = _sampling(draw, batch, vocab, mode)
    seed = _seeds(draw, batch, mode)
    offset = _offsets(draw, batch, mode, room=max_num_draft + 1)
    ordered = (target, draft_tokens, cu_t, draft_logits, draft_probs, temperature, top_k, top_p, seed, offset,
               max_num_draft)
    return _plain_case(ordered, _describe(target_logits=target, layout=layout, draft_tokens=draft_tokens,
                                          cu_num_draft=cu_t, draft_logits=draft_logits, draft_probs=draft_probs,
                                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                          offset=offset, max_num_draft=max_num_draft),
                       triton=dtype != torch.bfloat16)


@st.composite
def verify_tree_cases(draw, mode):
    """Random ragged trees (each node's parent a local index before it, or -1 for the root)."""
    batch = draw(st.integers(0, 3))
    vocab = draw(st.integers(1, 30))
    n = draw(st.lists(st.integers(0, 5), min_size=batch, max_size=batch))
    num = sum(n)
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    nf = mode == "nonfinite"
    target, layout = draw(arranged(draw(floats((num + batch, vocab), dtype, nf, scale=10.0))))
    tokens = draw(st.lists(st.integers(-1, vocab - 1), min_size=num, max_size=num))
    parents, depth = [], 0
    for k in n:
        local = []
        for i in range(k):
            local.append(draw(st.integers(-1, i - 1)))
        depths = []
        for i, par in enumerate(local):
            depths.append(1 if par < 0 else depths[par] + 1)
        depth = max([depth] + depths)
        parents += local
    cu = [0]
    for k in n:
        cu.append(cu[-1] + k)
    max_depth = depth + draw(st.integers(0, 1))
    q_kind = draw(st.sampled_from(["point", "logits", "probs"]))
    draft_logits = draft_probs = None
    if q_kind == "logits":
        draft_logits = draw(floats((num, vocab), dtype, nf, scale=10.0))
    elif q_kind == "probs":
        draft_probs = torch.softmax(draw(floats((num, vocab), torch.float32, False, scale=10.0)), -1).to(dtype)
    if mode == "invalid":
        what = draw(st.sampled_from(["parent_ahead", "parent_low", "token_high", "max_depth"]))
        if what == "parent_ahead" and num:
            parents[draw(st.integers(0, num - 1))] = draw(st.sampled_from([5, 2**31 - 1]))
        elif what == "parent_low" and num:
            parents[draw(st.integers(0, num - 1))] = -2
        elif what == "token_high" and num:
            tokens[draw(st.integers(0, num - 1))] = vocab
        elif what == "max_depth" and depth > 0:
            max_depth = depth - 1
    ordered = (target, ints(tokens, int_dtype(draw, *tokens)), ints(parents, int_dtype(draw, *parents)),
               ints(cu, int_dtype(draw)), draft_logits, draft_probs, *_sampling(draw, batch, vocab, mode),
               _seeds(draw, batch, mode), _offsets(draw, batch, mode, room=max_depth + 1), max_depth)
    return _plain_case(ordered, _describe(target_logits=target, layout=layout, parents=ordered[2],
                                          draft_tokens=ordered[1], cu_num_draft=ordered[3], max_depth=max_depth),
                       triton=True)


@st.composite
def draft_sample_block_cases(draw, mode):
    batch = draw(st.integers(0, 4))
    gamma = draw(st.integers(0, 4))
    vocab = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    nf = mode == "nonfinite"
    scale = draw(st.sampled_from([1.0, 10.0]))
    base, layout = draw(arranged(draw(floats((batch, gamma, vocab), dtype, nf, scale=scale))))
    anchors = draw(st.lists(st.integers(0, vocab - 1), min_size=batch, max_size=batch))
    w1 = w2 = None
    if draw(st.booleans()):
        rank = draw(st.integers(1, 4))
        w1 = draw(floats((vocab, rank), dtype, nf, grid=True, scale=0.5))
        w2 = draw(floats((rank, vocab), dtype, nf, grid=True, scale=0.5))
    if mode == "invalid":
        what = draw(st.sampled_from(["anchor", "w1_shape", "w2_dtype", "one_weight"]))
        if what == "anchor" and batch:
            anchors[draw(st.integers(0, batch - 1))] = draw(st.sampled_from([vocab, -1, 2**31 - 1]))
            if w1 is None:
                w1, w2 = torch.zeros(vocab, 1, dtype=dtype), torch.zeros(1, vocab, dtype=dtype)
        elif what == "w1_shape" and w1 is not None:
            w1 = torch.zeros(vocab + 1, w1.shape[1], dtype=dtype)
        elif what == "w2_dtype" and w1 is not None:
            w2 = w2.double()
        elif what == "one_weight":
            w1, w2 = torch.zeros(vocab, 1, dtype=dtype), None
    anchor = ints(anchors, int_dtype(draw, *anchors))
    temperature, top_k, top_p = _sampling(draw, batch, vocab, mode)
    seed = _seeds(draw, batch, mode)
    offset = _offsets(draw, batch, mode, room=gamma)
    return_logits = draw(st.booleans())
    ordered = (base, anchor, w1, w2, temperature, top_k, top_p, seed, offset, return_logits)
    return _plain_case(ordered, _describe(base_logits=base, layout=layout, anchor=anchor, markov_w1=w1, markov_w2=w2,
                                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                          offset=offset, return_logits=return_logits),
                       triton=dtype != torch.bfloat16)


@st.composite
def random_words_cases(draw, mode):
    shape = draw(st.sampled_from([(0,), (1,), (5,), (2, 3), (3, 0)]))
    n = math.prod(shape)

    def values(lo, hi, extremes):
        return draw(st.lists(st.one_of(st.integers(lo, hi), st.sampled_from(extremes)), min_size=n, max_size=n))

    wide = mode == "wide_ints"
    seeds = values(INT64_MIN, INT64_MAX, [INT64_MIN, INT64_MAX, -1, 2**32]) if wide else values(0, 2**31 - 1, [0])
    pos = values(0, INT64_MAX, [2**32 - 1, 2**32, 2**62, INT64_MAX]) if wide else values(0, 2**20, [0])
    if mode == "wide_index":
        idx = values(INT64_MIN, INT64_MAX, [2**31, 2**32, 2**34 - 1, 2**34, INT64_MAX, -1, INT64_MIN])
    else:
        idx = values(0, 2**16, [0, 3, 4, 2**31 - 1])
    salt = draw(st.one_of(st.sampled_from([0, 1, 0xFFFFFFFF, 0x41434350]), st.integers(0, 0xFFFFFFFF)))
    seed_t, pos_t, idx_t = (ints(v, int_dtype(draw, *v)).reshape(shape) for v in (seeds, pos, idx))
    if mode == "invalid":
        what = draw(st.sampled_from(["salt_high", "salt_low", "shape"]))
        if what == "salt_high":
            salt = 2**32
        elif what == "salt_low":
            salt = -1
        else:
            idx_t = torch.zeros(n + 1, dtype=I64)
    ordered = (seed_t, pos_t, idx_t, salt)
    return _plain_case(ordered, _describe(seed=seed_t, position=pos_t, index=idx_t, salt=salt))


@st.composite
def schedule_verify_lens_cases(draw, mode):
    num_req = draw(st.integers(0, 4))
    gamma = draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(FLOAT_DTYPES + [torch.float64]))
    nf = mode == "nonfinite"
    grid = [0.0, 0.25, 0.5, 0.75, 1.0, 0.9, -0.5, 1.5] + ([math.nan, math.inf, -math.inf, 1e-40] if nf else [])
    conf = draw(st.lists(st.one_of(st.floats(0.0, 1.0, width=16), st.sampled_from(grid)),
                         min_size=num_req * gamma, max_size=num_req * gamma))
    conf = torch.tensor(conf, dtype=torch.float64).reshape(num_req, gamma).to(dtype)
    conf, layout = draw(arranged(conf))
    bmax = num_req + draw(st.integers(0, 12))
    sps_kind = draw(st.sampled_from(["falling", "random", "flat"]))
    if sps_kind == "falling":
        sps = 100.0 / (1 + draw(st.sampled_from([0.0, 0.05, 0.3, 2.0])) * torch.arange(bmax + 1.0))
    elif sps_kind == "flat":
        sps = torch.full((bmax + 1,), 50.0)
    else:
        sps = torch.tensor(draw(st.lists(st.floats(0.0, 200.0, width=16), min_size=bmax + 1, max_size=bmax + 1)))
    if nf:
        sps = sps.double()
        for i, v in draw(st.lists(st.tuples(st.integers(0, bmax), st.sampled_from([math.nan, math.inf, -1.0, 0.0,
                                                                                      1e-40, 3e38])), max_size=3)):
            sps[i] = v
    sps = sps.to(draw(st.sampled_from(FLOAT_DTYPES + [torch.float64])))
    if mode == "invalid":
        what = draw(st.sampled_from(["sps_short", "conf_int", "sps_2d"]))
        if what == "sps_short":
            sps = sps[:num_req]
        elif what == "conf_int":
            conf = torch.zeros(num_req, gamma, dtype=I32)
        else:
            sps = sps.reshape(1, -1)
    early_stop = draw(st.booleans())
    ordered = (conf, sps, early_stop)
    fp = (torch.float32, torch.float16)
    return _plain_case(ordered, _describe(confidence=conf, layout=layout, sps=sps, early_stop=early_stop),
                       triton=conf.dtype in fp and sps.dtype in fp)


CACHE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int32,
                torch.float8_e4m3fn]


def _random_bytes(draw, shape, dtype):
    """Random bit patterns (NaNs and infs included) for the byte-moving ops."""
    n = math.prod(shape) * dtype.itemsize
    seed = draw(st.integers(0, 2**16))
    raw = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


@st.composite
def kv_commit_cases(draw, mode):
    num_pages = draw(st.integers(1, 6))
    page_size = draw(st.integers(1, 4))
    wide = mode == "wide_ints"
    if wide:  # page sizes past 2^31: caches without bytes (no caches, or rows of 0 elements)
        page_size = draw(st.sampled_from([2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**61]))
    batch = draw(st.integers(0, 3))
    pages = draw(st.integers(1, 3))
    width = draw(st.integers(0, 4))
    shared = mode == "shared_pages"
    if shared:
        table = draw(st.lists(st.integers(0, num_pages - 1), min_size=batch * pages, max_size=batch * pages))
    else:
        # disjoint pages per request (as many requests as there are pages for)
        batch = min(batch, num_pages // pages)
        perm = draw(st.permutations(list(range(num_pages))))
        table = perm[:batch * pages]
    capacity = pages * page_size
    lens, num_acc, paths = [], [], []
    for _ in range(batch):
        length = draw(st.integers(0, max(capacity - width, 0)))
        if wide:
            length = max(0, min(capacity - width, draw(st.sampled_from([2**31 - 1, 2**31, 2**32, capacity])) -
                                draw(st.integers(0, 3))))
        w_fit = min(width, capacity - length)
        k = draw(st.integers(0, w_fit))
        path = draw(st.lists(st.integers(0, w_fit - 1), min_size=k, max_size=k)) if w_fit else []
        path = path + [-1] * (width - k)
        lens.append(length)
        num_acc.append(k)
        paths.append(path)
    if mode == "invalid" and batch:
        b = draw(st.integers(0, batch - 1))
        what = draw(st.sampled_from(["negative_path", "past_table", "bad_page", "num_accept", "negative_len"]))
        if what == "negative_path" and num_acc[b]:
            paths[b][0] = -2
        elif what == "past_table" and width:
            lens[b] = capacity
            num_acc[b] = max(num_acc[b], 1)
            paths[b][0] = 0
        elif what == "bad_page":
            table[b * pages] = draw(st.sampled_from([num_pages, -1, 2**31 - 1]))
            lens[b], num_acc[b] = 0, 1 if width else 0
            if width:
                paths[b][0] = 0
        elif what == "num_accept":
            num_acc[b] = width + 1
        elif what == "negative_len":
            lens[b] = -1
    bt = torch.tensor(table, dtype=int_dtype(draw, *table)).reshape(batch, pages)
    cl = ints(lens, int_dtype(draw, *lens))
    ap = torch.tensor(paths, dtype=int_dtype(draw)).reshape(batch, width)
    na = ints(num_acc, int_dtype(draw, *num_acc))
    # caches: a few rows / dtypes; K and V interleaved in one buffer or separate, padded pages
    num_caches = draw(st.integers(1, 3))
    specs = []
    for _ in range(num_caches):
        specs.append((draw(st.sampled_from(CACHE_DTYPES)), draw(st.sampled_from([(), (1,), (3,), (2, 2)]))))
    interleave = draw(st.booleans())
    if interleave:
        specs = [specs[0], specs[0]] + specs[1:]
    if wide:
        specs = draw(st.sampled_from([[], [(torch.float16, (0,))], [(torch.float32, (0,)), (torch.uint8, (0,))]]))
        interleave = False
    values = [_random_bytes(draw, (num_pages, page_size, *row), dt) if math.prod(row) or not wide else
              torch.empty((num_pages, page_size, *row), dtype=dt) for dt, row in specs]
    extra = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]

    def build():
        caches, guards = [], []
        start = 0
        if wide:  # no bytes to guard
            return ([v.clone() for v in values], bt.clone(), page_size, cl.clone(), ap.clone(), na.clone()), []
        if interleave:
            views, g = guarded(values[:2], 2, extra, interleave=True)
            caches += views
            guards.append(g)
            start = 2
        for v in values[start:]:
            views, g = guarded([v], 2, extra)
            caches += views
            guards.append(g)
        return (caches, bt.clone(), page_size, cl.clone(), ap.clone(), na.clone()), guards

    return Case(build, _describe(caches=[f"{dt}{list(v.shape)}" for v, (dt, _) in zip(values, specs)],
                                 interleave=interleave, extra=extra, block_table=bt, page_size=page_size,
                                 committed_len=cl, accept_path=ap, num_accept=na))


@st.composite
def kv_release_pages_cases(draw, mode):
    num_pages = draw(st.integers(0, 6))
    batch = draw(st.integers(0, 4))
    pages = draw(st.integers(0, 3))
    wide = mode == "wide_ints"
    page_size = draw(st.sampled_from([2**31 - 1, 2**31, 2**40, 2**61]) if wide else st.integers(1, 4))
    capacity = pages * page_size
    ids = list(range(-1, num_pages + 1)) + [2**31 - 1]
    table = draw(st.lists(st.sampled_from(ids), min_size=batch * pages, max_size=batch * pages))
    new, old = [], []
    for b in range(batch):
        o = draw(st.one_of(st.integers(0, capacity), st.sampled_from([0, capacity])))
        nl = draw(st.one_of(st.integers(0, capacity), st.sampled_from([0, o, max(o - 1, 0)])))
        new.append(nl)
        old.append(o)
    bt = torch.tensor(table, dtype=int_dtype(draw, *table)).reshape(batch, pages)
    # refcount: at least the releases of each page (shared pages included), plus a little
    start = torch.arange(pages) * page_size
    newt, oldt = torch.tensor(new, dtype=I64).reshape(-1), torch.tensor(old, dtype=I64).reshape(-1)
    released = (start[None, :] >= newt[:, None]) & (start[None, :] < oldt[:, None])
    rel_ids = bt.to(I64)[released]
    valid = bool(((rel_ids >= 0) & (rel_ids < num_pages)).all())
    if not valid:  # released ids outside [0, num_pages): make them valid, except in invalid mode
        if mode != "invalid":
            bt = bt.clamp(0, max(num_pages - 1, 0)) if num_pages else bt
            if not num_pages:
                newt = oldt.clone()
                new = old
            rel_ids = bt.to(I64)[(start[None, :] >= newt[:, None]) & (start[None, :] < oldt[:, None])]
    times = torch.bincount(rel_ids.clamp(0, max(num_pages - 1, 0)), minlength=num_pages)[:num_pages] \
        if rel_ids.numel() and num_pages else torch.zeros(num_pages, dtype=I64)
    extra = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=num_pages, max_size=num_pages)),
                         dtype=I64).reshape(-1)
    rc_dtype = draw(st.sampled_from([I32, I64]))
    refcount = times + extra
    if wide and num_pages:
        refcount[draw(st.integers(0, num_pages - 1))] = 2**31 - 1 if rc_dtype == I32 else INT64_MAX
    if mode == "invalid":
        what = draw(st.sampled_from(["double_free", "negative_len", "past_table", "page_size"]))
        if what == "double_free" and num_pages and int(times.max()) > 0:
            refcount[int(torch.argmax(times))] = int(times.max()) - 1
        elif what == "negative_len" and batch:
            new[0] = -1
        elif what == "past_table" and batch:
            old[0] = capacity + 1
        elif what == "page_size":
            page_size = 0
    nl_t, ol_t = ints(new, int_dtype(draw, *new)), ints(old, int_dtype(draw, *old))
    rc = refcount.to(rc_dtype)

    def build():
        (view,), g = guarded([rc], 0)
        return (bt.clone(), nl_t.clone(), ol_t.clone(), page_size, view), [g]

    return Case(build, _describe(block_table=bt, new_len=nl_t, old_len=ol_t, page_size=page_size, refcount=rc))


WINDOW_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.uint8, torch.int64, torch.bool]


@st.composite
def window_commit_cases(draw, mode):
    batch = draw(st.integers(0, 4))
    width = draw(st.integers(1, 4))
    row = draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
    dtype = draw(st.sampled_from(WINDOW_DTYPES))
    n = draw(st.lists(st.integers(0, 5), min_size=batch, max_size=batch))
    num = sum(n)
    cu = [0]
    for k in n:
        cu.append(cu[-1] + k)
    keep_dtype = draw(st.sampled_from([torch.bool, torch.uint8, torch.int8, I32, I64]))
    keep = draw(st.lists(st.sampled_from([0, 1, 2, -1] if keep_dtype not in (torch.bool, torch.uint8) else [0, 1]),
                         min_size=num, max_size=num))
    if mode == "wide_ints":
        pos = draw(st.lists(st.one_of(st.integers(0, INT64_MAX), st.sampled_from([2**31 - 1, 2**32, 2**62,
                                                                                   INT64_MAX])),
                            min_size=num, max_size=num))
    else:
        pos = draw(st.lists(st.integers(0, 20), min_size=num, max_size=num))
    pos = [p if k else draw(st.sampled_from([p, -1, INT64_MIN])) for p, k in zip(pos, keep)]  # rejected rows: any
    if mode == "invalid":
        what = draw(st.sampled_from(["negative_kept", "cu_first", "cu_last", "cu_decreasing", "row_shape"]))
        if what == "negative_kept" and num:
            t = draw(st.integers(0, num - 1))
            keep[t], pos[t] = 1, -1
        elif what == "cu_first":
            cu[0] = 1
        elif what == "cu_last":
            cu[-1] += 1
        elif what == "cu_decreasing" and batch >= 2:
            cu[1] = cu[2] + 1
        elif what == "row_shape":
            row_rows = (num, 5)
    window0 = _random_bytes(draw, (batch, width, *row), dtype)
    rows = _random_bytes(draw, (num, *row), dtype)
    if dtype == torch.bool:
        window0, rows = window0.view(torch.uint8) % 2 == 1, rows.view(torch.uint8) % 2 == 1
    if mode == "invalid" and what == "row_shape":
        rows = torch.zeros(row_rows, dtype=dtype)
    rows_view, rows_layout = rows, "contiguous"
    if draw(st.booleans()) and num:
        buf = torch.zeros((num, 2, *rows.shape[1:]), dtype=dtype)
        buf[:, 0] = rows
        rows_view, rows_layout = buf[:, 0], "padded rows"
    cu_t = ints(cu, int_dtype(draw, *cu))
    pos_t = ints(pos, int_dtype(draw, *pos))
    keep_t = torch.tensor(keep, dtype=keep_dtype).reshape(-1) if keep_dtype != torch.bool else \
        torch.tensor([bool(k) for k in keep], dtype=torch.bool).reshape(-1)
    extra = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]

    def build():
        (view,), g = guarded([window0], 2, extra)
        return (view, _clone(rows_view), cu_t.clone(), pos_t.clone(), keep_t.clone()), [g]

    return Case(build, _describe(window=window0, extra=extra, rows=rows_view, rows_layout=rows_layout, cu=cu_t,
                                 positions=pos_t, keep=keep_t))


@st.composite
def state_select_cases(draw, mode):
    batch = draw(st.integers(0, 4))
    steps = draw(st.integers(0, 4))
    state = draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
    dtype = draw(st.sampled_from(WINDOW_DTYPES[:-1]))
    idx = draw(st.lists(st.integers(-1, steps - 1), min_size=batch, max_size=batch))
    if mode == "invalid" and batch:
        idx[draw(st.integers(0, batch - 1))] = draw(st.sampled_from([steps, -2, 2**31 - 1, INT64_MAX, INT64_MIN]))
    states0 = _random_bytes(draw, (batch, steps, *state), dtype)
    out0 = _random_bytes(draw, (batch, *state), dtype)
    index = ints(idx, int_dtype(draw, *idx))
    sextra = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]
    oextra = [draw(st.integers(0, 2))]
    (states_view,), _ = guarded([states0], 2, sextra)

    def build():
        (view,), g = guarded([out0], 1, oextra)
        return (_clone(states_view), index.clone(), view), [g]

    return Case(build, _describe(states=states0, states_extra=sextra, index=index, out=out0, out_extra=oextra))


@st.composite
def moe_align_cases(draw, mode):
    m = draw(st.integers(0, 6))
    k = draw(st.integers(1, 3))
    num_experts = draw(st.one_of(st.integers(1, 6), st.sampled_from([64])))
    block_m = draw(st.one_of(st.integers(1, 8), st.sampled_from([16, 64, 128])))
    ids = draw(st.lists(st.integers(-1, num_experts - 1), min_size=m * k, max_size=m * k))
    if mode == "invalid":
        what = draw(st.sampled_from(["id_high", "id_low", "num_experts", "block_m"]))
        if what == "id_high" and ids:
            ids[draw(st.integers(0, len(ids) - 1))] = draw(st.sampled_from([num_experts, 2**31 - 1]))
        elif what == "id_low" and ids:
            ids[draw(st.integers(0, len(ids) - 1))] = -2
        elif what == "num_experts":
            num_experts = 0
        else:
            block_m = 0
    topk = torch.tensor(ids, dtype=int_dtype(draw, *ids)).reshape(m, k)
    ordered = (topk, num_experts, block_m)
    return _plain_case(ordered, _describe(topk_ids=topk, num_experts=num_experts, block_m=block_m))


MOE_TOL = (1e-4, 1e-5)
GEMM_HUGE = 1e30


@st.composite
def _gemm_inputs(draw, mode, rows, k, n, experts, dtype):
    nf = mode == "nonfinite"
    a, a_layout = draw(arranged(draw(floats((rows, k), dtype, nf, huge=GEMM_HUGE))))
    w, w_layout = draw(arranged(draw(floats((experts, n, k), dtype, nf, huge=GEMM_HUGE))))
    return a, a_layout, w, w_layout


def _offsets_list(draw, experts, rows):
    cuts = sorted(draw(st.lists(st.integers(0, rows), min_size=experts, max_size=experts)))
    return [0] + cuts


@st.composite
def grouped_gemm_cases(draw, mode, with_out=False):
    rows, k, n, experts = (draw(st.integers(0, 8)), draw(st.integers(1, 8)), draw(st.integers(1, 8)),
                           draw(st.integers(1, 4)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    a, a_layout, w, w_layout = draw(_gemm_inputs(mode, rows, k, n, experts, dtype))
    offs = _offsets_list(draw, experts, rows)
    if mode == "invalid":
        what = draw(st.sampled_from(["first", "decreasing", "past", "k"]))
        if what == "first":
            offs[0] = 1
        elif what == "decreasing" and experts >= 2:
            offs[1] = offs[2] + 1
        elif what == "past":
            offs[-1] = rows + 1
        else:
            w = torch.zeros(experts, n, k + 1, dtype=dtype)
    offs_t = ints(offs, int_dtype(draw, *offs))
    desc = _describe(a=a, a_layout=a_layout, w=w, w_layout=w_layout, expert_offsets=offs_t)
    if not with_out:
        return _plain_case((a, w, offs_t), desc, triton=dtype != torch.bfloat16, tol=MOE_TOL)
    transposed = draw(st.booleans())
    out0 = torch.full((rows, n), math.nan, dtype=dtype)
    extra = [draw(st.integers(0, 2))]

    def build():
        if transposed:  # out as a transposed view [T, N] of [N, T] storage, inside guards
            (view,), g = guarded([out0.t().contiguous()], 1, extra)
            view = view.t()
        else:
            (view,), g = guarded([out0], 1, extra)
        return (_clone(a), _clone(w), offs_t.clone(), view), [g]

    desc.update(out_transposed=transposed, out_extra=extra)
    return Case(build, desc, triton=dtype != torch.bfloat16, tol=MOE_TOL)


@st.composite
def grouped_gemm_masked_cases(draw, mode):
    experts, max_m, k, n = (draw(st.integers(1, 4)), draw(st.integers(0, 6)), draw(st.integers(1, 8)),
                            draw(st.integers(1, 8)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    counts = draw(st.lists(st.integers(0, max_m), min_size=experts, max_size=experts))
    nf = mode == "nonfinite"
    a = draw(floats((experts, max_m, k), dtype, nf, huge=GEMM_HUGE))
    for e, c in enumerate(counts):
        a[e, c:] = math.nan   # never read (documented)
    a, a_layout = draw(arranged(a, ("contiguous", "padded", "transposed", "step")))
    w, w_layout = draw(arranged(draw(floats((experts, n, k), dtype, nf, huge=GEMM_HUGE))))
    if mode == "invalid":
        what = draw(st.sampled_from(["high", "low", "k"]))
        if what == "high":
            counts[0] = max_m + 1
        elif what == "low":
            counts[0] = -1
        else:
            w = torch.zeros(experts, n, k + 1, dtype=dtype)
    masked = ints(counts, int_dtype(draw, *counts))
    return _plain_case((a, w, masked), _describe(a=a, a_layout=a_layout, w=w, w_layout=w_layout, masked_m=masked),
                       triton=dtype != torch.bfloat16, tol=MOE_TOL)


def _quantize_fp8(w: torch.Tensor, bn: int, bk: int):
    """fp8 e4m3 weights and float32 block scales for [E, N, K] weights."""
    e, n, k = w.shape
    rows, cols = -(-n // bn), -(-k // bk)
    scale = torch.rand(e, rows, cols, generator=torch.Generator().manual_seed(n * 31 + k)) + 0.5
    full = scale.repeat_interleave(bn, 1)[:, :n].repeat_interleave(bk, 2)[:, :, :k]
    return (w.float() / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale.float()


def _has_fp8_nan(*ws) -> bool:
    return any(w is not None and w.dtype == torch.float8_e4m3fn and bool(w.float().isnan().any()) for w in ws)


@st.composite
def fused_moe_cases(draw, mode):
    m, hidden, inter = draw(st.integers(0, 6)), draw(st.integers(1, 8)), draw(st.integers(1, 6))
    experts, k = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    fp8 = mode == "fp8_nonfinite" or (mode in ("plain", "invalid") and draw(st.integers(0, 4)) == 0)
    nf = mode in ("nonfinite", "fp8_nonfinite")
    ids = draw(st.lists(st.integers(-1, experts - 1), min_size=m * k, max_size=m * k))
    ids_t = torch.tensor(ids, dtype=int_dtype(draw, *ids)).reshape(m, k)
    routed = ids_t >= 0
    used = torch.zeros(experts, dtype=torch.bool)
    used[ids_t[routed].long()] = True
    x, x_layout = draw(arranged(draw(floats((m, hidden), dtype, nf, huge=GEMM_HUGE))))
    if mode == "padding_nonfinite":
        # NaN / inf only where nobody looks: weights of -1 slots, experts nobody routes to
        wdtype = draw(st.sampled_from(FLOAT_DTYPES + [torch.float64]))
        weights = draw(floats((m, k), wdtype, True, where=~routed))
        w13 = draw(floats((experts, 2 * inter, hidden), dtype, True, huge=GEMM_HUGE,
                          where=(~used)[:, None, None].expand(experts, 2 * inter, hidden)))
        w2 = draw(floats((experts, hidden, inter), dtype, True, huge=GEMM_HUGE,
                         where=(~used)[:, None, None].expand(experts, hidden, inter)))
    else:
        wdtype = draw(st.sampled_from(FLOAT_DTYPES + [torch.float64]))
        weights = draw(floats((m, k), wdtype, nf, where=routed))
        w13 = draw(floats((experts, 2 * inter, hidden), dtype, nf, huge=GEMM_HUGE))
        w2 = draw(floats((experts, hidden, inter), dtype, nf, huge=GEMM_HUGE))
    w13, w13_layout = draw(arranged(w13, ("contiguous", "transposed", "step")))
    w2, w2_layout = draw(arranged(w2, ("contiguous", "transposed", "step")))
    w13_scale = w2_scale = None
    block_shape = [128, 128]
    may_refuse = {}
    if fp8 and mode != "padding_nonfinite":
        bn, bk = draw(st.sampled_from([1, 2, 4, 128])), draw(st.sampled_from([1, 2, 32, 128]))
        block_shape = [bn, bk]
        w13, w13_scale = _quantize_fp8(w13, bn, bk)
        w2, w2_scale = _quantize_fp8(w2, bn, bk)
        if bk % 32:
            may_refuse["triton"] = "block_shape"   # documented: the Triton kernel needs block_k % 32 == 0
    if mode == "invalid":
        what = draw(st.sampled_from(["id_high", "id_low", "w2_shape", "odd_w13", "activation", "scale_missing"]))
        if what == "id_high" and ids:
            ids_t.view(-1)[draw(st.integers(0, len(ids) - 1))] = experts
        elif what == "id_low" and ids:
            ids_t.view(-1)[draw(st.integers(0, len(ids) - 1))] = -2
        elif what == "w2_shape":
            w2 = torch.zeros(experts, hidden + 1, inter, dtype=w2.dtype)
        elif what == "odd_w13" and w13_scale is None:
            w13 = torch.zeros(experts, 2 * inter + 1, hidden, dtype=dtype)
        elif what == "scale_missing" and w13_scale is not None:
            w13_scale = None
    activation = "gelu" if mode == "invalid" and what == "activation" else "silu"  # noqa: F821
    ordered = (x, w13, w2, weights, ids_t, w13_scale, w2_scale, block_shape, activation)
    tol = MOE_TOL if not fp8 else (1e-3, 1e-4)
    return _plain_case(ordered, _describe(x=x, x_layout=x_layout, w13=w13, w13_layout=w13_layout, w2=w2,
                                          w2_layout=w2_layout, topk_weights=weights, topk_ids=ids_t,
                                          w13_scale=w13_scale, w2_scale=w2_scale, block_shape=block_shape,
                                          activation=activation),
                       triton=dtype != torch.bfloat16 and (not _has_fp8_nan(w13, w2) or interpreter_reads_fp8_nan()),
                       tol=tol, may_refuse=may_refuse)


ATTN_HUGE = 1e18


@st.composite
def draft_block_attention_cases(draw, mode):
    batch = draw(st.integers(0, 3))
    n = draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch))
    num = sum(n)
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    dim = draw(st.integers(1, 8))
    width = draw(st.integers(0, 5))
    lens = draw(st.lists(st.integers(0, 12), min_size=batch, max_size=batch))
    window = draw(st.one_of(st.none(), st.integers(0, 6)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    nf = mode == "nonfinite"
    # the visible context slots (positions L - n_vis .. L - 1, slot t % W)
    visible = torch.zeros(batch, width, dtype=torch.bool)
    for b, length in enumerate(lens):
        n_vis = min(length, width, width if window is None else window)
        for t in range(length - n_vis, length):
            visible[b, t % width] = True
    ctx_where = visible[:, :, None, None].expand(batch, width, kv_heads, dim)
    nv = mode == "nonfinite_values"   # specials in the values only (q, keys, sinks: "nonfinite")
    q, q_layout = draw(arranged(draw(floats((num, heads, dim), dtype, nf, huge=ATTN_HUGE))))
    kb = draw(floats((num, kv_heads, dim), dtype, nf, huge=ATTN_HUGE))
    vb = draw(floats((num, kv_heads, dim), dtype, nv, huge=ATTN_HUGE))
    if mode == "invisible_nonfinite":
        kc = draw(floats((batch, width, kv_heads, dim), dtype, True, huge=ATTN_HUGE, where=~ctx_where))
        vc = draw(floats((batch, width, kv_heads, dim), dtype, True, huge=ATTN_HUGE, where=~ctx_where))
    else:
        kc = draw(floats((batch, width, kv_heads, dim), dtype, nf, huge=ATTN_HUGE, where=ctx_where))
        vc = draw(floats((batch, width, kv_heads, dim), dtype, nv, huge=ATTN_HUGE, where=ctx_where))
    kc, kc_layout = draw(arranged(kc, ("contiguous", "padded", "transposed")))
    vc, vc_layout = draw(arranged(vc, ("contiguous", "padded", "step")))
    kb, kb_layout = draw(arranged(kb, ("contiguous", "padded", "transposed")))
    sinks = None
    if draw(st.booleans()):
        sinks = draw(floats((heads,), draw(st.sampled_from(FLOAT_DTYPES)), nf))
    scale = draw(st.one_of(st.none(), st.sampled_from([0.0, -0.5, 0.125, 1.0, 2.0])))
    cu = [0]
    for k in n:
        cu.append(cu[-1] + k)
    max_block_len = max(n, default=0) + draw(st.sampled_from([0, 0, 1, -1]))
    max_block_len = max(max_block_len, 0)   # a smaller value is still correct (documented)
    if mode == "invalid":
        what = draw(st.sampled_from(["cu_first", "cu_last", "cu_decreasing", "negative_len", "heads", "scale"]))
        if what == "cu_first":
            cu[0] = 1
        elif what == "cu_last":
            cu[-1] += 1
        elif what == "cu_decreasing" and batch >= 2:
            cu[1] = cu[2] + 1
        elif what == "negative_len" and batch:
            lens[0] = -1
        elif what == "heads" and heads > 1 and kv_heads == 1:
            kb = torch.zeros(num, 3, dim, dtype=dtype)
        elif what == "scale":
            scale = math.inf
    cu_t = ints(cu, int_dtype(draw, *cu))
    lens_t = ints(lens, int_dtype(draw, *lens))
    ordered = (q, kb, vb, kc, vc, cu_t, lens_t, sinks, scale, window, max_block_len)
    return _plain_case(ordered, _describe(q=q, q_layout=q_layout, k_block=kb, k_block_layout=kb_layout, v_block=vb,
                                          k_ctx=kc, k_ctx_layout=kc_layout, v_ctx=vc, v_ctx_layout=vc_layout,
                                          cu_block=cu_t, ctx_lens=lens_t, sinks=sinks, softmax_scale=scale,
                                          window=window, max_block_len=max_block_len),
                       triton=dtype != torch.bfloat16 and (sinks is None or sinks.dtype != torch.bfloat16),
                       tol=MOE_TOL)


@st.composite
def token_logprobs_cases(draw, mode):
    """Rows of moderate logits (log-probs are differences of numbers of the logits' size:
    compared with a tolerance), padding rows / ids, every filter, min-p included."""
    batch = draw(st.integers(0, 3))
    width = draw(st.integers(0, 4))
    rows_t = draw(st.integers(1, 6))
    vocab = draw(st.integers(1, 30))
    nf = mode == "nonfinite"
    logits, layout = draw(arranged(draw(floats((rows_t, vocab), torch.float32, nf, huge=50.0, scale=3.0))))
    toks = draw(st.lists(st.integers(-2, vocab + 1), min_size=batch * width, max_size=batch * width))
    rows = draw(st.lists(st.integers(-1, rows_t - 1), min_size=batch * width, max_size=batch * width))
    if mode == "invalid" and rows:
        rows[draw(st.integers(0, len(rows) - 1))] = rows_t + draw(st.sampled_from([0, 5]))
    tokens = ints(toks, int_dtype(draw, *toks)).reshape(batch, width)
    rows_x = ints(rows, int_dtype(draw, *rows)).reshape(batch, width)
    temperature = None
    if draw(st.booleans()):
        t_values = [0.0, 0.5, 1.0, 2.0] + ([math.nan, math.inf, -1.0] if nf else [])
        temperature = torch.tensor(draw(st.lists(st.sampled_from(t_values), min_size=batch, max_size=batch)),
                                   dtype=torch.float32).reshape(-1)
    _, top_k, top_p = _sampling(draw, batch, vocab, "plain")
    min_p = None
    if draw(st.booleans()):
        mp_values = [0.0, 1.0, 0.05, 0.5, -1.0, 2.0, 1e-30] + ([math.nan, math.inf] if nf else [])
        min_p = torch.tensor(draw(st.lists(st.sampled_from(mp_values), min_size=batch, max_size=batch)),
                             dtype=torch.float32).reshape(-1)
    ordered = (logits, tokens, rows_x, temperature, top_k, top_p, min_p)
    return _plain_case(ordered, _describe(target_logits=logits, layout=layout, tokens=tokens, rows=rows_x,
                                          temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p),
                       tol=(1e-5, 1e-4))


STRATEGIES: dict[str, Callable] = {
    "verify_block": verify_block_cases,
    "verify_tree": verify_tree_cases,
    "draft_sample_block": draft_sample_block_cases,
    "random_words": random_words_cases,
    "schedule_verify_lens": schedule_verify_lens_cases,
    "kv_commit": kv_commit_cases,
    "kv_release_pages": kv_release_pages_cases,
    "window_commit": window_commit_cases,
    "state_select": state_select_cases,
    "moe_align": moe_align_cases,
    "grouped_gemm": grouped_gemm_cases,
    "grouped_gemm_out": lambda mode: grouped_gemm_cases(mode, with_out=True),
    "grouped_gemm_masked": grouped_gemm_masked_cases,
    "fused_moe": fused_moe_cases,
    "draft_block_attention": draft_block_attention_cases,
    "token_logprobs": token_logprobs_cases,
}

MODES: dict[str, list[str]] = {
    "verify_block": ["plain", "nonfinite", "wide_ints", "offset_overflow", "invalid"],
    "verify_tree": ["plain", "nonfinite", "wide_ints", "invalid"],
    "draft_sample_block": ["plain", "nonfinite", "wide_ints", "offset_overflow", "invalid"],
    "random_words": ["plain", "wide_ints", "wide_index", "invalid"],
    "schedule_verify_lens": ["plain", "nonfinite", "invalid"],
    "kv_commit": ["plain", "wide_ints", "shared_pages", "invalid"],
    "kv_release_pages": ["plain", "wide_ints", "invalid"],
    "window_commit": ["plain", "wide_ints", "invalid"],
    "state_select": ["plain", "invalid"],
    "moe_align": ["plain", "invalid"],
    "grouped_gemm": ["plain", "nonfinite", "invalid"],
    "grouped_gemm_out": ["plain", "nonfinite", "invalid"],
    "grouped_gemm_masked": ["plain", "nonfinite", "invalid"],
    "fused_moe": ["plain", "nonfinite", "fp8_nonfinite", "padding_nonfinite", "invalid"],
    "draft_block_attention": ["plain", "nonfinite", "nonfinite_values", "invisible_nonfinite", "invalid"],
    "token_logprobs": ["plain", "nonfinite", "invalid"],
}


def test_every_op_is_fuzzed():
    assert set(STRATEGIES) == set(REGISTRY) == set(MODES)
    assert set(KNOWN_FAILURES) <= {(op, mode) for op, modes in MODES.items() for mode in modes}


def _params():
    for op in sorted(MODES):
        for mode in MODES[op]:
            reason = KNOWN_FAILURES.get((op, mode))
            marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
            yield pytest.param(op, mode, marks=marks, id=f"{op}-{mode}")


@pytest.mark.parametrize("op,mode", list(_params()))
def test_fuzz(op, mode):
    phases = [Phase.explicit, Phase.generate]
    if (op, mode) not in KNOWN_FAILURES:
        phases.append(Phase.shrink)   # a known failure need not be minimised on every run

    count = EXAMPLES[op, mode] if (op, mode) in EXAMPLES else EXAMPLES[op]
    examples = max(1, round(count * float(os.environ.get("DSPARK_FUZZ_SCALE", "1"))))

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, phases=phases,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=STRATEGIES[op](mode))
    def run(case):
        check(op, mode, case)

    run()


def test_zz_example_counts(capsys):
    """How many examples each (op, mode) tried, and how many the reference refused."""
    lines = [f"{op:24s} {mode:20s} {COUNTS[op, mode]:4d} examples ({RAISED[op, mode]} refused by the reference)"
             for op in sorted(MODES) for mode in MODES[op]]
    with capsys.disabled():
        print("\nfuzz examples per (op, mode):\n" + "\n".join(lines))
        print(f"total: {sum(COUNTS.values())} examples")
