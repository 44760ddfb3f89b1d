"""Fuzz the C++ CPU kernels with extreme integers (hypothesis).

Every size / length / offset / index / count argument of kv_commit, kv_release_pages,
window_commit, state_select, verify_block (cu_num_draft, max_num_draft, offset,
seed), schedule_verify_lens and random_words is drawn from the integer limits (0, 1,
2^31 +- 1, 2^32, 2^62, 2^63 - 1, negatives) mixed with small in-range values. The
oracle for each call of ``torch.ops.dspark.<op>`` (the C++ kernel itself, no Python
wrapper in front):

* either it raises RuntimeError / ValueError whose message starts with the op's
  name and names one of its arguments, and nothing was written;
* or it returns what the PyTorch reference (dspark_kernels/reference) returns on
  the same input, byte for byte.

Outputs and caches live inside bigger buffers filled with a sentinel ("guard
regions"), checked untouched after every call. Example counts are printed per op
(run with -s to see them) and asserted to be non-trivial.

Runs under the sanitizers too (.ci/sanitizers.sh), where an out-of-bounds access or
a signed overflow aborts the run.
"""

from __future__ import annotations

import collections
import re

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.reference import kv as ref_kv
from dspark_kernels.reference import philox as ref_philox
from dspark_kernels.reference import schedule_verify_lens as ref_sched
from dspark_kernels.reference import verify_block as ref_verify

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HAS_CPU = dk.backends("kv_commit")["cpu"]
pytestmark = pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")

I64_MAX, I64_MIN = 2**63 - 1, -(2**63)
I32_MAX, I32_MIN = 2**31 - 1, -(2**31)
LIMITS = [0, 1, 2, 3, I32_MAX - 1, I32_MAX, I32_MAX + 1, 2**32 - 1, 2**32, 2**32 + 1, 2**62, I64_MAX - 1, I64_MAX,
          -1, -2, I32_MIN, I32_MIN - 1, -(2**32), -(2**62), I64_MIN]
MAX_EXAMPLES = 150
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
SENTINEL = 0x5A
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def ints(small_hi: int = 8):
    """An extreme integer or a small in-range one (so that some calls are valid)."""
    return st.one_of(st.sampled_from(LIMITS), st.integers(-1, small_hi))


def rare(draw, small, extremes=LIMITS, one_in=8):
    """Mostly a draw of `small`, one time in `one_in` an extreme value."""
    return draw(st.sampled_from(extremes)) if draw(st.integers(0, one_in - 1)) == 0 else draw(small)


def index_tensor(values, draw_int32: bool) -> torch.Tensor:
    """int64, or int32 when every value fits and the draw says so."""
    fits = all(I32_MIN <= v <= I32_MAX for v in values)
    return torch.tensor(values, dtype=torch.int32 if fits and draw_int32 else torch.int64)


def index_matrix(rows, cols, values, draw_int32: bool) -> torch.Tensor:
    t = index_tensor(values, draw_int32)
    return t.reshape(rows, cols)


def check_error(op: str, args: tuple[str, ...], err: Exception) -> None:
    msg = str(err)
    assert msg.startswith(f"{op}: ") or f"{op}: " in msg.splitlines()[0], msg
    assert re.search("|".join(re.escape(a) for a in args), msg), f"{op}: the message names no argument: {msg}"


def guarded(shape, dtype=torch.uint8, pad=1):
    """(buffer, view): a view of `shape` inside a buffer padded by `pad` on dims 0 and 1,
    every byte SENTINEL; the view's last dims stay dense."""
    shape = tuple(shape)
    big = (shape[0] + 2 * pad, shape[1] + 2 * pad, *shape[2:]) if len(shape) >= 2 else (shape[0] + 2 * pad,)
    buf = torch.full(big, SENTINEL, dtype=torch.uint8).view(dtype) if dtype != torch.uint8 else \
        torch.full(big, SENTINEL, dtype=torch.uint8)
    view = buf[pad:pad + shape[0], pad:pad + shape[1]] if len(shape) >= 2 else buf[pad:pad + shape[0]]
    return buf, view


def guard_mask(buf, view_slices):
    mask = torch.ones(buf.shape, dtype=torch.bool)
    mask[view_slices] = False
    return mask


# --------------------------------------------------------------------------- kv_commit


@st.composite
def commit_cases(draw):
    B = draw(st.integers(1, 3))
    P = draw(st.integers(1, 4))
    W = draw(st.integers(0, 4))
    page_size = rare(draw, st.sampled_from([1, 2, 3, 4]), [0, -1, I32_MAX, I32_MAX + 1, 2**62, I64_MAX, I64_MIN], 5)
    num_pages = 6
    bad_pages = [-1, num_pages, I32_MAX, 2**32, I64_MAX, I64_MIN]
    table = [rare(draw, st.integers(0, num_pages - 1), bad_pages, 12) for _ in range(B * P)]
    # distinct pages per row most of the time, so that some commits are valid
    if draw(st.booleans()) and B * P <= num_pages:
        table = draw(st.permutations(list(range(num_pages))))[:B * P]
    L = [rare(draw, st.integers(0, P * 4)) for _ in range(B)]
    n = [rare(draw, st.integers(0, W)) for _ in range(B)]
    path = [rare(draw, st.integers(-1, 2 * W), LIMITS, 12) for _ in range(B * W)]
    return dict(B=B, P=P, W=W, page_size=page_size, num_pages=num_pages, table=table, L=L, n=n, path=path,
                int32=draw(st.booleans()), with_cache=draw(st.integers(0, 5)) > 0)


def commit_input_valid(c, num_pages: int | None) -> bool:
    """The documented kv_commit contract, restated with Python ints (no overflow possible):
    what the CPU kernel must accept (and then equal the reference) and reject otherwise."""
    B, P, W, ps = c["B"], c["P"], c["W"], c["page_size"]
    if not 1 <= ps <= I32_MAX:
        return False
    table = [c["table"][b * P:(b + 1) * P] for b in range(B)]
    owned = []  # per request: {slot: "write" | "keep" | "read"}
    for b in range(B):
        L, n = c["L"][b], c["n"][b]
        if not 0 <= n <= W or L < 0 or L + n > I32_MAX:
            return False
        mine, writes = {}, []
        for j in range(n):
            s = c["path"][b * W + j]
            if s < 0:
                return False
            slots = []
            for pos in (L + s, L + j):
                if pos // ps >= P:
                    return False
                page = table[b][pos // ps]
                if num_pages is not None and not 0 <= page < num_pages:
                    return False
                slots.append((page, pos % ps))
            if s == j:
                mine.setdefault(slots[1], "keep")
            else:
                writes.append(slots[1])
                mine.setdefault(slots[0], "read")
        if num_pages is not None:
            if len(set(writes)) != len(writes):  # two destinations of one request on one slot
                return False
            for w in writes:
                mine[w] = "write"
        owned.append(mine)
    if num_pages is not None:  # no slot written by one request and written, read or kept by another
        for b in range(B):
            for slot, what in owned[b].items():
                if what == "write" and any(slot in owned[o] for o in range(B) if o != b):
                    return False
    return True


def run_commit_case(c):
    op = "kv_commit"
    B, P, W, ps = c["B"], c["P"], c["W"], c["page_size"]
    table = index_matrix(B, P, c["table"], c["int32"])
    L = index_tensor(c["L"], c["int32"])
    path = index_matrix(B, W, c["path"], c["int32"]) if W else torch.zeros(B, 0, dtype=torch.int64)
    n = index_tensor(c["n"], c["int32"])
    small = 1 <= ps <= 8
    if c["with_cache"] and small:
        buf, cache = guarded((c["num_pages"], ps, 3), torch.uint8)
        cache.copy_(torch.randint(0, 256, cache.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
        caches = [cache]
    elif c["with_cache"] and ps >= 1:  # a huge page size: an empty cache (no page id is valid)
        buf, caches = None, [torch.empty_strided((0, ps, 3), (3, 3, 1), dtype=torch.uint8)]
    else:
        buf, caches = None, []
    before = buf.clone() if buf is not None else None
    ref_caches = [x.clone() for x in caches]
    valid = commit_input_valid(c, caches[0].shape[0] if caches else None)
    try:
        new_len = torch.ops.dspark.kv_commit(caches, table, ps, L, path, n)
    except (RuntimeError, ValueError) as err:
        assert not valid, f"kv_commit rejected valid input: {err}"
        check_error(op, ("caches", "block_table", "page_size", "committed_len", "accept_path", "num_accept"), err)
        if buf is not None:
            assert torch.equal(buf, before), "kv_commit wrote before raising"
        COUNTS[op]["error"] += 1
        return
    if buf is not None:
        mask = guard_mask(buf, (slice(1, 1 + c["num_pages"]), slice(1, 1 + ps)))
        assert (buf[mask] == SENTINEL).all(), "kv_commit wrote outside the cache view"
    assert valid, "kv_commit accepted input outside its contract"
    expect = ref_kv.kv_commit(ref_caches, table, ps, L, path, n)  # a reference error here fails the test
    assert new_len.dtype == torch.int32 and new_len.tolist() == expect.tolist()
    for got, want in zip(caches, ref_caches):
        assert torch.equal(got, want)
    COUNTS[op]["matched reference"] += 1


@settings(SETTINGS, max_examples=2 * MAX_EXAMPLES)
@given(commit_cases())
# the issue tracker's cases: a write into a slot another request keeps; an int32 new_len that wrapped
@example(dict(B=2, P=3, W=2, page_size=4, num_pages=6, table=[0, 5, 1, 2, 5, 3], L=[4, 4], n=[2, 2],
              path=[0, 3, 0, 1], int32=False, with_cache=True))
@example(dict(B=1, P=1, W=0, page_size=4, num_pages=6, table=[0], L=[2**31], n=[0], path=[], int32=False,
              with_cache=True))
@example(dict(B=1, P=1, W=1, page_size=4, num_pages=6, table=[0], L=[I64_MAX], n=[1], path=[0], int32=False,
              with_cache=True))
def _fuzz_commit(c):
    COUNTS["kv_commit"]["tried"] += 1
    run_commit_case(c)


def test_fuzz_cpu_kv_commit():
    _fuzz_commit()
    report("kv_commit")


# --------------------------------------------------------------------------- kv_release_pages


@st.composite
def release_cases(draw):
    B = draw(st.integers(1, 3))
    P = draw(st.integers(0, 4))
    page_size = draw(st.one_of(st.sampled_from([1, 2, 4]), st.sampled_from(LIMITS)))
    num_pages = 5
    table = [draw(st.integers(0, num_pages - 1)) if draw(st.integers(0, 7)) else draw(st.sampled_from(LIMITS))
             for _ in range(B * P)]
    new = [draw(ints(P * 4)) for _ in range(B)]
    old = [draw(ints(P * 4)) for _ in range(B)]
    rc = [draw(st.integers(0, 3)) for _ in range(num_pages)]
    return dict(B=B, P=P, page_size=page_size, table=table, new=new, old=old, rc=rc, int32=draw(st.booleans()),
                rc64=draw(st.booleans()))


def release_input_valid(c) -> bool:
    """page_size >= 1, lengths in [0, P * page_size], released page ids in [0, num_pages), no double free."""
    B, P, ps = c["B"], c["P"], c["page_size"]
    if ps < 1:
        return False
    left = list(c["rc"])
    for b in range(B):
        if not (0 <= c["new"][b] <= P * ps and 0 <= c["old"][b] <= P * ps):
            return False
        for p in range(P):
            if c["new"][b] <= p * ps < c["old"][b]:
                page = c["table"][b * P + p]
                if not 0 <= page < len(left) or left[page] <= 0:
                    return False
                left[page] -= 1
    return True


@SETTINGS
@given(release_cases())
@example(dict(B=1, P=4, page_size=16, table=[0, 1, 2, 3], new=[2**63 - 15], old=[3], rc=[1] * 5, int32=False,
              rc64=False))  # was a segfault
@example(dict(B=1, P=4, page_size=2, table=[0, 1, 2, 3], new=[I64_MAX], old=[3], rc=[1] * 5, int32=False,
              rc64=False))  # was a bogus double free
@example(dict(B=1, P=4, page_size=2**62, table=[0, 1, 2, 3], new=[1], old=[I64_MAX], rc=[1] * 5, int32=False,
              rc64=False))  # valid, was rejected
def _fuzz_release(c):
    op = "kv_release_pages"
    COUNTS[op]["tried"] += 1
    B, P, ps = c["B"], c["P"], c["page_size"]
    table = index_matrix(B, P, c["table"], c["int32"]) if P else torch.zeros(B, 0, dtype=torch.int32)
    new, old = index_tensor(c["new"], c["int32"]), index_tensor(c["old"], c["int32"])
    rc_dtype = torch.int64 if c["rc64"] else torch.int32
    buf = torch.full((len(c["rc"]) + 2,), -77, dtype=rc_dtype)
    rc = buf[1:-1]
    rc.copy_(torch.tensor(c["rc"]))
    before = buf.clone()
    rc_ref = rc.clone()
    valid = release_input_valid(c)
    try:
        freed, num = torch.ops.dspark.kv_release_pages(table, new, old, ps, rc)
    except (RuntimeError, ValueError) as err:
        assert not valid, f"kv_release_pages rejected valid input: {err}"
        check_error(op, ("block_table", "new_len", "old_len", "page_size", "refcount"), err)
        assert torch.equal(buf, before), "kv_release_pages changed refcount before raising"
        COUNTS[op]["error"] += 1
        return
    assert buf[0] == -77 and buf[-1] == -77, "kv_release_pages wrote outside refcount"
    assert valid, "kv_release_pages accepted input outside its contract"
    freed_ref, num_ref = ref_kv.kv_release_pages(table, new, old, ps, rc_ref)
    assert freed.tolist() == freed_ref.tolist() and num.tolist() == num_ref.tolist()
    assert rc.tolist() == rc_ref.tolist()
    COUNTS[op]["matched reference"] += 1


def test_fuzz_cpu_kv_release_pages():
    _fuzz_release()
    report("kv_release_pages")


# --------------------------------------------------------------------------- window_commit


@st.composite
def window_cases(draw):
    B = draw(st.integers(1, 3))
    W = draw(st.integers(1, 4))
    counts = [draw(st.integers(0, 3)) for _ in range(B)]
    cu = [0]
    for k in counts:
        cu.append(cu[-1] + k)
    T = cu[-1]
    if draw(st.integers(0, 2)) == 0:  # break cu
        cu[draw(st.integers(0, B))] = draw(st.sampled_from(LIMITS))
    positions = [draw(ints(20)) for _ in range(T)]
    keep = [draw(st.booleans()) for _ in range(T)]
    return dict(B=B, W=W, T=T, cu=cu, positions=positions, keep=keep, int32=draw(st.booleans()))


@SETTINGS
@given(window_cases())
def _fuzz_window(c):
    op = "window_commit"
    COUNTS[op]["tried"] += 1
    B, W, T = c["B"], c["W"], c["T"]
    buf, window = guarded((B, W, 4), torch.uint8)
    window.copy_(torch.arange(B * W * 4, dtype=torch.uint8).reshape(B, W, 4))
    rows = torch.arange(100, 100 + T * 4, dtype=torch.uint8).reshape(T, 4)
    cu = index_tensor(c["cu"], c["int32"])
    positions = index_tensor(c["positions"], c["int32"]) if T else torch.zeros(0, dtype=torch.int64)
    keep = torch.tensor(c["keep"], dtype=torch.bool)
    before = buf.clone()
    ref_window = window.clone()
    try:
        torch.ops.dspark.window_commit(window, rows, cu, positions, keep)
    except (RuntimeError, ValueError) as err:
        check_error(op, ("window", "rows", "cu", "positions", "keep"), err)
        assert torch.equal(buf, before), "window_commit wrote before raising"
        COUNTS[op]["error"] += 1
        return
    mask = guard_mask(buf, (slice(1, 1 + B), slice(1, 1 + W)))
    assert (buf[mask] == SENTINEL).all(), "window_commit wrote outside the window view"
    ref_kv.window_commit(ref_window, rows, cu, positions, keep)
    assert torch.equal(window, ref_window)
    COUNTS[op]["matched reference"] += 1


def test_fuzz_cpu_window_commit():
    _fuzz_window()
    report("window_commit")


# --------------------------------------------------------------------------- state_select


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.data())
def _fuzz_state(B, S, data):
    op = "state_select"
    COUNTS[op]["tried"] += 1
    index = [data.draw(st.one_of(st.integers(-1, S), st.sampled_from(LIMITS))) for _ in range(B)]
    states = torch.arange(B * S * 5, dtype=torch.uint8).reshape(B, S, 5)
    buf = torch.full((B + 2, 5), SENTINEL, dtype=torch.uint8)
    out = buf[1:-1]
    before = buf.clone()
    idx = index_tensor(index, data.draw(st.booleans()))
    ref_out = out.clone()
    try:
        torch.ops.dspark.state_select(states, idx, out)
    except (RuntimeError, ValueError) as err:
        check_error(op, ("states", "index", "out"), err)
        assert torch.equal(buf, before), "state_select wrote before raising"
        COUNTS[op]["error"] += 1
        return
    assert (buf[0] == SENTINEL).all() and (buf[-1] == SENTINEL).all(), "state_select wrote outside out"
    ref_kv.state_select(states, idx, ref_out)
    assert torch.equal(out, ref_out)
    COUNTS[op]["matched reference"] += 1


def test_fuzz_cpu_state_select():
    _fuzz_state()
    report("state_select")


# --------------------------------------------------------------------------- verify_block


VERIFY_ARGS = ("target_logits", "draft_tokens", "cu_num_draft", "draft_logits", "draft_probs", "temperature",
               "top_k", "top_p", "seed", "offset", "max_num_draft")


@st.composite
def verify_cases(draw):
    B = draw(st.integers(0, 3))
    V = draw(st.integers(1, 6))
    counts = [draw(st.integers(0, 3)) for _ in range(B)]
    cu = [0]
    for k in counts:
        cu.append(cu[-1] + k)
    N = cu[-1]
    if draw(st.integers(0, 2)) == 0:  # break cu: an extreme entry
        cu[draw(st.integers(0, B))] = draw(st.sampled_from(LIMITS))
    if B == 0:  # the output is empty: any max_num_draft can be tried without allocating
        max_num_draft = draw(ints(4))
    else:  # an in-range value, or one the kernel must reject before allocating [B, max_num_draft + 1]
        max_num_draft = draw(st.one_of(st.integers(0, 4), st.sampled_from(
            [-1, -2, I32_MAX, I32_MAX + 1, 2**32, 2**62, I64_MAX, I64_MIN])))
    drafts = [draw(st.integers(0, V - 1)) if draw(st.integers(0, 5)) else draw(st.sampled_from([-1, -2, V, I32_MAX,
                                                                                                2**32]))
              for _ in range(N)]
    seed = [draw(st.sampled_from(LIMITS)) for _ in range(B)]
    offset = [draw(st.sampled_from(LIMITS)) for _ in range(B)]
    sampling = draw(st.booleans())
    top_k = [draw(st.sampled_from([0, 1, 2, V, V + 1, -1, I32_MAX, 2**32, I64_MAX, I64_MIN])) for _ in range(B)]
    return dict(B=B, V=V, N=N, cu=cu, max_num_draft=max_num_draft, drafts=drafts, seed=seed, offset=offset,
                sampling=sampling, top_k=top_k if sampling and draw(st.booleans()) else None,
                int32=draw(st.booleans()), logits_seed=draw(st.integers(0, 3)))


def verify_input_valid(c) -> bool:
    cu, B, N = c["cu"], c["B"], c["N"]
    if not 0 <= c["max_num_draft"] <= I32_MAX - 1 or cu[0] != 0 or cu[B] != N:
        return False
    if any(cu[b] > cu[b + 1] or cu[b + 1] - cu[b] > c["max_num_draft"] for b in range(B)):
        return False
    return all(-1 <= d < c["V"] for d in c["drafts"])


@SETTINGS
@given(verify_cases())
@example(dict(B=3, V=11, N=5, cu=[0, 2**32 + 2, 2**32 + 2, 5], max_num_draft=3, drafts=[1] * 5, seed=[0] * 3,
              offset=[0] * 3, sampling=False, top_k=None, int32=False, logits_seed=0))  # ran as [0, 2, 2, 5]
@example(dict(B=0, V=3, N=0, cu=[0], max_num_draft=I64_MAX, drafts=[], seed=[], offset=[], sampling=False,
              top_k=None, int32=False, logits_seed=0))  # max_num_draft + 1 overflowed
def _fuzz_verify(c):
    op = "verify_block"
    COUNTS[op]["tried"] += 1
    B, V, N = c["B"], c["V"], c["N"]
    gen = torch.Generator().manual_seed(c["logits_seed"])
    target = torch.randn(N + B, V, generator=gen)
    drafts = index_tensor(c["drafts"], c["int32"]) if N else torch.zeros(0, dtype=torch.int64)
    cu = index_tensor(c["cu"], c["int32"])
    seed, offset = torch.tensor(c["seed"], dtype=torch.int64), torch.tensor(c["offset"], dtype=torch.int64)
    temperature = torch.full((B,), 0.7) if c["sampling"] else None
    top_k = torch.tensor(c["top_k"], dtype=torch.int64) if c["top_k"] is not None else None
    kwargs = dict(draft_logits=None, draft_probs=None, temperature=temperature, top_k=top_k, top_p=None, seed=seed,
                  offset=offset, max_num_draft=c["max_num_draft"])
    valid = verify_input_valid(c)
    try:
        out, num = torch.ops.dspark.verify_block(target, drafts, cu, **kwargs)
    except (RuntimeError, ValueError) as err:
        assert not valid, f"verify_block rejected valid input: {err}"
        check_error(op, VERIFY_ARGS, err)
        COUNTS[op]["error"] += 1
        return
    assert valid, "verify_block accepted input outside its contract"
    assert out.shape == (B, c["max_num_draft"] + 1) and num.shape == (B,)
    assert ((num >= 0) & (num <= c["max_num_draft"])).all()
    try:
        out_ref, num_ref = ref_verify.verify_block(target, drafts, cu, None, None, temperature, top_k, None, seed,
                                                   offset, c["max_num_draft"])
    except (OverflowError, RuntimeError) as err:
        # The reference forms position = offset + i as a Python int and cannot hand a value past
        # int64 to torch (the kernels take its uint64 bits, wrapped); nothing to compare then.
        assert any(o + c["max_num_draft"] + 1 > I64_MAX for o in c["offset"]), err
        COUNTS[op]["reference cannot express (offset + i > 2^63 - 1)"] += 1
        return
    assert out.tolist() == out_ref.tolist() and num.tolist() == num_ref.tolist()
    COUNTS[op]["matched reference"] += 1


def test_fuzz_cpu_verify_block():
    _fuzz_verify()
    report("verify_block")


# --------------------------------------------------------------------------- schedule_verify_lens


FLOATS = [0.0, -0.0, 1.0, 0.5, 1e-45, 1e-38, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan"), 2.0, -1.0,
          0.999999]


@SETTINGS
@given(st.integers(0, 4), st.integers(0, 4), st.integers(0, 6), st.data())
def _fuzz_schedule(R, gamma, extra, data):
    op = "schedule_verify_lens"
    COUNTS[op]["tried"] += 1
    conf = torch.tensor([[data.draw(st.sampled_from(FLOATS)) for _ in range(gamma)] for _ in range(R)],
                        dtype=torch.float32).reshape(R, gamma)
    bmax = data.draw(st.sampled_from([max(R - 1, 0), R, R + extra, R + R * gamma]))
    sps = torch.tensor([data.draw(st.sampled_from(FLOATS + [3.0, 10.0])) for _ in range(bmax + 1)],
                       dtype=torch.float32)
    early = data.draw(st.booleans())
    try:
        lens, cu = torch.ops.dspark.schedule_verify_lens(conf, sps, early)
    except (RuntimeError, ValueError) as err:
        check_error(op, ("confidence", "sps", "R * gamma", "early_stop"), err)
        COUNTS[op]["error"] += 1
        return
    lens_ref, cu_ref = ref_sched.schedule_verify_lens(conf, sps, early)
    assert lens.tolist() == lens_ref.tolist() and cu.tolist() == cu_ref.tolist()
    COUNTS[op]["matched reference"] += 1


def test_fuzz_cpu_schedule_verify_lens():
    _fuzz_schedule()
    # R * gamma past the supported 2^22 candidates, without the memory (expanded views)
    conf = torch.full((1, 1), 0.5).expand(2**12, 2**11)
    sps = torch.ones(1).expand(2**12 + 1)
    with pytest.raises(RuntimeError, match=r"schedule_verify_lens: R \* gamma"):
        torch.ops.dspark.schedule_verify_lens(conf, sps, True)
    COUNTS["schedule_verify_lens"]["tried"] += 1
    COUNTS["schedule_verify_lens"]["error"] += 1
    report("schedule_verify_lens")


# --------------------------------------------------------------------------- random_words


@SETTINGS
@given(st.integers(1, 4), st.data())
def _fuzz_words(n, data):
    op = "random_words"
    COUNTS[op]["tried"] += 1
    seed = [data.draw(st.sampled_from(LIMITS)) for _ in range(n)]
    position = [data.draw(st.sampled_from(LIMITS)) for _ in range(n)]
    index = [data.draw(st.one_of(st.integers(0, 9), st.sampled_from(LIMITS))) for _ in range(n)]
    salt = data.draw(st.sampled_from([0, 1, ref_philox.SALT_DRAFT, 2**32 - 1, 2**32, -1, I64_MAX, I64_MIN]))
    as32 = data.draw(st.booleans())
    args = [index_tensor(v, as32) for v in (seed, position, index)]
    valid = 0 <= salt < 2**32 and all(0 <= i < 2**32 for i in index)
    try:
        words = torch.ops.dspark.random_words(*args, salt)
    except (RuntimeError, ValueError) as err:
        assert not valid, f"random_words rejected valid input: {err}"
        check_error(op, ("seed", "position", "index", "salt"), err)
        COUNTS[op]["error"] += 1
        return
    assert valid, "random_words accepted input outside its contract"
    assert words.tolist() == ref_philox.random_words(args[0], args[1], salt, args[2]).tolist()
    COUNTS[op]["matched reference"] += 1


def test_fuzz_cpu_random_words():
    _fuzz_words()
    report("random_words")


# --------------------------------------------------------------------------- counts


def report(op: str) -> None:
    counts = COUNTS[op]
    print(f"\n[fuzz] {op}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    assert counts["tried"] >= 20, counts
    assert counts["error"] > 0, f"{op}: no example hit a check ({counts})"
    if op != "schedule_verify_lens":
        assert counts["matched reference"] > 0, f"{op}: no example was valid ({counts})"
