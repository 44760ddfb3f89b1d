"""KV rollback ops: kv_commit, kv_release_pages, window_commit, state_select (docs/kv.md).

* The reference against naive, independently written oracles.
* The CPU kernel equal to the reference byte for byte (compared as uint8) on
  caches poisoned with random bytes, so an unwritten or wrongly written byte
  cannot pass; everything outside the destination slots must stay untouched.
* Bad inputs raise errors naming the argument; opcheck; torch.compile.
* A CUDA class (marked ``cuda``, skipped without a GPU) comparing the CUDA
  kernels with the reference the same way, plus CUDA-graph capture.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

import dspark_kernels as dk

HAS_CPU = dk.backends("kv_commit")["cpu"]
CPU_BACKENDS = ["reference"] + (["cpu"] if HAS_CPU else [])
HAS_FP8 = hasattr(torch, "float8_e4m3fn")

DTYPES = [torch.bfloat16, torch.uint8, torch.float32] + ([torch.float8_e4m3fn] if HAS_FP8 else [])
PATH_KINDS = ["chain", "tree", "reversed", "sparse", "padded", "empty", "duplicate"]


# --------------------------------------------------------------------------- builders


def poisoned(shape, dtype, gen, device="cpu"):
    """A tensor of `dtype` filled with random bytes (NaNs and all)."""
    es = torch.empty((), dtype=dtype).element_size()
    shape = tuple(shape)
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * es), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).to(device)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def make_path(kind: str, W: int, rng: random.Random) -> tuple[list[int], int]:
    """(accept_path row of width W, num_accept) of the given kind."""
    if kind == "chain":
        n = rng.randint(1, W)
        path = list(range(n))
    elif kind == "tree":  # 0, then an increasing subset of the window (e.g. [0, 2, 3, 5])
        n = rng.randint(1, W)
        path = [0] + sorted(rng.sample(range(1, W), n - 1))
    elif kind == "reversed":
        n = rng.randint(2, W) if W > 1 else 1
        path = sorted(rng.sample(range(W), n), reverse=True)
    elif kind == "sparse":  # any distinct indices in any order
        n = rng.randint(1, W)
        path = rng.sample(range(W), n)
    elif kind == "padded":  # entries past num_accept are -1
        n = rng.randint(0, W)
        path = [0] + sorted(rng.sample(range(1, W), max(n - 1, 0))) if n else []
    elif kind == "empty":
        n, path = 0, []
    elif kind == "duplicate":  # a source used twice (a gather, not a permutation)
        n = rng.randint(1, W)
        path = [rng.randrange(W) for _ in range(n)]
    else:
        raise ValueError(kind)
    fill = -1 if kind in ("padded", "empty") else rng.randrange(W)  # garbage past n must be ignored
    return path + [fill] * (W - len(path)), n


def make_commit_case(*, B, page_size, W, rows, seed, kinds=PATH_KINDS, extra_pages=3, index_dtype=torch.int32,
                     device="cpu"):
    """caches (poisoned), block_table (shuffled page ids, distinct per request), lengths and paths."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    committed = [rng.randint(0, 3 * page_size + 2) for _ in range(B)]
    P = max((c + W + page_size - 1) // page_size for c in committed) + 1
    num_pages = B * P + extra_pages
    perm = torch.randperm(num_pages, generator=gen)
    block_table = perm[: B * P].view(B, P).clone()
    paths, counts = [], []
    for b in range(B):
        path, n = make_path(rng.choice(kinds), W, rng)
        paths.append(path)
        counts.append(n)
    caches = [poisoned((num_pages, page_size, *shape), dtype, gen, device) for shape, dtype in rows]
    return dict(
        caches=caches,
        block_table=block_table.to(index_dtype).to(device),
        page_size=page_size,
        committed_len=torch.tensor(committed, dtype=index_dtype, device=device),
        accept_path=torch.tensor(paths, dtype=index_dtype, device=device).view(B, W),
        num_accept=torch.tensor(counts, dtype=index_dtype, device=device),
    )


def clone_case(case, device=None):
    out = dict(case)
    out["caches"] = [c.clone() if device is None else c.to(device) for c in case["caches"]]
    for k in ("block_table", "committed_len", "accept_path", "num_accept"):
        out[k] = case[k] if device is None else case[k].to(device)
    return out


def run_commit(case, backend):
    return dk.kv_commit(case["caches"], case["block_table"], case["page_size"], case["committed_len"],
                        case["accept_path"], case["num_accept"], backend=backend)


# --------------------------------------------------------------------------- oracles


def oracle_commit(case):
    """Naive per-token copy, reading from an untouched copy of each cache."""
    bt, ps = case["block_table"].tolist(), case["page_size"]
    L, path, n = case["committed_len"].tolist(), case["accept_path"].tolist(), case["num_accept"].tolist()
    out = []
    for cache in case["caches"]:
        old, new = as_bytes(cache).clone(), as_bytes(cache).clone()
        for b in range(len(L)):
            for j in range(n[b]):
                src, dst = L[b] + path[b][j], L[b] + j
                new[bt[b][dst // ps], dst % ps] = old[bt[b][src // ps], src % ps]
        out.append(new)
    return out, [L[b] + n[b] for b in range(len(L))]


def destination_slots(case):
    """{(page, slot)} written by real moves (everything else must stay untouched)."""
    bt, ps = case["block_table"].tolist(), case["page_size"]
    L, path, n = case["committed_len"].tolist(), case["accept_path"].tolist(), case["num_accept"].tolist()
    slots = set()
    for b in range(len(L)):
        for j in range(n[b]):
            if path[b][j] != j:
                dst = L[b] + j
                slots.add((bt[b][dst // ps], dst % ps))
    return slots


def check_untouched(before, after, slots):
    mask = torch.ones(before.shape[:2], dtype=torch.bool)
    for page, slot in slots:
        mask[page, slot] = False
    assert torch.equal(as_bytes(before)[mask], as_bytes(after)[mask]), "bytes outside the destinations changed"


ROW_SETS = {
    "mla-bf16": [((36,), torch.bfloat16)],
    "kv-fp8": [((2, 8), torch.uint8), ((2, 8), torch.uint8)],
    "mixed": [((3, 4), torch.bfloat16), ((5,), torch.float32), ((7,), torch.uint8)]
    + ([((9,), torch.float8_e4m3fn)] if HAS_FP8 else []),
}


# --------------------------------------------------------------------------- kv_commit: reference vs oracle


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("rows", sorted(ROW_SETS))
def test_reference_matches_oracle(page_size, rows):
    for seed in range(4):
        case = make_commit_case(B=5, page_size=page_size, W=8, rows=ROW_SETS[rows], seed=seed)
        expect, new_len = oracle_commit(case)
        got = clone_case(case)
        out = run_commit(got, "reference")
        assert out.dtype == torch.int32 and out.tolist() == new_len
        for e, g in zip(expect, got["caches"]):
            assert torch.equal(e, as_bytes(g)), seed


def test_tree_compaction_example():
    """[0, 2, 3] and [0, 3, 4, 5] on page size 2, where the path straddles pages."""
    ps = 2
    cache = torch.arange(10 * ps * 3, dtype=torch.float32).view(10, ps, 3)
    bt = torch.tensor([[7, 2, 5, 0, 9], [1, 3, 8, 4, 6]])
    L = torch.tensor([1, 2])
    path = torch.tensor([[0, 2, 3, -1], [0, 3, 4, 5]])
    n = torch.tensor([3, 4])
    for backend in CPU_BACKENDS:
        c = cache.clone()
        new_len = dk.kv_commit([c], bt, ps, L, path, n, backend=backend)
        assert new_len.tolist() == [4, 6]

        def at(b, pos, t=cache):
            return t[bt[b, pos // ps], pos % ps]

        for b, (Lb, p) in enumerate([(1, [0, 2, 3]), (2, [0, 3, 4, 5])]):
            for j, s in enumerate(p):
                assert torch.equal(at(b, Lb + j, c), at(b, Lb + s)), (backend, b, j)


# --------------------------------------------------------------------------- kv_commit: cpu == reference


@pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("rows", sorted(ROW_SETS))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cpu_equals_reference(page_size, rows, index_dtype):
    for seed in range(3):
        case = make_commit_case(B=6, page_size=page_size, W=8, rows=ROW_SETS[rows], seed=100 + seed,
                                index_dtype=index_dtype)
        ref, cpu = clone_case(case), clone_case(case)
        assert torch.equal(run_commit(ref, "reference"), run_commit(cpu, "cpu"))
        slots = destination_slots(case)
        for before, r, c in zip(case["caches"], ref["caches"], cpu["caches"]):
            assert torch.equal(as_bytes(r), as_bytes(c)), seed
            check_untouched(before, c, slots)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_chain_moves_nothing(backend, page_size):
    case = make_commit_case(B=8, page_size=page_size, W=6, rows=ROW_SETS["mixed"], seed=7, kinds=["chain"])
    got = clone_case(case)
    new_len = run_commit(got, backend)
    assert new_len.tolist() == (case["committed_len"] + case["num_accept"]).tolist()
    for before, after in zip(case["caches"], got["caches"]):
        assert torch.equal(as_bytes(before), as_bytes(after))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_sweep_equals_oracle(backend):
    rng = random.Random(11)
    for trial in range(25):
        page_size = rng.choice([1, 2, 3, 16, 64])
        W = rng.choice([1, 2, 5, 8, 16])
        B = rng.randint(1, 9)
        rows = [((rng.randint(1, 5), rng.randint(1, 9)), rng.choice(DTYPES)) for _ in range(rng.randint(1, 3))]
        case = make_commit_case(B=B, page_size=page_size, W=W, rows=rows, seed=trial,
                                index_dtype=rng.choice([torch.int32, torch.int64]))
        expect, new_len = oracle_commit(case)
        got = clone_case(case)
        assert run_commit(got, backend).tolist() == new_len
        for e, g in zip(expect, got["caches"]):
            assert torch.equal(e, as_bytes(g)), (trial, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_caches_and_index_tensors(backend):
    """K and V as views of one [pages, 2, ps, H, D] tensor; a column-sliced block table and path."""
    gen = torch.Generator().manual_seed(3)
    base = case = make_commit_case(B=4, page_size=4, W=6, rows=[((2, 3), torch.bfloat16)], seed=5,
                                   kinds=["tree", "sparse", "reversed"])
    num_pages = case["caches"][0].shape[0]
    kv = poisoned((num_pages, 2, 4, 2, 3), torch.bfloat16, gen)
    bt = torch.full((4, case["block_table"].shape[1] * 2), -7, dtype=torch.int32)
    bt[:, ::2] = case["block_table"]
    path = torch.full((4, 12), 99, dtype=torch.int32)
    path[:, ::2] = case["accept_path"]
    strided = dict(base, caches=[kv[:, 0], kv[:, 1]], block_table=bt[:, ::2], accept_path=path[:, ::2])
    contiguous = dict(base, caches=[kv[:, 0].clone(), kv[:, 1].clone()])
    expect, _ = oracle_commit(contiguous)
    run_commit(strided, backend)
    for e, g in zip(expect, strided["caches"]):
        assert torch.equal(e, as_bytes(g))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_edge_cases(backend):
    # no caches: only new_len; empty batch; W = 0
    bt = torch.zeros(2, 3, dtype=torch.int32)
    out = dk.kv_commit([], bt, 4, torch.tensor([1, 2]), torch.tensor([[0, 1], [1, 0]]), torch.tensor([2, 1]),
                       backend=backend)
    assert out.tolist() == [3, 3]
    c = torch.zeros(4, 4, 8)
    out = dk.kv_commit([c], bt[:0], 4, torch.zeros(0, dtype=torch.int32), torch.zeros(0, 3, dtype=torch.int32),
                       torch.zeros(0, dtype=torch.int32), backend=backend)
    assert out.shape == (0,) and out.dtype == torch.int32
    out = dk.kv_commit([c], bt, 4, torch.tensor([1, 2]), torch.zeros(2, 0, dtype=torch.int32),
                       torch.zeros(2, dtype=torch.int32), backend=backend)
    assert out.tolist() == [1, 2]
    # a 2-D cache (one scalar per slot) and a 1-byte row
    c2 = torch.arange(12, dtype=torch.uint8).view(3, 4)
    dk.kv_commit([c2], torch.tensor([[2, 0, 1]]), 4, torch.tensor([3]), torch.tensor([[0, 4, 2]]), torch.tensor([3]),
                 backend=backend)
    # positions 3, 4, 5 <- 3, 7, 5: (page 2, slot 3) stays, (page 0, slot 0) <- (page 0, slot 3)
    assert c2.tolist() == [[3, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


# --------------------------------------------------------------------------- kv_commit: bad inputs


def _good_commit():
    case = make_commit_case(B=3, page_size=4, W=5, rows=[((6,), torch.bfloat16)], seed=2, kinds=["tree"])
    return case


SHAPE_CASES = [
    ("caches", lambda c: c.update(caches=c["caches"][0])),
    ("caches\\[1\\].*num_pages", lambda c: c.update(caches=[c["caches"][0], c["caches"][0][:-1].clone()])),
    ("caches\\[0\\].*page_size", lambda c: c.update(page_size=8)),
    ("caches\\[0\\].*dense", lambda c: c.update(caches=[torch.zeros(c["caches"][0].shape[0], 4, 12)[:, :, ::2]])),
    ("same memory", lambda c: c.update(caches=[c["caches"][0], c["caches"][0]])),
    ("block_table", lambda c: c.update(block_table=c["block_table"].float())),
    ("block_table", lambda c: c.update(block_table=c["block_table"][0])),
    ("committed_len", lambda c: c.update(committed_len=c["committed_len"][:2])),
    ("accept_path", lambda c: c.update(accept_path=c["accept_path"][:2])),
    ("accept_path", lambda c: c.update(accept_path=c["accept_path"].double())),
    ("num_accept", lambda c: c.update(num_accept=c["num_accept"][None])),
    ("page_size", lambda c: c.update(page_size=0)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,mutate", SHAPE_CASES)
def test_commit_bad_shapes_name_the_argument(backend, name, mutate):
    case = _good_commit()
    mutate(case)
    with pytest.raises((ValueError, RuntimeError), match=name):
        run_commit(case, backend)


def _set(key, idx, value):
    def f(c):
        c[key] = c[key].clone()
        c[key][idx] = value
    return f


DATA_CASES = [
    ("num_accept", _set("num_accept", 1, 6)),
    ("num_accept", _set("num_accept", 1, -1)),
    ("committed_len", _set("committed_len", 0, -3)),
    ("accept_path", lambda c: (_set("num_accept", 0, 3)(c), _set("accept_path", (0, 1), -1)(c))),
    ("past the block_table", _set("committed_len", 2, 1000)),
    ("block_table\\[", _set("block_table", (1, 0), 10_000)),
    ("block_table\\[", _set("block_table", (1, 0), -1)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,mutate", DATA_CASES)
def test_commit_bad_data_is_an_error_on_cpu(backend, name, mutate):
    case = _good_commit()
    case["num_accept"] = torch.full_like(case["num_accept"], 3)
    case["accept_path"] = torch.tensor([[0, 2, 3, 4, -1]] * 3, dtype=case["accept_path"].dtype)
    case["committed_len"] = torch.tensor([0, 1, 2], dtype=case["committed_len"].dtype)  # column 0 is used
    mutate(case)
    before = [c.clone() for c in case["caches"]]
    with pytest.raises((ValueError, RuntimeError), match=name):
        run_commit(case, backend)
    for b, a in zip(before, case["caches"]):  # nothing written before the error
        assert torch.equal(as_bytes(b), as_bytes(a))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_commit_conflicting_requests_are_an_error(backend):
    case = _good_commit()
    case["num_accept"] = torch.tensor([3, 3, 0], dtype=torch.int32)
    case["accept_path"] = torch.tensor([[0, 2, 3, -1, -1]] * 3, dtype=torch.int32)
    bt = case["block_table"].clone()
    bt[1] = bt[0]  # request 1 writes request 0's slots
    case["block_table"] = bt
    with pytest.raises((ValueError, RuntimeError), match="block_table"):
        run_commit(case, backend)
    # shared pages are fine when nobody writes into them (a chain, or only reading a shared prefix)
    case["accept_path"] = torch.tensor([[0, 1, 2, -1, -1]] * 3, dtype=torch.int32)
    run_commit(case, backend)


def test_direct_op_call_checks_arguments():
    if not HAS_CPU:
        pytest.skip("cpu backend not built")
    case = _good_commit()
    with pytest.raises(RuntimeError, match="accept_path"):
        torch.ops.dspark.kv_commit(case["caches"], case["block_table"], 4, case["committed_len"],
                                   case["accept_path"][:1], case["num_accept"])
    with pytest.raises(RuntimeError, match="num_accept"):
        torch.ops.dspark.kv_commit(case["caches"], case["block_table"], 4, case["committed_len"],
                                   case["accept_path"], case["num_accept"] + 10)


# --------------------------------------------------------------------------- kv_release_pages


def oracle_release(block_table, new_len, old_len, page_size, refcount):
    rc = refcount.tolist()
    freed = []
    for b, row in enumerate(block_table.tolist()):
        mine = []
        for p, page in enumerate(row):
            if new_len[b] <= p * page_size < old_len[b]:
                rc[page] -= 1
                if rc[page] == 0:
                    mine.append(page)
        freed.append(mine)
    return freed, rc


def make_release_case(seed, B=6, P=8, page_size=4, shared=2, dtype=torch.int32):
    """Requests that share a prefix of `shared` pages (refcount = sharers); own pages refcount 1."""
    rng = random.Random(seed)
    num_pages = B * P + 4
    ids = list(range(num_pages))
    rng.shuffle(ids)
    prefix = ids[:shared]
    rest = iter(ids[shared:])
    table = [prefix + [next(rest) for _ in range(P - shared)] for _ in range(B)]
    refcount = torch.zeros(num_pages, dtype=dtype)
    for row in table:
        for page in row:
            refcount[page] += 1
    old = [rng.randint(0, P * page_size) for _ in range(B)]
    new = [rng.randint(0, o) for o in old]
    return (torch.tensor(table, dtype=dtype), torch.tensor(new, dtype=dtype), torch.tensor(old, dtype=dtype),
            page_size, refcount)


def _check_release(out, table, new, old, ps, rc_before, rc_after):
    freed, num = out
    expect, rc = oracle_release(table, new.tolist(), old.tolist(), ps, rc_before)
    assert freed.dtype == torch.int32 and num.dtype == torch.int32 and freed.shape == table.shape
    assert rc_after.tolist() == rc
    for b, mine in enumerate(expect):
        assert int(num[b]) == len(mine)
        assert freed[b].tolist() == mine + [-1] * (table.shape[1] - len(mine))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_release_matches_oracle(backend, dtype):
    for seed in range(20):
        table, new, old, ps, rc = make_release_case(seed, shared=seed % 4, dtype=dtype)
        before = rc.clone()
        out = dk.kv_release_pages(table, new, old, ps, rc, backend=backend)
        _check_release(out, table, new, old, ps, before, rc)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_release_shared_page_returned_once_and_repeated_rollbacks(backend):
    table, _, _, ps, rc = make_release_case(0, B=3, P=6, page_size=4, shared=2)
    lengths = torch.tensor([24, 24, 24], dtype=torch.int32)
    seen = []
    for new in ([20, 13, 24], [9, 13, 5], [0, 0, 0]):  # three rollbacks, the last releases everything
        new = torch.tensor(new, dtype=torch.int32)
        before = rc.clone()
        out = dk.kv_release_pages(table, new, lengths, ps, rc, backend=backend)
        _check_release(out, table, new, lengths, ps, before, rc)
        assert (rc >= 0).all()
        seen += [p for row in out[0].tolist() for p in row if p >= 0]
        lengths = new
    assert sorted(seen) == sorted(set(table.flatten().tolist()))  # every page freed exactly once
    assert (rc == 0).all()
    # the shared prefix is returned by the last request of the batch that releases it
    assert set(table[0, :2].tolist()) <= set(out[0][2].tolist())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_release_partial_page_kept(backend):
    table = torch.tensor([[3, 1, 2]], dtype=torch.int32)
    rc = torch.ones(4, dtype=torch.int32)
    freed, num = dk.kv_release_pages(table, torch.tensor([5]), torch.tensor([12]), 4, rc, backend=backend)
    assert freed.tolist() == [[2, -1, -1]] and num.tolist() == [1]  # page 1 holds position 4: kept
    assert rc.tolist() == [1, 1, 0, 1]


RELEASE_BAD = [
    ("refcount", lambda a: a.__setitem__(4, torch.zeros_like(a[4]))),      # double free
    ("new_len", lambda a: a.__setitem__(1, a[1] - 100)),
    ("old_len", lambda a: a.__setitem__(2, a[2] + 1000)),
    ("block_table", lambda a: a[0].__setitem__((0, 7), 10_000)),
    ("block_table", lambda a: a.__setitem__(0, a[0].float())),
    ("refcount", lambda a: a.__setitem__(4, a[4].float())),
    ("new_len", lambda a: a.__setitem__(1, a[1][:2])),
    ("page_size", lambda a: a.__setitem__(3, 0)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,mutate", RELEASE_BAD)
def test_release_bad_inputs(backend, name, mutate):
    args = list(make_release_case(3, shared=2))
    args[1] = torch.zeros_like(args[1])  # release everything
    args[2] = torch.full_like(args[2], 8 * 4)
    args[0] = args[0].clone()
    mutate(args)
    rc = args[4]
    before = rc.clone() if rc.dtype != torch.float32 else None
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.kv_release_pages(*args, backend=backend)
    if before is not None:
        assert torch.equal(rc, before)  # nothing released before the error


# --------------------------------------------------------------------------- window_commit


def oracle_window(window, rows, cu, positions, keep):
    out = window.clone()
    W = window.shape[1]
    for b in range(window.shape[0]):
        for t in range(int(cu[b]), int(cu[b + 1])):
            if bool(keep[t]):
                out[b, int(positions[t]) % W] = rows[t]
    return out


def make_window_case(seed, B=4, W=8, row=(2, 5), dtype=torch.bfloat16, max_rows=20):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    counts = [rng.randint(0, max_rows) for _ in range(B)]
    cu = torch.tensor([0] + counts).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    positions = []
    for n in counts:
        start = rng.randint(0, 50)
        positions += [start + i for i in range(n)]  # consecutive: wraps when n > W or across W
    if T > 2:
        positions[rng.randrange(T)] += W  # a collision inside a request
    keep = torch.tensor([rng.random() < 0.6 for _ in range(T)], dtype=torch.bool)
    window = poisoned((B, W, *row), dtype, gen)
    rows = poisoned((T, *row), dtype, gen)
    return window, rows, cu, torch.tensor(positions, dtype=torch.int64), keep


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8, torch.float32])
def test_window_commit_matches_oracle(backend, dtype):
    for seed in range(12):
        window, rows, cu, pos, keep = make_window_case(seed, dtype=dtype, W=[1, 3, 8, 16][seed % 4])
        expect = oracle_window(as_bytes(window), as_bytes(rows), cu, pos, keep)
        got = window.clone()
        assert dk.window_commit(got, rows, cu, pos, keep, backend=backend) is got
        assert torch.equal(as_bytes(got), expect), seed


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_window_commit_later_row_wins_and_rejected_rows_untouched(backend):
    window = torch.zeros(2, 4, 3)
    rows = torch.arange(1, 7, dtype=torch.float32)[:, None].repeat(1, 3)
    cu = torch.tensor([0, 4, 6])
    pos = torch.tensor([1, 5, 9, 2, 3, 7])  # request 0: 1, 5, 9 -> slot 1; request 1: 3, 7 -> slot 3
    keep = torch.tensor([True, True, False, True, True, False])
    dk.window_commit(window, rows, cu, pos, keep, backend=backend)
    assert window[0, :, 0].tolist() == [0, 2, 4, 0]  # row 1 (later, kept) beat row 0; row 2 rejected
    assert window[1, :, 0].tolist() == [0, 0, 0, 5]
    # keep=None keeps every row
    dk.window_commit(window, rows, cu, pos, None, backend=backend)
    assert window[0, :, 0].tolist() == [0, 3, 4, 0]


WINDOW_BAD = [
    ("rows", lambda a: a.__setitem__(1, a[1].float())),
    ("rows", lambda a: a.__setitem__(1, a[1][:, :1])),
    ("cu", lambda a: a.__setitem__(2, a[2][:-1])),
    ("positions", lambda a: a.__setitem__(3, a[3][:-1])),
    ("keep", lambda a: a.__setitem__(4, a[4].float())),
    ("cu\\[0\\]", lambda a: a[2].__setitem__(0, 1)),
    ("cu\\[B\\]", lambda a: a[2].__setitem__(-1, 3)),
    ("non-decreasing", lambda a: (a[2].__setitem__(1, 30), a[2].__setitem__(2, 10))),
    ("positions", lambda a: (a[3].__setitem__(0, -5), a[4].__setitem__(0, True))),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,mutate", WINDOW_BAD)
def test_window_commit_bad_inputs(backend, name, mutate):
    args = list(make_window_case(1, max_rows=10))
    args[2], args[3], args[4] = args[2].clone(), args[3].clone(), args[4].clone()
    mutate(args)
    before = args[0].clone()
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.window_commit(*args, backend=backend)
    assert torch.equal(as_bytes(before), as_bytes(args[0]))


# --------------------------------------------------------------------------- state_select


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_state_select(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    states = poisoned((5, 4, 3, 7), dtype, gen)
    out = poisoned((5, 3, 7), dtype, gen)
    index = torch.tensor([0, 3, -1, 2, 1], dtype=torch.int32)
    expect = as_bytes(out).clone()
    for b, i in enumerate(index.tolist()):
        if i >= 0:
            expect[b] = as_bytes(states)[b, i]
    assert dk.state_select(states, index, out, backend=backend) is out
    assert torch.equal(as_bytes(out), expect)
    # strided states: a slice of a wider step axis
    wide = poisoned((5, 8, 3, 7), dtype, gen)
    out2 = torch.empty_like(out)
    dk.state_select(wide[:, ::2], index.clamp(min=0), out2, backend=backend)
    assert torch.equal(as_bytes(out2), as_bytes(wide[torch.arange(5), index.clamp(min=0).long() * 2]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,bad", [("index", torch.tensor([0, 4])), ("index", torch.tensor([-2, 0])),
                                      ("index", torch.tensor([0.0, 1.0])), ("out", None)])
def test_state_select_bad_inputs(backend, name, bad):
    states = torch.randn(2, 4, 3)
    out = torch.zeros(2, 3)
    if bad is None:
        out = torch.zeros(2, 4)
        bad = torch.tensor([0, 1])
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.state_select(states, bad, out, backend=backend)
    assert (out == 0).all()


# --------------------------------------------------------------------------- opcheck, compile


def test_opcheck():
    case = make_commit_case(B=3, page_size=4, W=5, rows=[((6,), torch.bfloat16), ((3,), torch.float32)], seed=9,
                            kinds=["tree"])
    torch.library.opcheck(torch.ops.dspark.kv_commit.default,
                          (case["caches"], case["block_table"], 4, case["committed_len"], case["accept_path"],
                           case["num_accept"]))
    table, new, old, ps, rc = make_release_case(4, shared=2)
    # opcheck calls the op several times: give it a refcount large enough that no call double-frees
    torch.library.opcheck(torch.ops.dspark.kv_release_pages.default, (table, new, old, ps, rc + 10))
    window, rows, cu, pos, keep = make_window_case(2, dtype=torch.float32)
    torch.library.opcheck(torch.ops.dspark.window_commit.default, (window, rows, cu, pos, keep))
    torch.library.opcheck(torch.ops.dspark.state_select.default,
                          (torch.randn(3, 4, 5), torch.tensor([1, 0, 3]), torch.zeros(3, 5)))


@pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")
def test_torch_compile_fullgraph():
    case = make_commit_case(B=3, page_size=4, W=5, rows=[((6,), torch.float32)], seed=12, kinds=["tree"])
    table, new, old, _ps, rc = make_release_case(5, shared=1)

    def step(caches, bt, L, path, n, states, index, out, rt, new, old, rc):
        new_len = dk.kv_commit(caches, bt, 4, L, path, n)
        dk.state_select(states, index, out)
        freed, num = dk.kv_release_pages(rt, new, old, 4, rc)
        return new_len, freed, num

    states = torch.randn(3, 4, 5)
    index = torch.tensor([1, 0, 3])
    eager_c, comp_c = clone_case(case), clone_case(case)
    eager_out, comp_out = torch.zeros(3, 5), torch.zeros(3, 5)
    eager_rc, comp_rc = rc.clone(), rc.clone()
    e = step(eager_c["caches"], case["block_table"], case["committed_len"], case["accept_path"], case["num_accept"],
             states, index, eager_out, table, new, old, eager_rc)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    c = compiled(comp_c["caches"], case["block_table"], case["committed_len"], case["accept_path"],
                 case["num_accept"], states, index, comp_out, table, new, old, comp_rc)
    for x, y in zip(e, c):
        assert torch.equal(x, y)
    for x, y in zip(eager_c["caches"], comp_c["caches"]):
        assert torch.equal(as_bytes(x), as_bytes(y))
    assert torch.equal(eager_out, comp_out) and torch.equal(eager_rc, comp_rc)


def test_backends_and_unknown_backend():
    for op in ("kv_commit", "kv_release_pages", "window_commit", "state_select"):
        assert dk.backends(op)["reference"]
        assert not dk.backends(op)["triton"]
    case = _good_commit()
    with pytest.raises(ValueError, match="backend"):
        run_commit(case, "tpu")


# --------------------------------------------------------------------------- CUDA

# The GPU backend under test: the compiled extension, or (bench/gpu_check.sh's NVRTC
# stage) DSPARK_TEST_GPU_BACKEND=nvrtc, the same kernels compiled at run time.
GPU = os.environ.get("DSPARK_TEST_GPU_BACKEND", "cuda")
CUDA_OK = torch.cuda.is_available() and dk.backends("kv_commit")[GPU]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason=f"needs a CUDA GPU and the {GPU} backend")
class TestCuda:
    def _compare(self, case):
        ref = clone_case(case)
        gpu = clone_case(case, "cuda")
        new_ref = run_commit(ref, "reference")
        new_gpu = run_commit(gpu, GPU)
        assert torch.equal(new_ref, new_gpu.cpu())
        for r, g in zip(ref["caches"], gpu["caches"]):
            assert torch.equal(as_bytes(r), as_bytes(g.cpu()))

    @pytest.mark.parametrize("page_size", [1, 16, 64])
    @pytest.mark.parametrize("rows", sorted(ROW_SETS))
    def test_commit_equals_reference(self, page_size, rows):
        for seed in range(3):
            self._compare(make_commit_case(B=7, page_size=page_size, W=8, rows=ROW_SETS[rows], seed=200 + seed))

    def test_commit_random_sweep(self):
        rng = random.Random(21)
        for trial in range(30):
            rows = [((rng.randint(1, 5), rng.randint(1, 300)), rng.choice(DTYPES)) for _ in range(rng.randint(1, 4))]
            self._compare(make_commit_case(B=rng.randint(1, 40), page_size=rng.choice([1, 3, 16, 64]),
                                           W=rng.choice([1, 4, 8, 16, 33]), rows=rows, seed=trial,
                                           index_dtype=rng.choice([torch.int32, torch.int64])))

    def test_chain_is_a_noop(self):
        case = make_commit_case(B=16, page_size=16, W=8, rows=ROW_SETS["mixed"], seed=3, kinds=["chain"])
        gpu = clone_case(case, "cuda")
        run_commit(gpu, GPU)
        for before, after in zip(case["caches"], gpu["caches"]):
            assert torch.equal(as_bytes(before), as_bytes(after.cpu()))

    def test_many_caches_and_wide_paths(self):
        # more than one launch (> 96 caches), unaligned rows (vec < 16), and a path wide
        # enough to need the shared-memory opt-in
        rows = [((3,), torch.uint8)] * 100 + [((4096,), torch.bfloat16)]
        self._compare(make_commit_case(B=3, page_size=16, W=8, rows=rows, seed=4))
        # W = 200: the row tile shrinks to fit 48 KB; W = 2000: even 16-byte tiles need the opt-in
        self._compare(make_commit_case(B=2, page_size=64, W=200, rows=[((1024,), torch.bfloat16)], seed=5,
                                       kinds=["sparse", "reversed"]))
        self._compare(make_commit_case(B=2, page_size=64, W=2000, rows=[((64,), torch.bfloat16)], seed=6,
                                       kinds=["sparse", "tree"]))

    def test_debug_checks(self, monkeypatch):
        monkeypatch.setenv("DSPARK_DEBUG", "1")
        case = clone_case(_good_commit(), "cuda")
        case["num_accept"] = torch.full_like(case["num_accept"], 9)
        with pytest.raises(ValueError, match="num_accept"):
            run_commit(case, GPU)
        table, new, old, ps, rc = make_release_case(3, shared=2)
        with pytest.raises(ValueError, match="refcount"):
            dk.kv_release_pages(table.cuda(), torch.zeros_like(new).cuda(), torch.full_like(old, 32).cuda(), ps,
                                torch.zeros_like(rc).cuda(), backend=GPU)
        with pytest.raises(ValueError, match="index"):
            dk.state_select(torch.zeros(2, 3, 4).cuda(), torch.tensor([0, 3]).cuda(), torch.zeros(2, 4).cuda(),
                            backend=GPU)

    def test_opcheck(self):
        case = clone_case(make_commit_case(B=3, page_size=4, W=5, rows=[((6,), torch.bfloat16)], seed=9,
                                           kinds=["tree"]), "cuda")
        torch.library.opcheck(torch.ops.dspark.kv_commit.default,
                              (case["caches"], case["block_table"], 4, case["committed_len"], case["accept_path"],
                               case["num_accept"]))
        table, new, old, ps, rc = make_release_case(4, shared=2)
        torch.library.opcheck(torch.ops.dspark.kv_release_pages.default,
                              (table.cuda(), new.cuda(), old.cuda(), ps, (rc + 10).cuda()))
        window, rows, cu, pos, keep = make_window_case(2, dtype=torch.float32)
        torch.library.opcheck(torch.ops.dspark.window_commit.default,
                              (window.cuda(), rows.cuda(), cu.cuda(), pos.cuda(), keep.cuda()))
        torch.library.opcheck(torch.ops.dspark.state_select.default,
                              (torch.randn(3, 4, 5).cuda(), torch.tensor([1, 0, 3]).cuda(), torch.zeros(3, 5).cuda()))

    def test_strided(self):
        gen = torch.Generator().manual_seed(1)
        case = make_commit_case(B=4, page_size=4, W=6, rows=[((2, 64), torch.bfloat16)], seed=6,
                                kinds=["tree", "sparse"])
        kv = poisoned((case["caches"][0].shape[0], 2, 4, 2, 64), torch.bfloat16, gen)
        ref = dict(case, caches=[kv[:, 0].clone(), kv[:, 1].clone()])
        expect, _ = oracle_commit(ref)
        kv_gpu = kv.cuda()
        gpu = clone_case(dict(case, caches=[]), "cuda")
        gpu["caches"] = [kv_gpu[:, 0], kv_gpu[:, 1]]
        run_commit(gpu, GPU)
        for e, g in zip(expect, gpu["caches"]):
            assert torch.equal(e, as_bytes(g.cpu()))

    def test_invalid_entries_are_skipped_like_the_reference(self):
        case = _good_commit()
        case["num_accept"] = torch.tensor([9, 3, 3], dtype=torch.int32)  # > W: clamped
        case["accept_path"] = torch.tensor([[0, 2, -1, 4, 1], [0, 3, 4, 1, 1], [0, 2, 3, 1, 1]], dtype=torch.int32)
        bt = case["block_table"].clone()
        bt[1, :] = 10_000  # request 1's pages are invalid: nothing moves
        case["block_table"] = bt
        ref = clone_case(case)
        gpu = clone_case(case, "cuda")
        from dspark_kernels.reference import kv as ref_kv

        ref_kv.kv_commit(ref["caches"], ref["block_table"], 4, ref["committed_len"], ref["accept_path"],
                         ref["num_accept"])
        torch.ops.dspark.kv_commit(gpu["caches"], gpu["block_table"], 4, gpu["committed_len"], gpu["accept_path"],
                                   gpu["num_accept"])
        assert torch.equal(as_bytes(ref["caches"][0]), as_bytes(gpu["caches"][0].cpu()))

    def test_graph_capture(self):
        case = make_commit_case(B=8, page_size=16, W=6, rows=ROW_SETS["kv-fp8"], seed=8, kinds=["tree", "sparse"])
        gpu = clone_case(case, "cuda")
        args = (gpu["block_table"], 16, gpu["committed_len"], gpu["accept_path"], gpu["num_accept"])
        originals = [c.clone() for c in gpu["caches"]]
        torch.ops.dspark.kv_commit(gpu["caches"], *args)  # warm-up
        for c, o in zip(gpu["caches"], originals):
            c.copy_(o)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            new_len = torch.ops.dspark.kv_commit(gpu["caches"], *args)
        for c, o in zip(gpu["caches"], originals):
            c.copy_(o)
        graph.replay()
        torch.cuda.synchronize()
        ref = clone_case(case)
        expect = run_commit(ref, "reference")
        assert torch.equal(new_len.cpu(), expect)
        for r, g in zip(ref["caches"], gpu["caches"]):
            assert torch.equal(as_bytes(r), as_bytes(g.cpu()))

    @pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
    def test_release(self, dtype):
        for seed in range(20):
            table, new, old, ps, rc = make_release_case(seed, B=9, P=20, shared=seed % 5, dtype=dtype)
            before = rc.clone()
            rc_gpu = rc.cuda()
            freed, num = dk.kv_release_pages(table.cuda(), new.cuda(), old.cuda(), ps, rc_gpu, backend=GPU)
            expect, rc_expect = oracle_release(table, new.tolist(), old.tolist(), ps, before)
            assert rc_gpu.cpu().tolist() == rc_expect
            # a shared page may be returned by any of its releasers: compare per request
            # without the shared prefix, and the prefix over the whole batch
            prefix = set(table[0, : seed % 5].tolist())
            got_all, want_all = [], []
            for b, mine in enumerate(expect):
                row = freed[b].cpu().tolist()
                n = int(num[b])
                assert all(p == -1 for p in row[n:])
                assert [p for p in row[:n] if p not in prefix] == [p for p in mine if p not in prefix]
                got_all += row[:n]
                want_all += mine
            assert sorted(got_all) == sorted(want_all)

    def test_release_never_negative(self):
        table = torch.tensor([[0, 1], [0, 1]], dtype=torch.int32).cuda()
        rc = torch.tensor([1, 0], dtype=torch.int32).cuda()
        z = torch.zeros(2, dtype=torch.int32).cuda()
        _freed, num = torch.ops.dspark.kv_release_pages(table, z, z + 8, 4, rc)
        assert rc.cpu().tolist() == [0, 0]
        assert sorted(int(n) for n in num.cpu()) == [0, 1]

    def test_window_commit(self):
        for seed in range(12):
            window, rows, cu, pos, keep = make_window_case(seed, W=[1, 3, 8, 16][seed % 4], row=(8, 16),
                                                           max_rows=40)
            expect = window.clone()
            dk.window_commit(expect, rows, cu, pos, keep, backend="reference")
            got = window.cuda()
            dk.window_commit(got, rows.cuda(), cu.cuda(), pos.cuda(), keep.cuda(), backend=GPU)
            assert torch.equal(as_bytes(expect), as_bytes(got.cpu())), seed

    def test_state_select(self):
        gen = torch.Generator().manual_seed(0)
        for shape, dtype in [((6, 5, 3, 7), torch.bfloat16), ((4, 3, 64, 300), torch.float32)]:
            states = poisoned(shape, dtype, gen)
            out = poisoned((shape[0], *shape[2:]), dtype, gen)
            index = torch.randint(-1, shape[1], (shape[0],), generator=gen)
            index[0] = shape[1] + 3  # invalid: skipped on CUDA without DSPARK_DEBUG
            expect = out.clone()
            from dspark_kernels.reference import kv as ref_kv

            ref_kv.state_select(states, index, expect)
            got = out.cuda()
            torch.ops.dspark.state_select(states.cuda(), index.cuda(), got)
            assert torch.equal(as_bytes(expect), as_bytes(got.cpu()))
