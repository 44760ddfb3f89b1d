"""schedule_verify_lens: every backend against a plain-Python Algorithm 1 (written here,
independently of dspark_kernels.reference), ties, zeros/ones, caps, both modes, bad
inputs, opcheck and torch.compile (docs/drafting.md)."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import backend_device

import dspark_kernels as dk

BACKENDS = [b for b, ok in dk.backends("schedule_verify_lens").items() if ok]  # reference first


# --------------------------------------------------------------------------
# The oracle: Algorithm 1 as the paper writes it, with the documented arithmetic
# (fp32 survival, survival counted in units of 2^-40, fp64 Theta).


def oracle(confidence, sps, early_stop=True, exact=False):
    """verify_lens by the book. ``exact=True`` sums the survivals as exact rationals
    instead of 2^-40 fixed point (the two agree unless Theta values tie to ~1e-12)."""
    conf = np.asarray(confidence, dtype=np.float32)
    num_req, gamma = conf.shape
    table = [float(x) for x in sps]
    bmax = len(table) - 1
    cands = []
    for r in range(num_req):
        a = np.float32(1.0)
        for j in range(gamma):
            c = conf[r, j]
            c = np.float32(min(float(c), 1.0)) if c > 0 else np.float32(0.0)  # NaN -> 0
            a = np.float32(a * c)
            cands.append((float(a), r, j))
    cands.sort(key=lambda t: (-t[0], t[1], t[2]))
    if exact:
        tau = Fraction(num_req)
    else:
        tau = num_req * 2**40
    best = float(tau) * table[num_req]
    best_k = 0
    for k in range(1, min(len(cands), bmax - num_req) + 1):
        a = cands[k - 1][0]
        tau += Fraction(a) if exact else int(a * 2**40)
        theta = float(tau) * table[num_req + k]
        if theta > best:
            best, best_k = theta, k
        elif early_stop:
            break
    lens = [0] * num_req
    for _, r, j in cands[:best_k]:
        assert j == lens[r], "admitted candidates must be a prefix of each block"
        lens[r] += 1
    return lens


def run(backend, confidence, sps, early_stop=True):
    device = backend_device(backend) if backend != "reference" else "cpu"
    lens, cu = dk.schedule_verify_lens(confidence.to(device), sps.to(device), early_stop=early_stop,
                                       backend=backend)
    assert lens.dtype == torch.int32 and cu.dtype == torch.int32
    assert lens.device.type == device and cu.device.type == device
    lens, cu = lens.cpu(), cu.cpu()
    assert cu.shape == (lens.shape[0] + 1,) and int(cu[0]) == 0
    assert torch.equal(cu[1:], torch.cumsum(lens, 0).to(torch.int32))
    return lens.tolist()


def sps_table(bmax, kind, rng):
    """Profiled-looking steps-per-second tables (jagged: noise, plateaus, steps)."""
    b = np.arange(bmax + 1, dtype=np.float64)
    if kind == "flat-then-drop":  # memory bound up to a knee, then compute bound
        knee = rng.randint(4, max(5, bmax // 2))
        t = np.where(b <= knee, 1.0, b / knee)
    elif kind == "linear":
        t = 1.0 + b * rng.uniform(0.005, 0.2)
    elif kind == "no-speculation":  # any extra token costs more than it can return
        t = 1.0 + b * 10.0
    else:  # jagged: steps at tile sizes plus noise
        t = 1.0 + 0.3 * np.floor(b / rng.choice([8, 16, 32])) + np.array([rng.uniform(0, 0.05) for _ in b])
    return torch.tensor(100.0 / t, dtype=torch.float32)


def random_confidence(num_req, gamma, rng, kind="uniform"):
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    if kind == "uniform":
        return torch.rand(num_req, gamma, generator=g)
    if kind == "high":
        return 1 - torch.rand(num_req, gamma, generator=g) ** 3 * 0.5
    if kind == "ties":  # few distinct values: many equal survivals across requests
        return torch.tensor([0.5, 0.8, 1.0, 0.9])[torch.randint(0, 4, (num_req, gamma), generator=g)]
    if kind == "zeros-ones":
        return torch.tensor([0.0, 1.0, 0.7])[torch.randint(0, 3, (num_req, gamma), generator=g)]
    raise ValueError(kind)


# --------------------------------------------------------------------------
# The oracle's own sanity: fixed point vs exact rationals on random inputs


def test_fixed_point_tau_matches_exact_rationals():
    rng = random.Random(1)
    for _ in range(60):
        num_req, gamma = rng.randint(1, 12), rng.randint(1, 8)
        conf = random_confidence(num_req, gamma, rng, rng.choice(["uniform", "high"]))
        sps = sps_table(num_req * gamma + rng.randint(0, 10), rng.choice(["flat-then-drop", "linear", "jagged"]), rng)
        for early in (True, False):
            assert oracle(conf, sps, early) == oracle(conf, sps, early, exact=True)


# --------------------------------------------------------------------------
# Every backend against the oracle


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("early_stop", [True, False])
def test_random_against_oracle(backend, early_stop):
    rng = random.Random(7 + early_stop)
    cases = 30 if backend == "triton" and backend_device(backend) == "cpu" else 120
    for case in range(cases):
        num_req = rng.choice([1, 2, 3, 5, 8, 17, 40])
        gamma = rng.choice([1, 2, 5, 7, 15])
        kind = rng.choice(["uniform", "high", "ties", "zeros-ones"])
        conf = random_confidence(num_req, gamma, rng, kind)
        bmax = num_req + rng.choice([0, 1, 3, num_req * gamma // 2, num_req * gamma, num_req * gamma + 9])
        sps = sps_table(bmax, rng.choice(["flat-then-drop", "linear", "jagged", "no-speculation"]), rng)
        got = run(backend, conf, sps, early_stop)
        assert got == oracle(conf, sps, early_stop), (case, num_req, gamma, kind, bmax)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_are_broken_by_request_then_position(backend):
    # Every survival equal (c = 1): the order is r ascending then j ascending, so a
    # budget of 5 admissions fills request 0 (gamma = 3), then 2 of request 1.
    conf = torch.ones(3, 3)
    sps = torch.full((3 + 5 + 1,), 10.0)
    got = run(backend, conf, sps, early_stop=True)
    assert got == [3, 2, 0]
    # Equal survivals across requests at different positions: 0.5 (r=1, j=0) ties
    # with 0.5 (r=0, j=1 after 1.0); r ascending puts request 0's first.
    conf = torch.tensor([[1.0, 0.5, 0.5], [0.5, 1.0, 0.1]])
    # a = [1, .5, .25 | .5, .5, .05]; order (0,0) (0,1) (1,0) (1,1) (0,2) (1,2).
    sps = torch.tensor([0, 0, 10.0, 10.0, 10.0, 10.0, 0.0])  # best at B = 5: three admitted
    for early in (True, False):
        assert run(backend, conf, sps, early) == oracle(conf, sps, early) == [2, 1]
    sps = torch.tensor([0, 0, 10.0, 10.0, 10.0, 0.0, 0.0])  # best at B = 4: the tie goes to request 0
    for early in (True, False):
        assert run(backend, conf, sps, early) == oracle(conf, sps, early) == [2, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_shapes(backend):
    # R = 1, gamma = 1
    assert run(backend, torch.tensor([[0.9]]), torch.tensor([0.0, 10.0, 9.0])) == [1]
    assert run(backend, torch.tensor([[0.05]]), torch.tensor([0.0, 10.0, 9.0])) == [0]
    # R = 0 and gamma = 0
    assert run(backend, torch.zeros(0, 4), torch.tensor([1.0, 2.0])) == []
    assert run(backend, torch.zeros(3, 0), torch.ones(8)) == [0, 0, 0]
    # Bmax = R: no room for any draft
    assert run(backend, torch.ones(4, 5), torch.ones(5)) == [0, 0, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_speculation_table_and_cap(backend):
    conf = torch.full((6, 5), 0.99)
    # Every extra token halves the rate: verify nothing.
    sps = 100.0 / 2.0 ** torch.arange(40, dtype=torch.float32)
    assert run(backend, conf, sps) == [0] * 6
    # Constant rate: admitting anything of positive survival improves; the cap binds.
    sps = torch.full((6 + 10 + 1,), 50.0)
    got = run(backend, conf, sps)
    assert sum(got) == 10 and got == oracle(conf, sps)
    assert got == [2, 2, 2, 2, 1, 1]  # ties: lower requests first, one level at a time


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_confidence_never_helps_a_flat_table(backend):
    conf = torch.tensor([[0.9, 0.0, 0.8], [0.0, 0.9, 0.9]])
    sps = torch.full((2 + 6 + 1,), 7.0)
    # Lossless: admitting a survival of 0 with an unchanged rate does not improve: stop.
    assert run(backend, conf, sps, True) == [1, 0]
    assert run(backend, conf, sps, False) == [1, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_mode_looks_past_a_dip(backend):
    # Lossless stops at the first non-improvement; async finds the later, larger optimum.
    conf = torch.tensor([[0.95, 0.95, 0.95, 0.95, 0.95]])
    sps = torch.tensor([0.0, 10.0, 9.0, 5.0, 5.0, 5.0, 5.0])  # Theta: 10, 17.6, 14.3, ..., 26.5
    lossless = run(backend, conf, sps, True)
    asynchronous = run(backend, conf, sps, False)
    assert lossless == oracle(conf, sps, True) and asynchronous == oracle(conf, sps, False)
    assert lossless == [1] and asynchronous == [5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_out_of_range_confidence(backend):
    conf = torch.tensor([[float("nan"), 0.9], [1.5, -0.2], [0.9, 2.0]])
    sps = torch.full((3 + 6 + 1,), 5.0)
    sps[4:] = torch.linspace(5.5, 6.0, 6)
    for early in (True, False):
        assert run(backend, conf, sps, early) == oracle(conf, sps, early)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_dtypes_and_strides(backend, dtype):
    rng = random.Random(3)
    conf = random_confidence(9, 7, rng).to(dtype)
    sps = sps_table(9 * 7 + 3, "jagged", rng).to(torch.float64 if dtype == torch.float16 else torch.float32)
    wide = torch.zeros(7, 30, dtype=dtype)
    wide[:, :9] = conf.t()
    strided = wide[:, :9].t()  # stride (1, 30)
    for early in (True, False):
        expect = oracle(conf.float(), sps, early)
        assert run(backend, conf, sps, early) == expect
        assert run(backend, strided, sps, early) == expect


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_larger_batches_against_reference(backend):
    rng = random.Random(11)
    sizes = [(64, 7), (130, 5)] if backend_device(backend) == "cpu" and backend == "triton" else [
        (128, 7), (512, 15), (300, 5)]
    for num_req, gamma in sizes:
        conf = random_confidence(num_req, gamma, rng, "high")
        for bmax in (num_req + 3, num_req * 2, num_req * (gamma + 1)):
            sps = sps_table(bmax, "flat-then-drop", rng)
            for early in (True, False):
                ref = dk.schedule_verify_lens(conf, sps, early_stop=early, backend="reference")
                assert run(backend, conf, sps, early) == ref[0].tolist()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_triton_small_tiles(backend):
    """Many candidate tiles (the cross-tile merges) on a small problem."""
    from dspark_kernels.triton.schedule_verify_lens import schedule_verify_lens as triton_schedule

    rng = random.Random(5)
    device = backend_device(backend)
    for case in range(12):
        num_req, gamma = rng.randint(1, 20), rng.randint(1, 9)
        conf = random_confidence(num_req, gamma, rng, rng.choice(["uniform", "ties", "zeros-ones"]))
        sps = sps_table(num_req * gamma + rng.randint(0, 4), rng.choice(["jagged", "linear"]), rng)
        for early in (True, False):
            lens, cu = triton_schedule(conf.to(device), sps.to(device), early, _block=16)
            assert lens.cpu().tolist() == oracle(conf, sps, early), case


# --------------------------------------------------------------------------
# Bad inputs, opcheck, compile


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,conf,sps", [
    ("confidence", torch.rand(3), torch.ones(10)),
    ("confidence", torch.ones(3, 2, dtype=torch.int32), torch.ones(10)),
    ("sps", torch.rand(3, 2), torch.ones(10, 1)),
    ("sps", torch.rand(3, 2), torch.ones(10, dtype=torch.int64)),
    ("sps", torch.rand(3, 2), torch.ones(3)),  # Bmax < R
])
def test_bad_input_names_the_argument(backend, name, conf, sps):
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.schedule_verify_lens(conf, sps, backend=backend)


def test_direct_op_call_checks_arguments():
    if not dk.backends("schedule_verify_lens")["cpu"]:
        pytest.skip("cpu backend not built")
    with pytest.raises(RuntimeError, match="sps"):
        torch.ops.dspark.schedule_verify_lens(torch.rand(4, 3), torch.ones(4))


def test_opcheck():
    conf = torch.rand(5, 4)
    sps = torch.linspace(10, 5, 30)
    torch.library.opcheck(torch.ops.dspark.schedule_verify_lens.default, (conf, sps), {"early_stop": True})
    torch.library.opcheck(torch.ops.dspark.schedule_verify_lens.default, (conf, sps), {"early_stop": False})


def test_torch_compile_fullgraph():
    if not dk.backends("schedule_verify_lens")["cpu"]:
        pytest.skip("cpu backend not built (the reference is not traceable)")
    conf = torch.rand(6, 5)
    sps = torch.linspace(10, 4, 40)

    def step(c, s):
        lens, cu = dk.schedule_verify_lens(c, s)
        return lens * 2, cu

    eager = step(conf, sps)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(conf, sps)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


def test_bench_schedule_quick(tmp_path):
    """`dspark-bench schedule --quick` runs, checks every backend and writes JSON."""
    import json

    from dspark_kernels.bench.__main__ import main

    js = tmp_path / "schedule.json"
    rc = main(["schedule", "--quick", "--json", str(js), "--device", "cpu", "--quiet", "--max-time", "0.005",
               "--threads", "1"])
    assert rc == 0
    cases = json.loads(js.read_text())["cases"]
    assert {c["mode"] for c in cases} == {"lossless", "async"} and {c["batch"] for c in cases} == {1, 16}
    for c in cases:
        assert c["status"] in ("ok", "skipped", "n/a"), c
        assert c["correct"] is not False, c
    assert any(c["backend"] == "reference" and c["status"] == "ok" for c in cases)


# --------------------------------------------------------------------------
# On a GPU (bench/gpu_check.sh runs `-m cuda`)

GPU_BACKENDS = [b for b in ("cuda", "nvrtc", "triton") if b in BACKENDS]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_equals_oracle_and_captures_in_a_cuda_graph(backend):
    rng = random.Random(77)
    for case in range(40):
        num_req, gamma = rng.choice([1, 3, 17, 128, 512]), rng.choice([1, 5, 7, 15])
        conf = random_confidence(num_req, gamma, rng, rng.choice(["uniform", "high", "ties", "zeros-ones"]))
        sps = sps_table(num_req + rng.randint(0, num_req * gamma + 3), rng.choice(["flat-then-drop", "jagged"]), rng)
        for early in (True, False):
            lens, cu = dk.schedule_verify_lens(conf.cuda(), sps.cuda(), early_stop=early, backend=backend)
            ref = dk.schedule_verify_lens(conf, sps, early_stop=early, backend="cpu" if "cpu" in BACKENDS
                                          else "reference")
            assert torch.equal(lens.cpu(), ref[0]) and torch.equal(cu.cpu(), ref[1]), (case, num_req, gamma)
    # CUDA graph: capture once, replay on new confidences (no host sync inside).
    conf = random_confidence(64, 7, rng, "high").cuda()
    sps = sps_table(64 * 8, "flat-then-drop", rng).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dk.schedule_verify_lens(conf, sps, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lens, cu = dk.schedule_verify_lens(conf, sps, backend=backend)
    for _ in range(3):
        new = random_confidence(64, 7, rng, "high")
        conf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert lens.cpu().tolist() == oracle(new, sps.cpu(), True)
