"""MoE ops (moe_align, grouped_gemm, fused_moe): the reference against naive fp64 loops,
every backend against the reference, vLLM's documented layout, edge cases, bad inputs,
opcheck, torch.compile, the tuner's files, and CUDA tests at real shapes (docs/moe.md, docs/correctness.md).

The Triton interpreter is slow: Triton cases on the CPU use fp32 / fp16 (it gets bf16
wrong) and small shapes.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings

import pytest
import torch
from conftest import backend_device

import dspark_kernels as dk
from dspark_kernels.reference import moe as ref

CUDA = torch.cuda.is_available()


def _backends(op: str) -> list[str]:
    return [b for b, ok in dk.backends(op).items() if ok and b != "reference"]


def _interp(backend: str) -> bool:
    return backend == "triton" and backend_device(backend) == "cpu"


# --------------------------------------------------------------------------- inputs and oracles


def routing(m, k, num_experts, *, kind="uniform", seed=0, device="cpu"):
    """(topk_weights [M, k] fp32, topk_ids [M, k] int32) for a routing pattern.

    uniform: k distinct experts per token (top-k of random scores, softmax weights);
    hot: every token's first choice is expert 0; sparse: only experts 1 and E-2
    (the rest empty); pad: uniform, with some rows all -1 and some slots -1.
    """
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(m, num_experts, generator=g)
    if kind == "hot":
        scores[:, 0] = 2.0
    if kind == "sparse":
        scores[:, [e for e in range(num_experts) if e not in (1, num_experts - 2)]] = -1.0
    weights, ids = torch.topk(torch.softmax(scores, -1), k, dim=-1)
    ids = ids.to(torch.int32)
    if kind == "sparse":
        ids = torch.where(torch.rand(m, k, generator=g) < 0.5, 1, num_experts - 2).to(torch.int32)
    if kind == "pad":
        ids[torch.rand(m, generator=g) < 0.3] = -1
        ids[torch.rand(m, k, generator=g) < 0.2] = -1
    return weights.to(device), ids.to(device)


def moe_weights(num_experts, hidden, inter, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) * 0.1).to(dtype)
    return w13.to(device), w2.to(device)


def naive_fused_moe(x, w13, w2, topk_weights, topk_ids):
    """fp64, one (token, slot) at a time: the formula of the docstring, written out."""
    m, k = topk_ids.shape
    inter = w2.shape[2]
    out = torch.zeros(m, w2.shape[1], dtype=torch.float64)
    for t in range(m):
        xt = x[t].double()
        for j in range(k):
            e = int(topk_ids[t, j])
            if e < 0:
                continue
            gate = w13[e, :inter].double() @ xt
            up = w13[e, inter:].double() @ xt
            act = gate / (1.0 + torch.exp(-gate)) * up
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ act)
    return out


def python_align(topk_ids, num_experts, block_m):
    """moe_align written independently: sort (expert, slot) pairs, pad each group."""
    flat = topk_ids.reshape(-1).tolist()
    numel = len(flat)
    pairs = sorted((e, i) for i, e in enumerate(flat) if 0 <= e < num_experts)
    sorted_ids, expert_ids = [], []
    for e, group in itertools.groupby(pairs, key=lambda p: p[0]):
        slots = [i for _, i in group]
        blocks = math.ceil(len(slots) / block_m)
        sorted_ids += slots + [numel] * (blocks * block_m - len(slots))
        expert_ids += [e] * blocks
    total = len(sorted_ids)
    length = numel + num_experts * (block_m - 1)
    sorted_ids += [numel] * (length - total)
    expert_ids += [-1] * (math.ceil(length / block_m) - len(expert_ids))
    return sorted_ids, expert_ids, total


def rel_err(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)) if want.numel() else 0.0


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("kind", ["uniform", "hot", "sparse", "pad"])
def test_reference_fused_moe_matches_naive_fp64(kind):
    m, k, E, H, I = 7, 3, 6, 24, 10
    w13, w2 = moe_weights(E, H, I, seed=1)
    x = torch.randn(m, H, generator=torch.Generator().manual_seed(2))
    tw, ids = routing(m, k, E, kind=kind, seed=3)
    got = ref.fused_moe(x, w13, w2, tw, ids)
    assert rel_err(got, naive_fused_moe(x, w13, w2, tw, ids)) < 1e-5
    if kind == "pad":
        dead = (ids < 0).all(1)
        assert dead.any() and (got[dead] == 0).all()


def test_reference_fused_moe_duplicate_expert_in_a_row_counts_twice():
    E, H, I = 3, 8, 4
    w13, w2 = moe_weights(E, H, I, seed=4)
    x = torch.randn(2, H)
    ids = torch.tensor([[1, 1], [2, -1]], dtype=torch.int32)
    tw = torch.tensor([[0.25, 0.5], [1.0, 9.0]])
    assert rel_err(ref.fused_moe(x, w13, w2, tw, ids), naive_fused_moe(x, w13, w2, tw, ids)) < 1e-5


def test_reference_grouped_gemm_matches_row_loop():
    g = torch.Generator().manual_seed(5)
    a, w = torch.randn(11, 6, generator=g), torch.randn(4, 5, 6, generator=g)
    offs = torch.tensor([0, 3, 3, 9, 10])
    got = ref.grouped_gemm(a, w, offs)
    for t in range(11):
        e = next((e for e in range(4) if offs[e] <= t < offs[e + 1]), None)
        want = torch.zeros(5, dtype=torch.float64) if e is None else w[e].double() @ a[t].double()
        assert torch.allclose(got[t].double(), want, atol=1e-5)


def test_reference_moe_align_matches_vllm_documented_example():
    """vLLM's moe_align_block_size docstring: ids 1..4, block 4, 12 slots (expert 0 empty)."""
    ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]])
    s, e, n = ref.moe_align(ids, 5, 4)
    assert s[:16].tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert s.numel() == 12 + 5 * 3 and (s[16:] == 12).all()
    assert e.tolist() == [1, 2, 3, 4, -1, -1, -1] and n.tolist() == [16]


# --------------------------------------------------------------------------- moe_align

ALIGN_CASES = [  # (M, k, E, block_m, kind)
    (4, 3, 5, 4, "uniform"),
    (1, 8, 256, 16, "uniform"),     # one verify token, DeepSeek routing
    (8, 8, 256, 16, "pad"),         # γ+1 = 8 tokens, -1 slots
    (8, 2, 7, 16, "hot"),
    (13, 2, 9, 32, "sparse"),       # empty experts
    (0, 4, 6, 16, "uniform"),       # no tokens
    (5, 2, 3, 1, "uniform"),        # block_m 1
    (3, 2, 4, 16, "allpad"),        # nothing routed: num_tokens_post_pad = 0
    (300, 4, 10, 16, "pad"),        # several chunks
    (1100, 8, 20, 64, "uniform"),   # more chunks than Triton's small path takes: the scan kernel
]


def _align_ids(m, k, E, kind, seed=0):
    if kind == "allpad":
        return torch.full((m, k), -1, dtype=torch.int32)
    return routing(m, k, E, kind=kind, seed=seed)[1] if m else torch.zeros(0, k, dtype=torch.int32)


@pytest.mark.parametrize("case", ALIGN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_moe_align_reference_equals_python(case):
    m, k, E, bm, kind = case
    ids = _align_ids(m, k, E, kind)
    s, e, n = ref.moe_align(ids, E, bm)
    ps, pe, pn = python_align(ids, E, bm)
    assert s.tolist() == ps and e.tolist() == pe and n.tolist() == [pn]
    assert s.dtype == e.dtype == n.dtype == torch.int32


@pytest.mark.parametrize("backend", _backends("moe_align"))
@pytest.mark.parametrize("case", ALIGN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_moe_align_backend_equals_reference(backend, case):
    m, k, E, bm, kind = case
    if _interp(backend) and m * k > 2500:
        pytest.skip("slow in the Triton interpreter (its large path is test_moe_align_triton_paths_agree)")
    ids = _align_ids(m, k, E, kind)
    want = ref.moe_align(ids, E, bm)
    for dtype in (torch.int32, torch.int64) if m == 8 else (torch.int32,):
        got = dk.moe_align(ids.to(dtype).to(backend_device(backend)), E, bm, backend=backend)
        for w, g_ in zip(want, got):
            assert g_.dtype == torch.int32 and torch.equal(g_.cpu(), w), (case, dtype)


@pytest.mark.skipif("triton" not in _backends("moe_align"), reason="needs triton")
@pytest.mark.parametrize("mode", [1, 2])
def test_moe_align_triton_paths_agree(mode):
    """The small path (whole table per program) and the large one (scan kernel) on one input."""
    from dspark_kernels.triton.moe_align import moe_align as triton_align

    ids = routing(90, 3, 11, kind="pad", seed=8)[1].to(backend_device("triton"))
    want = ref.moe_align(ids.cpu(), 11, 16)
    got = triton_align(ids, 11, 16, _mode=mode)
    assert all(torch.equal(g_.cpu(), w) for g_, w in zip(got, want))


def test_moe_align_out_of_range_ids_are_dropped_without_checks(monkeypatch):
    """Ids past E are an error on CPU; the kernels themselves drop them (never index past E)."""
    ids = torch.tensor([[0, 9], [-3, 1]], dtype=torch.int32)
    want = ref.moe_align(ids, 2, 4)
    assert want[0][:8].tolist() == [0, 4, 4, 4, 3, 4, 4, 4] and want[2].tolist() == [8]
    from dspark_kernels.cpu.moe_align import moe_align as torch_moe_align

    assert all(torch.equal(g_, w) for g_, w in zip(torch_moe_align(ids, 2, 4), want))
    if "triton" in _backends("moe_align"):
        from dspark_kernels.triton.moe_align import moe_align as triton_align

        got = triton_align(ids.to(backend_device("triton")), 2, 4)
        assert all(torch.equal(g_.cpu(), w) for g_, w in zip(got, want))


# --------------------------------------------------------------------------- grouped_gemm

GG_CASES = [  # (T, K, N, offsets)
    (37, 48, 40, [0, 10, 10, 25, 30, 33]),   # an empty group, 4 tail rows (zeros)
    (1, 32, 16, [0, 0, 1, 1]),                # one row
    (20, 24, 33, [0, 20]),                    # one group, odd N
    (9, 16, 16, [0, 0, 0, 0]),                # nothing routed: all zeros
]


@pytest.mark.parametrize("backend", _backends("grouped_gemm"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GG_CASES, ids=lambda c: f"T{c[0]}")
def test_grouped_gemm_backend_equals_reference(backend, dtype, case):
    if dtype == torch.bfloat16 and _interp(backend):
        pytest.skip("the Triton interpreter gets bf16 wrong (triton #4972)")
    T, K, N, offs = case
    g = torch.Generator().manual_seed(T)
    a = (torch.randn(T, K, generator=g) * 0.1).to(dtype)
    w = (torch.randn(len(offs) - 1, N, K, generator=g) * 0.1).to(dtype)
    offs = torch.tensor(offs, dtype=torch.int32)
    want = ref.grouped_gemm(a, w, offs)
    dev = backend_device(backend)
    got = dk.grouped_gemm(a.to(dev), w.to(dev), offs.to(dev), backend=backend).cpu()
    assert got.dtype == dtype and rel_err(got, want) <= TOL[dtype]
    assert (got[offs[-1]:] == 0).all()


@pytest.mark.parametrize("backend", ["reference"] + _backends("grouped_gemm"))
def test_grouped_gemm_strided_inputs_and_out(backend):
    """Non-contiguous a, w as a transposed view of [E, K, N] storage, out= written in place
    (poisoned with NaN first), int64 offsets."""
    g = torch.Generator().manual_seed(6)
    T, K, N = 21, 40, 24
    dev = backend_device(backend)
    a_wide = torch.randn(T, 2 * K, generator=g).to(dev)
    a = a_wide[:, ::2]
    w_kn = torch.randn(3, K, N, generator=g).to(dev)
    w = w_kn.transpose(1, 2)  # [E, N, K], stride 1 along N
    offs = torch.tensor([0, 5, 5, 19], dtype=torch.int64, device=dev)
    want = ref.grouped_gemm(a.cpu().contiguous(), w.cpu().contiguous(), offs.cpu())
    out_wide = torch.full((T, N + 3), float("nan"), device=dev)
    out = out_wide[:, 1:N + 1]
    res = dk.grouped_gemm(a, w, offs, out=out, backend=backend)
    assert res is out and rel_err(out, want) < 1e-5
    assert torch.isnan(out_wide[:, 0]).all() and torch.isnan(out_wide[:, N + 1:]).all()


# --------------------------------------------------------------------------- fused_moe

# (M, k, E, H, I, routing kind); the Triton interpreter runs the first group only
FM_CASES = [
    (1, 2, 4, 64, 32, "uniform"),
    (8, 2, 6, 64, 32, "pad"),       # γ+1 = 8 tokens, -1 rows and slots
    (8, 3, 5, 48, 40, "hot"),       # odd H, I not multiples of the tiles
    (13, 2, 8, 32, 16, "sparse"),   # 6 of 8 experts empty
]
FM_CPU_CASES = [
    (1000, 8, 16, 32, 24, "pad"),   # M = 1000 (cpu only)
]


def _fm_inputs(case, dtype, seed=0, device="cpu"):
    m, k, E, H, I, kind = case
    w13, w2 = moe_weights(E, H, I, dtype, seed=seed)
    x = (torch.randn(m, H, generator=torch.Generator().manual_seed(seed + 1)) * 0.1).to(dtype)
    tw, ids = routing(m, k, E, kind=kind, seed=seed + 2)
    return tuple(t.to(device) for t in (x, w13, w2, tw, ids))


@pytest.mark.parametrize("backend", _backends("fused_moe"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", FM_CASES + FM_CPU_CASES, ids=lambda c: f"M{c[0]}-{c[5]}")
def test_fused_moe_backend_equals_reference(backend, dtype, case):
    if _interp(backend):
        if dtype == torch.bfloat16:
            pytest.skip("the Triton interpreter gets bf16 wrong (triton #4972)")
        if case in FM_CPU_CASES:
            pytest.skip("too slow for the Triton interpreter")
    inputs = _fm_inputs(case, dtype)
    want = ref.fused_moe(*inputs)
    dev = backend_device(backend)
    got = dk.fused_moe(*(t.to(dev) for t in inputs), backend=backend).cpu()
    assert got.dtype == dtype and got.shape == want.shape
    assert rel_err(got, want) <= TOL[dtype], rel_err(got, want)
    dead = (inputs[4] < 0).all(1)
    assert (got[dead] == 0).all()


@pytest.mark.parametrize("backend", ["reference"] + _backends("fused_moe"))
def test_fused_moe_noncontiguous_x_and_int64_ids(backend):
    case = (8, 2, 6, 64, 32, "pad")
    x, w13, w2, tw, ids = _fm_inputs(case, torch.float32, seed=9)
    want = ref.fused_moe(x, w13, w2, tw, ids)
    dev = backend_device(backend)
    x_wide = torch.full((8, 3 * 64), float("nan"))
    x_wide[:, ::3] = x
    tw_t = tw.t().contiguous().t()  # column-major weights
    got = dk.fused_moe(x_wide[:, ::3].to(dev), w13.to(dev), w2.to(dev), tw_t.to(dev), ids.long().to(dev),
                       backend=backend).cpu()
    assert rel_err(got, want) <= 1e-5


@pytest.mark.skipif("triton" not in _backends("fused_moe"), reason="needs triton")
def test_fused_moe_triton_reductions_chunks_and_determinism():
    from dspark_kernels.triton.fused_moe import fused_moe as triton_fused_moe

    dev = backend_device("triton")
    inputs = _fm_inputs((6, 2, 4, 48, 24, "pad"), torch.float32, seed=11, device=dev)
    want = ref.fused_moe(*(t.cpu() for t in inputs))
    ordered = triton_fused_moe(*inputs)
    assert torch.equal(ordered, triton_fused_moe(*inputs))  # bitwise deterministic
    assert torch.equal(ordered, triton_fused_moe(*inputs, chunk_tokens=3))  # chunks change nothing
    assert rel_err(triton_fused_moe(*inputs, reduce="atomic", chunk_tokens=5), want) <= 1e-5
    cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=1, num_stages=1)
    assert rel_err(triton_fused_moe(*inputs, config=cfg), want) <= 1e-5


# --------------------------------------------------------------------------- the two Triton schedules

# tiles small enough that every case has more (row block, N tile) pairs than the
# interpreter's persistent programs, so each program loops
SCHEDULE_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1)


@pytest.mark.skipif("triton" not in _backends("fused_moe"), reason="needs triton")
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", FM_CASES, ids=lambda c: f"M{c[0]}-{c[5]}")
def test_fused_moe_triton_schedules_equal_reference(case, dtype, persistent):
    from dspark_kernels.triton.fused_moe import fused_moe as triton_fused_moe

    dev = backend_device("triton")
    inputs = _fm_inputs(case, dtype, seed=13, device=dev)
    want = ref.fused_moe(*(t.cpu() for t in inputs))
    got = triton_fused_moe(*inputs, config=dict(SCHEDULE_CFG, persistent=persistent))
    assert got.dtype == dtype and rel_err(got, want) <= TOL[dtype], rel_err(got, want)
    assert (got.cpu()[(inputs[4].cpu() < 0).all(1)] == 0).all()
    if _interp("triton"):  # the same tiles in another order: the same bits
        other = triton_fused_moe(*inputs, config=dict(SCHEDULE_CFG, persistent=not persistent))
        assert torch.equal(got, other)


@pytest.mark.skipif("triton" not in _backends("fused_moe"), reason="needs triton")
@pytest.mark.parametrize("programs", [1, 2, 40])
def test_persistent_schedule_any_number_of_programs(monkeypatch, programs):
    """One program doing every tile, a few looping, more programs than tiles (most find none);
    with chunks (a new num_tokens_post_pad per chunk), atomics and nothing routed."""
    from dspark_kernels.triton import _moe_common
    from dspark_kernels.triton import grouped_gemm as gg
    from dspark_kernels.triton.fused_moe import fused_moe as triton_fused_moe

    # every MoE Triton wrapper sizes its persistent grid through _moe_common.gemm_grid
    monkeypatch.setattr(_moe_common, "persistent_programs", lambda work, *a, **k: programs)
    dev = backend_device("triton")
    cfg = dict(SCHEDULE_CFG, persistent=True)
    inputs = _fm_inputs((8, 3, 5, 48, 40, "pad"), torch.float32, seed=14, device=dev)
    want = ref.fused_moe(*(t.cpu() for t in inputs))
    assert rel_err(triton_fused_moe(*inputs, config=cfg), want) <= 1e-5
    assert rel_err(triton_fused_moe(*inputs, config=cfg, chunk_tokens=3), want) <= 1e-5
    assert rel_err(triton_fused_moe(*inputs, config=cfg, reduce="atomic"), want) <= 1e-5
    nothing = torch.full_like(inputs[4], -1)
    out = triton_fused_moe(inputs[0], inputs[1], inputs[2], inputs[3], nothing, config=cfg)
    assert (out == 0).all()
    a, w = inputs[0], inputs[1][:, :24]
    offs = torch.tensor([0, 3, 3, 5, 5, 7], dtype=torch.int32, device=dev)
    got = gg.grouped_gemm(a, w, offs, config=cfg)
    assert rel_err(got, ref.grouped_gemm(a.cpu(), w.cpu(), offs.cpu())) <= 1e-5


@pytest.mark.skipif("triton" not in _backends("grouped_gemm"), reason="needs triton")
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", GG_CASES, ids=lambda c: f"T{c[0]}")
def test_grouped_gemm_triton_schedules_equal_reference(case, dtype, persistent):
    """Both schedules into an output poisoned with NaN: every element written (tail rows 0)."""
    from dspark_kernels.triton.grouped_gemm import grouped_gemm_out as triton_grouped_gemm_out

    T, K, N, offs = case
    g = torch.Generator().manual_seed(T + 1)
    a = (torch.randn(T, K, generator=g) * 0.1).to(dtype)
    w = (torch.randn(len(offs) - 1, N, K, generator=g) * 0.1).to(dtype)
    offs = torch.tensor(offs, dtype=torch.int32)
    want = ref.grouped_gemm(a, w, offs)
    dev = backend_device("triton")
    out = torch.full((T, N), float("nan"), dtype=dtype, device=dev)
    triton_grouped_gemm_out(a.to(dev), w.to(dev), offs.to(dev), out, config=dict(SCHEDULE_CFG, persistent=persistent))
    assert not torch.isnan(out).any() and rel_err(out, want) <= TOL[dtype]


def test_schedule_heuristic_and_config_key(tmp_path, monkeypatch):
    from dspark_kernels.triton import _moe_common as common
    from dspark_kernels.triton.fused_moe import default_candidates

    assert common.prefers_persistent(8 * 8 / 256)            # DeepSeek-V3, 8 verify tokens
    assert common.prefers_persistent(64 * 8 / 256)
    assert not common.prefers_persistent(4096 * 8 / 256)
    base = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    assert common.check_config(base, "t") == base                     # absent: the heuristic decides
    assert common.check_config(dict(base, persistent=True), "t")["persistent"] is True
    with pytest.raises(ValueError, match="persistent"):
        common.check_config(dict(base, persistent="yes"), "t")
    monkeypatch.setenv("DSPARK_MOE_CONFIG_DIR", str(tmp_path))
    path = tmp_path / common.config_file_name(8, 32, 64, torch.bfloat16, "dev")
    common.write_tuned(str(path), {8: dict(base, persistent=True), 256: dict(base, persistent=False)})
    assert common.tuned_config(8, 8, 64, 32, torch.bfloat16, device="dev") == dict(base, persistent=True)
    assert common.tuned_config(300, 8, 64, 32, torch.bfloat16, device="dev")["persistent"] is False
    cands = default_candidates(torch.bfloat16)
    assert {c["persistent"] for c in cands if c["BLOCK_M"] == 16} == {False, True}
    if common.interpreting():
        assert common.persistent_programs(0, base, 2) == 1
        assert common.persistent_programs(100, base, 2) == common.INTERPRETER_PROGRAMS


@pytest.mark.parametrize("backend", ["reference"] + _backends("fused_moe"))
def test_fused_moe_no_tokens_and_nothing_routed(backend):
    dev = backend_device(backend)
    w13, w2 = moe_weights(4, 32, 16, device=dev)
    empty = dk.fused_moe(torch.zeros(0, 32, device=dev), w13, w2, torch.zeros(0, 2, device=dev),
                         torch.zeros(0, 2, dtype=torch.int32, device=dev), backend=backend)
    assert empty.shape == (0, 32)
    out = dk.fused_moe(torch.randn(3, 32, device=dev), w13, w2, torch.rand(3, 2, device=dev),
                       torch.full((3, 2), -1, dtype=torch.int32, device=dev), backend=backend)
    assert (out == 0).all()


def test_fused_moe_cpu_past_37k_tokens():
    """M > 37k (the size where 32-bit row offsets overflowed in vLLM at DeepSeek widths), memory-light."""
    if "cpu" not in _backends("fused_moe"):
        pytest.skip("no cpu backend")
    case = (40000, 2, 8, 16, 8, "pad")
    inputs = _fm_inputs(case, torch.float32, seed=12)
    got = dk.fused_moe(*inputs, backend="cpu")
    want = ref.fused_moe(*inputs)
    assert rel_err(got, want) <= 1e-5
    s, e, n = dk.moe_align(inputs[4], 8, 16, backend="cpu")
    ps, pe, pn = python_align(inputs[4], 8, 16)
    assert s.tolist() == ps and e.tolist() == pe and n.tolist() == [pn]


# --------------------------------------------------------------------------- bad inputs


def _good_fm():
    return list(_fm_inputs((4, 2, 3, 16, 8, "uniform"), torch.float32)), {}


FM_BAD = [
    ("x", lambda a, k: a.__setitem__(0, a[0].to(torch.int32))),
    ("x", lambda a, k: a.__setitem__(0, a[0][None])),
    ("w13", lambda a, k: a.__setitem__(1, a[1][:, :-1])),          # 2I odd
    ("w13", lambda a, k: a.__setitem__(1, a[1][:, :, :-1])),       # H mismatch
    ("w13", lambda a, k: a.__setitem__(1, a[1].half())),
    ("w2", lambda a, k: a.__setitem__(2, a[2][:, :, :-1])),
    ("w2", lambda a, k: a.__setitem__(2, a[2][:-1])),
    ("topk_ids", lambda a, k: a.__setitem__(4, a[4].float())),
    ("topk_ids", lambda a, k: a.__setitem__(4, a[4][:-1])),
    ("topk_weights", lambda a, k: a.__setitem__(3, a[3][:, :1])),
    ("topk_weights", lambda a, k: a.__setitem__(3, a[3].long())),
    ("activation", lambda a, k: k.update(activation="gelu")),
]
FM_BAD_DATA = [  # data-dependent: checked on CPU (and on CUDA under DSPARK_DEBUG=1)
    ("topk_ids", lambda a, k: a[4].__setitem__((1, 1), 3)),        # id = E
    ("topk_ids", lambda a, k: a[4].__setitem__((0, 0), -2)),
]


@pytest.mark.parametrize("backend", ["reference"] + _backends("fused_moe"))
@pytest.mark.parametrize("name,mutate", FM_BAD + FM_BAD_DATA)
def test_fused_moe_bad_input_names_the_argument(backend, name, mutate):
    if backend_device(backend) != "cpu" and (name, mutate) in FM_BAD_DATA:
        pytest.skip("data checks run on CPU")
    args, kwargs = _good_fm()
    mutate(args, kwargs)
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.fused_moe(*args, **kwargs, backend=backend)


GG_BAD = [
    ("a", lambda a: a.__setitem__(0, a[0][0])),
    ("w", lambda a: a.__setitem__(1, a[1].half())),
    ("w", lambda a: a.__setitem__(1, a[1][:, :, :-1])),
    ("expert_offsets", lambda a: a.__setitem__(2, a[2][:-1])),
    ("expert_offsets", lambda a: a.__setitem__(2, a[2].float())),
    ("expert_offsets", lambda a: a.__setitem__(2, torch.tensor([0, 4, 2, 6], dtype=torch.int32))),
    ("expert_offsets", lambda a: a.__setitem__(2, torch.tensor([0, 4, 4, 9], dtype=torch.int32))),
    ("expert_offsets", lambda a: a.__setitem__(2, torch.tensor([1, 4, 4, 6], dtype=torch.int32))),
]


def _cpu_backends(op):
    return ["reference"] + [b for b in _backends(op) if backend_device(b) == "cpu"]


@pytest.mark.parametrize("backend", _cpu_backends("grouped_gemm"))
@pytest.mark.parametrize("name,mutate", GG_BAD)
def test_grouped_gemm_bad_input_names_the_argument(backend, name, mutate):
    args = [torch.randn(8, 6), torch.randn(3, 5, 6), torch.tensor([0, 2, 2, 6], dtype=torch.int32)]
    mutate(args)
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.grouped_gemm(*args, backend=backend)
    for bad_out in (torch.empty(8, 4), torch.empty(8, 5, dtype=torch.float16)):
        with pytest.raises(ValueError, match="out"):
            dk.grouped_gemm(torch.randn(8, 6), torch.randn(3, 5, 6), torch.tensor([0, 2, 2, 6]), out=bad_out,
                            backend=backend)


@pytest.mark.parametrize("backend", _cpu_backends("moe_align"))
def test_moe_align_bad_inputs_name_the_argument(backend):
    ids = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    for name, call in [
        ("topk_ids", lambda: dk.moe_align(ids.float(), 3, 16, backend=backend)),
        ("topk_ids", lambda: dk.moe_align(ids[0], 3, 16, backend=backend)),
        ("num_experts", lambda: dk.moe_align(ids, 0, 16, backend=backend)),
        ("block_m", lambda: dk.moe_align(ids, 3, 0, backend=backend)),
        ("topk_ids", lambda: dk.moe_align(ids, 2, 16, backend=backend)),                   # id 2 >= E
        ("topk_ids", lambda: dk.moe_align(ids - 1, 3, 16, backend=backend)),               # id -2
    ]:
        with pytest.raises((ValueError, RuntimeError), match=name):
            call()


def test_direct_op_calls_check_arguments():
    args, _ = _good_fm()
    with pytest.raises((ValueError, RuntimeError), match="w2"):
        torch.ops.dspark.fused_moe(args[0], args[1], args[2][:, :-1], args[3], args[4])
    with pytest.raises((ValueError, RuntimeError), match="topk_ids"):
        torch.ops.dspark.moe_align(args[4].float(), 3, 16)
    with pytest.raises((ValueError, RuntimeError), match="out"):
        torch.ops.dspark.grouped_gemm_out(torch.randn(4, 6), torch.randn(2, 5, 6), torch.tensor([0, 1, 4]),
                                          out=torch.empty(4, 6))


# --------------------------------------------------------------------------- compiler, opcheck, backends


def test_backends_lists_the_moe_ops():
    for op in ("moe_align", "grouped_gemm", "fused_moe"):
        avail = dk.backends(op)
        assert avail["reference"] and avail["cpu"] and not avail["cuda"]


def test_opcheck():
    x, w13, w2, tw, ids = _fm_inputs((6, 2, 4, 16, 8, "pad"), torch.float32, seed=20)
    torch.library.opcheck(torch.ops.dspark.fused_moe.default, (x, w13, w2, tw, ids), {"activation": "silu"})
    torch.library.opcheck(torch.ops.dspark.moe_align.default, (ids, 4, 16))
    a, w, offs = torch.randn(7, 16), torch.randn(3, 8, 16), torch.tensor([0, 2, 2, 6], dtype=torch.int32)
    torch.library.opcheck(torch.ops.dspark.grouped_gemm.default, (a, w, offs))
    torch.library.opcheck(torch.ops.dspark.grouped_gemm_out.default, (a, w, offs), {"out": torch.empty(7, 8)})


def test_torch_compile_fullgraph():
    x, w13, w2, tw, ids = _fm_inputs((5, 2, 4, 16, 8, "pad"), torch.float32, seed=21)

    def layer(x, w13, w2, tw, ids):
        s, e, n = dk.moe_align(ids, 4, 16)
        y = dk.fused_moe(x, w13, w2, tw, ids)
        return y, s, e, n

    eager = layer(x, w13, w2, tw, ids)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, w13, w2, tw, ids)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


# --------------------------------------------------------------------------- configs and the tuner


def test_tuned_config_file_is_read_by_nearest_m(tmp_path, monkeypatch):
    from dspark_kernels.triton import _moe_common as common

    monkeypatch.setenv("DSPARK_MOE_CONFIG_DIR", str(tmp_path))
    cfg_a = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    cfg_b = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    path = tmp_path / common.config_file_name(8, 32, 64, torch.bfloat16, "dev")
    common.write_tuned(str(path), {8: cfg_a, 256: cfg_b})
    assert json.loads(path.read_text())["8"] == cfg_a
    assert common.tuned_config(24, 8, 64, 32, torch.bfloat16, device="dev") == cfg_a   # M = 3·(7+1)
    assert common.tuned_config(200, 8, 64, 32, torch.bfloat16, device="dev") == cfg_b
    assert common.tuned_config(24, 8, 64, 32, torch.float16, device="dev") is None


def test_heuristic_covers_non_power_of_two_m():
    from dspark_kernels.triton import _moe_common as common

    for m in (1, 8, 24, 40, 56, 1000, 4096, 65536):
        cfg = common.heuristic_config(m, 256, 7168, 2048, 8, torch.bfloat16)
        common.check_config(cfg, "test")
        per_stage = (cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"]) * 2
        assert per_stage * cfg["num_stages"] <= common.SMEM_BUDGET
    if not common.interpreting():
        assert common.heuristic_config(8, 256, 7168, 2048, 8, torch.bfloat16)["BLOCK_M"] == 16


@pytest.mark.skipif("triton" not in _backends("fused_moe"), reason="needs triton")
def test_tuner_writes_the_file_the_heuristic_reads(tmp_path, monkeypatch):
    from dspark_kernels.triton import _moe_common as common
    from dspark_kernels.triton.fused_moe import tune

    cands = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=1, num_stages=1),
             dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1)]

    times = iter([1.0, 0.5, 1.0, 0.5])  # candidates are timed in order, per M: the second wins

    def timer(fn):
        fn()
        return next(times)

    monkeypatch.setenv("DSPARK_MOE_CONFIG_DIR", str(tmp_path))
    dev = backend_device("triton")
    path = tune(4, 32, 16, 2, torch.float32, batch_sizes=(1, 3), candidates=cands, out_dir=str(tmp_path),
                timer=timer, device=dev, log=lambda *a: None)
    table = json.loads(open(path).read())
    assert set(table) == {"1", "3"} and table["3"] == cands[1]
    name = common.device_name(dev)
    assert common.tuned_config(2, 4, 32, 16, torch.float32, device=name) is not None


# --------------------------------------------------------------------------- GPU compilation without a GPU


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    """Triton's full lowering to sm_90 cubins (bundled ptxas) at the heuristic's configs: no
    compile error, no register spill. Catches what the interpreter cannot (~40 s)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = Path(__file__).with_name("aot_compile_moe.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    if "No module named" in run.stderr or "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip(f"no Triton NVIDIA backend here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all compiled for sm_90" in run.stdout


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)

PRESETS = {  # (E, k, H, I)
    "deepseek-v3": (256, 8, 7168, 2048),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}


def _cuda_case(preset, m, kind="uniform", seed=0):
    E, k, H, I = PRESETS[preset]
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    x = (torch.randn(m, H, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    tw, ids = routing(m, k, E, kind=kind, seed=seed, device="cuda")
    return x, w13, w2, tw, ids


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset,m,kind", [
    ("deepseek-v3", 1, "uniform"), ("deepseek-v3", 8, "pad"), ("deepseek-v3", 40, "uniform"),
    ("qwen3-30b-a3b", 1, "uniform"), ("qwen3-30b-a3b", 8, "hot"), ("qwen3-30b-a3b", 64, "pad"),
    ("qwen3-30b-a3b", 1000, "uniform"),
])
def test_cuda_fused_moe_bf16_real_shapes(preset, m, kind):
    inputs = _cuda_case(preset, m, kind)
    want = ref.fused_moe(*inputs)
    got = dk.fused_moe(*inputs)  # default: torch.ops.dspark.fused_moe on the CUDA key (Triton)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) <= 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)
    from dspark_kernels.triton.fused_moe import fused_moe as triton_fused_moe

    assert torch.equal(got, triton_fused_moe(*inputs))  # deterministic
    assert rel_err(triton_fused_moe(*inputs, reduce="atomic"), want) <= 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset,m", [("deepseek-v3", 8), ("qwen3-30b-a3b", 64), ("qwen3-30b-a3b", 1000)])
def test_cuda_fused_moe_both_schedules(preset, m):
    """The persistent and the grid schedule at the heuristic's tiles, each against the reference."""
    from dspark_kernels.triton import _moe_common
    from dspark_kernels.triton.fused_moe import fused_moe as triton_fused_moe

    inputs = _cuda_case(preset, m, "pad")
    want = ref.fused_moe(*inputs)
    E, k, H, I = PRESETS[preset]
    cfg = _moe_common.heuristic_config(m, E, H, I, k, torch.bfloat16)
    outs = [triton_fused_moe(*inputs, config=dict(cfg, persistent=p)) for p in (False, True)]
    for got in outs:
        assert rel_err(got, want) <= 1e-2
    assert rel_err(outs[0], outs[1]) <= 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_moe_align_and_grouped_gemm():
    for m, k, E, bm in [(1, 8, 256, 16), (8, 8, 256, 16), (4096, 8, 256, 64), (40000, 2, 64, 128)]:
        ids = routing(m, k, E, kind="pad", seed=m)[1]
        ps, pe, pn = python_align(ids, E, bm)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the default CUDA path is Triton: no fallback warning
            s, e, n = dk.moe_align(ids.cuda(), E, bm)
        assert s.tolist() == ps and e.tolist() == pe and n.tolist() == [pn], (m, k, E, bm)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = (torch.randn(300, 7168, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    w = (torch.randn(16, 512, 7168, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    offs = torch.tensor([0, 0, 1, 40, 40, 40, 100, 101, 200, 200, 200, 250, 260, 290, 290, 295, 296],
                        dtype=torch.int32, device="cuda")
    got = dk.grouped_gemm(a, w, offs)
    assert rel_err(got, ref.grouped_gemm(a, w, offs)) <= 1e-2
    assert rel_err(dk.grouped_gemm(a, w.transpose(1, 2).contiguous().transpose(1, 2), offs), got) <= 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_fused_moe_large_m_past_int32_offsets():
    """M·k rows past 2^31 / H elements in the intermediate: 64-bit addressing."""
    from dspark_kernels.triton.fused_moe import fused_moe as triton_fused_moe

    E, k, H, I = 8, 2, 7168, 256
    m = 2**31 // (H * k) + 64
    inputs = _cuda_case_small(E, k, H, I, m)
    got = triton_fused_moe(*inputs, chunk_tokens=m)  # one chunk: the fp32 [M·k, H] buffer is past 2^31 elements
    rows = torch.tensor([0, m // 2, m - 1], device="cuda")
    want = ref.fused_moe(inputs[0][rows], inputs[1], inputs[2], inputs[3][rows], inputs[4][rows])
    assert rel_err(got[rows], want) <= 1e-2


def _cuda_case_small(E, k, H, I, m):
    g = torch.Generator(device="cuda").manual_seed(1)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    x = (torch.randn(m, H, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    tw, ids = routing(m, k, E, seed=2, device="cuda")
    return x, w13, w2, tw, ids


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay():
    x, w13, w2, tw, ids = _cuda_case("qwen3-30b-a3b", 8, "pad")
    want = dk.fused_moe(x, w13, w2, tw, ids)
    static = [t.clone() for t in (x, tw, ids)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dk.fused_moe(static[0], w13, w2, static[1], static[2])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dk.fused_moe(static[0], w13, w2, static[1], static[2])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    # new routing in the same buffers (including -1 rows): the replay follows it
    tw2, ids2 = routing(8, 8, 128, kind="hot", seed=5, device="cuda")
    static[1].copy_(tw2)
    static[2].copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, dk.fused_moe(x, w13, w2, tw2, ids2))


# --------------------------------------------------------------------------- the benchmark


def test_bench_moe_quick(tmp_path):
    from dspark_kernels.bench.__main__ import main

    js = tmp_path / "moe.json"
    assert main(["moe", "--quick", "--json", str(js), "--device", "cpu", "--quiet", "--max-time", "0.005",
                 "--threads", "1"]) == 0
    cases = json.loads(js.read_text())["cases"]
    assert {c["batch"] for c in cases} == {1, 8}
    ok = {c["backend"]: c for c in cases if c["status"] == "ok" and c["batch"] == 8}
    assert {"cpu", "reference"} <= set(ok)
    assert ok["cpu"]["correct"] is True and ok["cpu"]["speedup_vs_reference"] > 0
    assert ok["cpu"]["bytes"] > 0 and 1 <= ok["cpu"]["experts_touched"] <= 16 and ok["cpu"]["tflops"] > 0
    assert all(c["status"] == "skipped" for c in cases if c["backend"] == "triton")
