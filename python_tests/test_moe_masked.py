"""grouped_gemm_masked (the expert-parallel layout): the reference against an fp64 row loop,
every backend against the reference, NaN padding rows that must never be read, zero
output padding, clamping in the kernels, bad inputs, opcheck, torch.compile, and CUDA
tests at real shapes (docs/moe.md, docs/correctness.md).

The Triton interpreter is slow and gets bf16 wrong: Triton cases on the CPU use fp32 /
fp16 and small shapes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_device
from test_moe import TOL, rel_err

import dspark_kernels as dk
from dspark_kernels.reference import moe as ref

CUDA = torch.cuda.is_available()
OP = "grouped_gemm_masked"


def _backends() -> list[str]:
    return [b for b, ok in dk.backends(OP).items() if ok and b != "reference"]


def _interp(backend: str) -> bool:
    return backend == "triton" and backend_device(backend) == "cpu"


def masked_inputs(E, max_m, K, N, masked_m, dtype=torch.float32, seed=0, device="cpu", counts_dtype=torch.int32):
    """(a [E, max_m, K] with NaN in every padding row, w [E, N, K], masked_m [E]): a stray
    read of a padding row turns an output NaN."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(E, max_m, K, generator=g) * 0.1
    for e, m in enumerate(masked_m):
        a[e, m:] = float("nan")
    w = torch.randn(E, N, K, generator=g) * 0.1
    counts = torch.tensor(masked_m, dtype=counts_dtype)
    return a.to(dtype).to(device), w.to(dtype).to(device), counts.to(device)


def naive_masked(a, w, masked_m):
    """fp64, one row at a time: the formula of the docstring, written out."""
    E, max_m, _ = a.shape
    out = torch.zeros(E, max_m, w.shape[1], dtype=torch.float64)
    for e in range(E):
        for i in range(int(masked_m[e])):
            out[e, i] = w[e].double() @ a[e, i].double()
    return out


# (E, max_m, K, N, masked_m): 0, max_m and values in between, tile edges (16), odd sizes
CASES = [
    (4, 37, 48, 40, [0, 37, 5, 16]),
    (1, 7, 16, 16, [7]),                   # E = 1, every row present
    (1, 1, 32, 8, [1]),                    # one row
    (3, 129, 24, 33, [129, 1, 64]),        # max_m = 129: a partial last tile
    (2, 7, 129, 7, [3, 0]),                # K = 129, N = 7
    (5, 16, 16, 16, [0, 0, 0, 0, 0]),      # no token anywhere: all zeros
]


def test_reference_matches_row_loop():
    a, w, counts = masked_inputs(3, 9, 6, 5, [0, 9, 4], seed=1)
    got = ref.grouped_gemm_masked(a, w, counts)
    want = naive_masked(a, w, counts)
    assert not torch.isnan(got).any()
    assert torch.allclose(got.double(), want, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c[0]}-m{c[1]}-K{c[2]}-N{c[3]}")
def test_backend_equals_reference(backend, dtype, case):
    if dtype == torch.bfloat16 and _interp(backend):
        pytest.skip("the Triton interpreter gets bf16 wrong (triton #4972)")
    E, max_m, K, N, counts = case
    dev = backend_device(backend)
    a, w, masked_m = masked_inputs(E, max_m, K, N, counts, dtype, seed=max_m)
    want = ref.grouped_gemm_masked(a, w, masked_m)
    for counts_dtype in (torch.int32, torch.int64) if E == 4 else (torch.int32,):
        got = dk.grouped_gemm_masked(a.to(dev), w.to(dev), masked_m.to(counts_dtype).to(dev), backend=backend).cpu()
        assert got.dtype == dtype and got.shape == (E, max_m, N)
        assert not torch.isnan(got).any(), "a padding row of a was read"
        assert rel_err(got, want) <= TOL[dtype], rel_err(got, want)
        for e, m in enumerate(counts):
            assert (got[e, m:] == 0).all(), f"expert {e}: the output's padding rows must be zero"


@pytest.mark.parametrize("backend", ["reference"] + _backends())
def test_strided_inputs_and_int64_counts(backend):
    """a as a strided view, w as a transposed view of [E, K, N] storage, int64 masked_m."""
    E, max_m, K, N, counts = 3, 21, 40, 24, [21, 0, 9]
    dev = backend_device(backend)
    a, w, masked_m = masked_inputs(E, max_m, K, N, counts, seed=6, counts_dtype=torch.int64)
    want = ref.grouped_gemm_masked(a, w, masked_m)
    a_wide = torch.full((E, max_m, 2 * K), float("nan"))
    a_wide[:, :, ::2] = a
    w_kn = w.transpose(1, 2).contiguous()
    got = dk.grouped_gemm_masked(a_wide[:, :, ::2].to(dev), w_kn.to(dev).transpose(1, 2), masked_m.to(dev),
                                 backend=backend).cpu()
    assert rel_err(got, want) <= 1e-5 and not torch.isnan(got).any()


@pytest.mark.parametrize("backend", ["reference"] + _backends())
def test_experts_without_tokens_use_no_weight(backend):
    """An expert with masked_m = 0 has NaN weights and NaN rows: its output is exact zeros
    and nothing leaks into the others (a kernel that multiplied it would produce NaN)."""
    dev = backend_device(backend)
    a, w, masked_m = masked_inputs(3, 20, 16, 16, [5, 0, 20], seed=7)
    w[1] = float("nan")
    got = dk.grouped_gemm_masked(a.to(dev), w.to(dev), masked_m.to(dev), backend=backend).cpu()
    assert (got[1] == 0).all() and not torch.isnan(got).any()
    assert rel_err(got, naive_masked(a, w.nan_to_num(), masked_m)) <= 1e-5


@pytest.mark.skipif("triton" not in _backends(), reason="needs triton")
@pytest.mark.parametrize("cfg", [None, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)])
def test_triton_writes_every_output_element(cfg):
    """The output poisoned with NaN before the kernel: every element is written (the padding
    rows as zeros), at the default config and at one whose tiles cut rows, N and K."""
    from dspark_kernels.triton.grouped_gemm_masked import grouped_gemm_masked as triton_masked

    dev = backend_device("triton")
    a, w, masked_m = masked_inputs(4, 37, 48, 40, [0, 37, 5, 16], seed=8, device=dev)
    out = torch.full((4, 37, 40), float("nan"), device=dev)
    res = triton_masked(a, w, masked_m, config=cfg, out=out)
    assert res is out and not torch.isnan(out).any()
    assert rel_err(out, ref.grouped_gemm_masked(a.cpu(), w.cpu(), masked_m.cpu())) <= 1e-5


def test_kernels_clamp_counts_outside_the_range():
    """Counts past max_m (or negative) are an error at the wrapper; the kernels themselves
    clamp them to [0, max_m] and never read or write outside the tensors."""
    from dspark_kernels.cpu.grouped_gemm_masked import grouped_gemm_masked as torch_masked

    a, w, _ = masked_inputs(3, 9, 16, 8, [9, 9, 9], seed=9)
    wild = torch.tensor([50, -4, 2**40], dtype=torch.int64)
    want = ref.grouped_gemm_masked(a, w, torch.tensor([9, 0, 9]))
    assert torch.equal(ref.grouped_gemm_masked(a, w, wild), want)
    assert rel_err(torch_masked(a, w, wild), want) <= 1e-5
    if "triton" in _backends():
        from dspark_kernels.triton.grouped_gemm_masked import grouped_gemm_masked as triton_masked

        dev = backend_device("triton")
        got = triton_masked(a.to(dev), w.to(dev), wild.to(dev)).cpu()
        assert rel_err(got, want) <= 1e-5 and (got[1] == 0).all()


def test_empty_shapes():
    for E, max_m, K, N in [(0, 4, 8, 8), (2, 0, 8, 8), (2, 4, 8, 0), (2, 4, 0, 8)]:
        a, w, masked_m = torch.randn(E, max_m, K), torch.randn(E, N, K), torch.full((E,), min(max_m, 3))
        for backend in ["reference"] + [b for b in _backends() if backend_device(b) == "cpu"]:
            got = dk.grouped_gemm_masked(a, w, masked_m, backend=backend)
            assert got.shape == (E, max_m, N) and (got == 0).all(), (backend, E, max_m, K, N)


# --------------------------------------------------------------------------- bad inputs

BAD = [  # (argument named in the error, mutation of [a, w, masked_m])
    ("a", lambda x: x.__setitem__(0, x[0][0])),                           # 2-D
    ("a", lambda x: x.__setitem__(0, x[0].to(torch.int32))),
    ("w", lambda x: x.__setitem__(1, x[1].half())),                       # dtype mismatch
    ("w", lambda x: x.__setitem__(1, x[1][:-1])),                         # E mismatch
    ("w", lambda x: x.__setitem__(1, x[1][:, :, :-1])),                   # K mismatch
    ("w", lambda x: x.__setitem__(1, x[1][0])),                           # 2-D
    ("masked_m", lambda x: x.__setitem__(2, x[2][:-1])),                  # [E - 1]
    ("masked_m", lambda x: x.__setitem__(2, x[2].float())),
    ("masked_m", lambda x: x.__setitem__(2, x[2][None])),                 # 2-D
]
BAD_DATA = [  # data-dependent: checked on CPU (and on CUDA under DSPARK_DEBUG=1)
    ("masked_m", lambda x: x[2].__setitem__(1, 9)),                       # > max_m = 8
    ("masked_m", lambda x: x[2].__setitem__(0, -1)),
]


def _cpu_backends():
    return ["reference"] + [b for b in _backends() if backend_device(b) == "cpu"]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("name,mutate", BAD + BAD_DATA)
def test_bad_input_names_the_argument(backend, name, mutate):
    args = [torch.randn(3, 8, 6), torch.randn(3, 5, 6), torch.tensor([0, 8, 2], dtype=torch.int32)]
    mutate(args)
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.grouped_gemm_masked(*args, backend=backend)


def test_bad_count_error_says_what_and_where():
    with pytest.raises(ValueError, match=r"masked_m\[1\] = 9 is outside \[0, max_m\] with max_m = a.size\(1\) = 8"):
        dk.grouped_gemm_masked(torch.randn(3, 8, 6), torch.randn(3, 5, 6), torch.tensor([0, 9, 2]))


def test_direct_op_call_checks_arguments():
    with pytest.raises((ValueError, RuntimeError), match="masked_m"):
        torch.ops.dspark.grouped_gemm_masked(torch.randn(3, 8, 6), torch.randn(3, 5, 6), torch.tensor([0, 9, 2]))
    with pytest.raises((ValueError, RuntimeError), match="w"):
        torch.ops.dspark.grouped_gemm_masked(torch.randn(3, 8, 6), torch.randn(2, 5, 6), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------- compiler, opcheck, backends


def test_backends_lists_the_op():
    avail = dk.backends(OP)
    assert avail["reference"] and avail["cpu"] and not avail["cuda"]
    assert OP in dk.__all__


def test_opcheck():
    a, w, masked_m = masked_inputs(3, 10, 16, 8, [10, 0, 3], seed=10)
    torch.library.opcheck(torch.ops.dspark.grouped_gemm_masked.default, (a, w, masked_m))
    torch.library.opcheck(torch.ops.dspark.grouped_gemm_masked.default, (a, w, masked_m.long()))


def test_torch_compile_fullgraph():
    a, w, masked_m = masked_inputs(3, 10, 16, 8, [10, 0, 3], seed=11)

    def layer(a, w, masked_m):
        return dk.grouped_gemm_masked(a, w, masked_m) * 2

    eager = layer(a, w, masked_m)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(a, w, masked_m)
    assert torch.equal(eager, compiled)


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)


def _cuda_masked(E, max_m, K, N, counts, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = (torch.randn(E, max_m, K, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    for e, m in enumerate(counts):
        a[e, m:] = float("nan")
    w = (torch.randn(E, N, K, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    return a, w, torch.tensor(counts, dtype=torch.int32, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("E,max_m,counts", [
    (8, 64, [0, 1, 7, 64, 33, 0, 16, 17]),          # decode-sized slabs
    (4, 1024, [1024, 0, 5, 700]),                   # prefill-sized slabs
])
def test_cuda_masked_bf16_real_shapes(E, max_m, counts):
    K, N = 7168, 4096  # DeepSeek-V3: hidden -> 2·I
    a, w, masked_m = _cuda_masked(E, max_m, K, N, counts)
    got = dk.grouped_gemm_masked(a, w, masked_m)  # default: torch.ops.dspark on the CUDA key (Triton)
    want = ref.grouped_gemm_masked(a, w, masked_m)
    assert got.dtype == torch.bfloat16 and not torch.isnan(got).any()
    assert rel_err(got, want) <= 1e-2
    for e, m in enumerate(counts):
        assert (got[e, m:] == 0).all()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_masked_graph_replay_follows_new_counts():
    a, w, masked_m = _cuda_masked(4, 32, 256, 128, [32, 32, 32, 32])
    a = a.nan_to_num()
    static = masked_m.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dk.grouped_gemm_masked(a, w, static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dk.grouped_gemm_masked(a, w, static)
    for counts in ([32, 0, 5, 17], [0, 0, 0, 1]):
        static.copy_(torch.tensor(counts, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, dk.grouped_gemm_masked(a, w, static)), counts


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_count_check_runs_under_debug(monkeypatch):
    a, w, _ = _cuda_masked(2, 8, 64, 32, [8, 8])
    bad = torch.tensor([3, 9], dtype=torch.int32, device="cuda")
    monkeypatch.setenv("DSPARK_DEBUG", "1")
    with pytest.raises((ValueError, RuntimeError), match="masked_m"):
        dk.grouped_gemm_masked(a, w, bad)
    monkeypatch.delenv("DSPARK_DEBUG")
    got = dk.grouped_gemm_masked(a, w, bad)  # unchecked: clamped to max_m in the kernel
    assert torch.equal(got, dk.grouped_gemm_masked(a, w, torch.tensor([3, 8], dtype=torch.int32, device="cuda")))
