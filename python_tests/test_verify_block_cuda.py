"""CUDA C++ verify_block / random_words against the reference (exact integer outputs).

Runs only where a GPU and the compiled CUDA kernels are present; everything is
skipped otherwise. The cases are built on the CPU with a seeded generator, so a
failure reproduces from its test id alone.
"""

from __future__ import annotations

import os

import pytest
import torch

import dspark_kernels
from dspark_kernels import _backend
from dspark_kernels.reference import philox

# The GPU backend under test: the compiled extension, or (bench/gpu_check.sh's NVRTC
# stage) DSPARK_TEST_GPU_BACKEND=nvrtc, the same kernels compiled at run time.
GPU = os.environ.get("DSPARK_TEST_GPU_BACKEND", "cuda")
CUDA_OK = torch.cuda.is_available() and dspark_kernels.backends("verify_block")[GPU]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA_OK, reason=f"needs a CUDA GPU and the {GPU} backend"),
]

MODES = (
    "greedy",          # temperature=None
    "greedy_t0",       # temperature 0 given (filters given too, and ignored)
    "point",           # sampling, point-mass drafts
    "logits",          # sampling, q from draft_logits
    "probs",           # sampling, q from draft_probs
    "topk",            # draft_logits + top-k
    "topp",            # draft_logits + top-p
    "topk_topp_point", # point mass + both filters
    "mixed",           # some greedy rows, draft_logits, top-k on some requests
)


def make_case(B, V, mode, dtype=torch.float32, draft_dtype=None, max_n=7, seed=0, device="cuda",
              ids_int64=False, invalid_ids=False):
    """kwargs for dspark_kernels.verify_block (without backend)."""
    g = torch.Generator().manual_seed(seed)
    draft_dtype = draft_dtype or dtype
    n = torch.randint(0, max_n + 1, (B,), generator=g)
    if B > 1:
        n[0] = 0  # ragged, with an empty request
    if B > 2:
        n[1] = max_n
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(n, 0)
    num_draft = int(cu[-1])
    rows = num_draft + B
    request_of_draft = torch.repeat_interleave(torch.arange(B), n)
    target_row_of_draft = torch.arange(num_draft) + request_of_draft

    target = (torch.randn(rows, V, generator=g) * 3.0).to(dtype)
    # A draft close to the target so that a fair share of drafts is accepted.
    draft_logits = (target.float()[target_row_of_draft] + torch.randn(num_draft, V, generator=g)).to(draft_dtype)
    temperature = torch.rand(B, generator=g) + 0.5
    if mode == "mixed":
        temperature[torch.rand(B, generator=g) < 0.4] = 0.0
    q = torch.softmax(draft_logits.float() / temperature.clamp_min(1e-3)[request_of_draft, None], dim=-1)

    if mode.startswith("greedy"):
        drafts = target.float()[target_row_of_draft].argmax(-1)
        flip = torch.rand(num_draft, generator=g) < 0.25
        drafts[flip] = torch.randint(0, V, (int(flip.sum()),), generator=g)
    elif num_draft > 0:
        drafts = torch.multinomial(q, 1, generator=g).squeeze(1)
    else:
        drafts = torch.zeros(0, dtype=torch.int64)
    pad = torch.rand(num_draft, generator=g) < 0.1
    drafts[pad] = -1
    if invalid_ids and num_draft > 0:
        bad = torch.rand(num_draft, generator=g) < 0.2
        drafts[bad] = torch.tensor([V, V + 7, -5, 2**31 - 1])[torch.randint(0, 4, (int(bad.sum()),), generator=g)]

    kw = dict(
        target_logits=target,
        draft_tokens=drafts.to(torch.int64 if ids_int64 else torch.int32),
        cu_num_draft=cu.to(torch.int32),
        seed=torch.randint(0, 2**62, (B,), generator=g, dtype=torch.int64),
        offset=torch.randint(0, 10**6, (B,), generator=g, dtype=torch.int64),
        max_num_draft=max_n,
    )
    if mode not in ("greedy",):
        kw["temperature"] = torch.zeros(B) if mode == "greedy_t0" else temperature
    if mode in ("logits", "topk", "topp", "mixed"):
        kw["draft_logits"] = draft_logits
    if mode == "probs":
        kw["draft_probs"] = q.to(draft_dtype)
    choices_k = torch.tensor([0, 1, 3, 20, V, -1])
    choices_p = torch.tensor([1.0, 0.95, 0.7, 0.3, 0.0])
    if mode in ("topk", "topk_topp_point", "mixed", "greedy_t0"):
        kw["top_k"] = choices_k[torch.randint(0, len(choices_k), (B,), generator=g)].to(torch.int32)
    if mode in ("topp", "topk_topp_point", "greedy_t0"):
        kw["top_p"] = choices_p[torch.randint(0, len(choices_p), (B,), generator=g)]
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def assert_same(got, want, kw, what="cuda vs reference"):
    out_g, acc_g = (t.cpu() for t in got)
    out_w, acc_w = (t.cpu() for t in want)
    assert out_g.dtype == torch.int32 and acc_g.dtype == torch.int32
    assert out_g.shape == out_w.shape and acc_g.shape == acc_w.shape
    if torch.equal(out_g, out_w) and torch.equal(acc_g, acc_w):
        return
    bad = torch.nonzero((out_g != out_w).any(1) | (acc_g != acc_w)).flatten().tolist()
    lines = [f"{what}: {len(bad)} request(s) differ"]
    cu = kw["cu_num_draft"].cpu().tolist()
    for b in bad[:8]:
        lines.append(f"  b={b} n={cu[b + 1] - cu[b]} got {out_g[b].tolist()} ({int(acc_g[b])} accepted), "
                     f"want {out_w[b].tolist()} ({int(acc_w[b])} accepted)")
    raise AssertionError("\n".join(lines))


def run(kw, backend):
    return dspark_kernels.verify_block(**kw, backend=backend)


# --------------------------------------------------------------------------------------
# Exact agreement on random shapes and modes
# --------------------------------------------------------------------------------------


# (B, V) shapes; B = 64 with V = 32000 costs the reference ~5 s a case: marked slow.
SHAPES = [(B, V) for B in (1, 7, 64) for V in (1, 7, 129, 32000) if (B, V) != (64, 32000)]


def check_against_reference(B, V, mode, dtype):
    kw = make_case(B, V, mode, dtype=dtype, seed=1000 * B + V)
    got = run(kw, GPU)
    assert_same(got, run(kw, "reference"), kw)
    # The CPU kernel sums exp in fp32 sequentially (about 1e-5 off in log-sum-exp at
    # V = 32000, enough to flip a rare accept test), so compare with it on small rows only.
    if _backend.CPU_COMPILED and V <= 129:
        kw_cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        assert_same(got, run(kw_cpu, "cpu"), kw, "cuda vs cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,V", SHAPES, ids=[f"B{B}-V{V}" for B, V in SHAPES])
def test_matches_reference(B, V, mode, dtype):
    check_against_reference(B, V, mode, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_large_batch(mode, dtype):
    check_against_reference(64, 32000, mode, dtype)


@pytest.mark.parametrize(
    "dtype,draft_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16),
     (torch.float16, torch.float16)],
    ids=["bf16-fp32", "fp32-fp16", "fp16-bf16", "fp16-fp16"],
)
@pytest.mark.parametrize("mode", ["logits", "probs", "topk", "topp"])
def test_mixed_dtypes(mode, dtype, draft_dtype):
    kw = make_case(7, 1000, mode, dtype=dtype, draft_dtype=draft_dtype, seed=7)
    assert_same(run(kw, GPU), run(kw, "reference"), kw)


@pytest.mark.parametrize("max_n", [0, 1, 15, 40])
def test_draft_lengths(max_n):
    """Wider blocks than there are warps in the walk kernel, and max_num_draft = 0."""
    for mode in ("greedy", "logits", "topk"):
        kw = make_case(9, 257, mode, max_n=max_n, seed=max_n)
        assert_same(run(kw, GPU), run(kw, "reference"), kw)


def test_max_num_draft_wider_than_blocks():
    kw = make_case(5, 129, "logits", max_n=4, seed=3)
    kw["max_num_draft"] = 11
    out, _ = run(kw, GPU)
    assert out.shape == (5, 12)
    assert_same((out, _), run(kw, "reference"), kw)


@pytest.mark.parametrize("mode", ["greedy", "point", "logits", "probs", "topk"])
def test_int64_and_invalid_ids(mode, monkeypatch):
    """int64 inputs; ids >= V or < -1 are never accepted (as padding), like the reference."""
    monkeypatch.delenv("DSPARK_DEBUG", raising=False)  # the reference would refuse the ids
    kw = make_case(16, 129, mode, seed=11, ids_int64=True, invalid_ids=True)
    kw["cu_num_draft"] = kw["cu_num_draft"].long()
    kw["top_k"] = kw["top_k"].long() if "top_k" in kw else None
    assert_same(run(kw, GPU), run(kw, "reference"), kw)


def test_residual_without_mass_and_masked_rows():
    """draft_probs = 2p: every rejection has a zero residual (sample p instead);
    -inf logits; an all -inf row (token 0)."""
    B, V = 6, 64
    kw = make_case(B, V, "point", seed=5)
    target = kw["target_logits"].clone()
    target[:, ::3] = float("-inf")
    target[-1] = float("-inf")  # the last request's bonus row
    kw["target_logits"] = target
    cu = kw["cu_num_draft"].cpu()
    request = torch.repeat_interleave(torch.arange(B), cu[1:] - cu[:-1]).to(target.device)
    rows = torch.arange(len(request), device=target.device) + request  # target row of each draft
    p = torch.softmax(target[rows] / kw["temperature"][request, None], dim=-1)
    kw["draft_probs"] = 2 * p
    assert_same(run(kw, GPU), run(kw, "reference"), kw)
    kw.pop("draft_probs")
    for temperature in (None, kw["temperature"]):
        kw["temperature"] = temperature
        assert_same(run(kw, GPU), run(kw, "reference"), kw)


def test_ties_greedy_lowest_index():
    B, V = 4, 4099  # ties across vocabulary splits
    kw = make_case(B, V, "greedy", seed=9)
    target = torch.zeros_like(kw["target_logits"])
    target[:, 5] = 1.0
    target[:, V - 1] = 1.0
    target[:, 4097] = 1.0
    kw["target_logits"] = target
    out, acc = run(kw, GPU)
    assert_same((out, acc), run(kw, "reference"), kw)
    rows = out.cpu()
    for b in range(B):
        assert int(rows[b, int(acc[b])]) == 5


# --------------------------------------------------------------------------------------
# Layout: strided rows, the vocabulary-stride check
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad,shift", [(3, 0), (8, 0), (5, 3), (0, 1)], ids=["odd", "aligned", "unaligned", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_rows(pad, shift, dtype):
    V = 4096 + 8  # one full vector split and a tail
    for mode in ("greedy", "logits", "topp", "probs"):
        kw = make_case(7, V, mode, dtype=dtype, seed=pad + shift)
        for name in ("target_logits", "draft_logits", "draft_probs"):
            t = kw.get(name)
            if t is None:
                continue
            wide = torch.full((t.shape[0], V + pad + shift), float("nan"), dtype=t.dtype, device=t.device)
            wide[:, shift:shift + V] = t
            kw[name] = wide[:, shift:shift + V]
            assert kw[name].stride(0) == V + pad + shift
        assert_same(run(kw, GPU), run(kw, "reference"), kw)


def test_vocabulary_stride_must_be_one():
    kw = make_case(3, 129, "logits", seed=1)
    bad = kw["target_logits"].t().contiguous().t()  # same values, stride (1, rows)
    with pytest.raises(RuntimeError, match="target_logits"):
        torch.ops.dspark.verify_block(bad, kw["draft_tokens"], kw["cu_num_draft"], draft_logits=kw["draft_logits"],
                                      temperature=kw["temperature"], seed=kw["seed"], offset=kw["offset"],
                                      max_num_draft=kw["max_num_draft"])
    bad_q = kw["draft_logits"].t().contiguous().t()
    if bad_q.shape[0] > 1:
        with pytest.raises(RuntimeError, match="draft_logits"):
            torch.ops.dspark.verify_block(kw["target_logits"], kw["draft_tokens"], kw["cu_num_draft"],
                                          draft_logits=bad_q, temperature=kw["temperature"], seed=kw["seed"],
                                          offset=kw["offset"], max_num_draft=kw["max_num_draft"])


# --------------------------------------------------------------------------------------
# Robustness, determinism, batch invariance
# --------------------------------------------------------------------------------------


def test_garbage_offsets_do_not_fault(monkeypatch):
    """Non-monotone / out-of-range cu_num_draft and n_b > max_num_draft: no fault, outputs in shape."""
    monkeypatch.delenv("DSPARK_DEBUG", raising=False)  # the debug checks would refuse the offsets
    kw = make_case(8, 300, "topk", seed=2)
    N = kw["draft_tokens"].shape[0]
    kw["cu_num_draft"] = torch.tensor([0, 50, -7, N + 100, 3, 2, N, 10**6, N], dtype=torch.int32, device="cuda")
    kw["max_num_draft"] = 3
    out, acc = run(kw, GPU)
    torch.cuda.synchronize()
    assert out.shape == (8, 4)
    assert bool(((acc >= 0) & (acc <= 3)).all())


def test_deterministic_and_batch_invariant():
    kw = make_case(12, 5000, "mixed", seed=4)
    first = run(kw, GPU)
    second = run(kw, GPU)
    assert_same(first, second, kw, "run to run")
    cu = kw["cu_num_draft"].cpu().tolist()
    for b in range(12):
        lo, hi = cu[b], cu[b + 1]
        one = dict(
            target_logits=kw["target_logits"][lo + b:hi + b + 1],
            draft_tokens=kw["draft_tokens"][lo:hi],
            cu_num_draft=torch.tensor([0, hi - lo], dtype=torch.int32, device="cuda"),
            draft_logits=kw["draft_logits"][lo:hi],
            temperature=kw["temperature"][b:b + 1],
            top_k=kw["top_k"][b:b + 1],
            seed=kw["seed"][b:b + 1],
            offset=kw["offset"][b:b + 1],
            max_num_draft=kw["max_num_draft"],
        )
        out, acc = run(one, GPU)
        assert torch.equal(out[0].cpu(), first[0][b].cpu()) and int(acc[0]) == int(first[1][b]), f"request {b}"


# --------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["greedy", "logits", "topk_topp_point"])
def test_cuda_graph_capture_and_replay(mode):
    kw = make_case(7, 1000, mode, seed=21)
    static = dict(kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run(static, GPU)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, acc = run(static, GPU)
    graph.replay()
    torch.cuda.synchronize()
    assert_same((out, acc), run(kw, "reference"), kw, "graph replay vs reference")

    # New inputs written in place: the replay must see them.
    gen = torch.Generator(device="cuda").manual_seed(22)
    for name in ("target_logits", "draft_logits"):
        if name in static:
            t = static[name]
            t.copy_(t.float() + torch.randn(t.shape, generator=gen, device="cuda"))
    static["seed"].add_(1)
    static["offset"].add_(17)
    graph.replay()
    torch.cuda.synchronize()
    assert_same((out, acc), run(static, GPU), static, "graph replay vs eager")
    assert_same((out, acc), run(static, "reference"), static, "graph replay vs reference")


# --------------------------------------------------------------------------------------
# Large shape: T * V > 2^31
# --------------------------------------------------------------------------------------


def test_large_rows_beyond_2_31_elements():
    V = 262144
    n = [8192, 3, 0, 2]
    B = len(n)
    N = sum(n)
    T = N + B
    assert T * V > 2**31
    need = T * V * 2 + (2 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    target = torch.randn(T, V, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0, 8192, 8195, 8195, 8197], dtype=torch.int32, device="cuda")
    drafts = torch.full((N,), -1, dtype=torch.int32, device="cuda")  # request 0: all padding
    # Request 1 (greedy): the argmax of each of its rows sits at the far end of the row.
    for i in range(4):
        target[8192 + 1 + i, V - 1 - i] = 100.0
    drafts[8192:8195] = torch.tensor([V - 1, V - 2, V - 3], dtype=torch.int32)
    drafts[8195:8197] = torch.tensor([7, V - 1], dtype=torch.int32)
    kw = dict(
        target_logits=target, draft_tokens=drafts, cu_num_draft=cu,
        temperature=torch.tensor([1.0, 0.0, 0.9, 1.1], device="cuda"),
        seed=torch.tensor([1, 2, 3, 4], dtype=torch.int64, device="cuda"),
        offset=torch.zeros(B, dtype=torch.int64, device="cuda"),
        max_num_draft=8192,
    )
    got = run(kw, GPU)
    assert int(got[1][1]) == 3 and got[0][1, :4].tolist() == [V - 1, V - 2, V - 3, V - 4]
    assert_same(got, run(kw, "reference"), kw)


# --------------------------------------------------------------------------------------
# random_words
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("salt", [philox.SALT_DRAFT, philox.SALT_ACCEPT, philox.SALT_RESAMPLE, 0, 0xFFFFFFFF])
def test_random_words_match_cpu_and_reference(salt):
    g = torch.Generator().manual_seed(salt & 0xFFFF)
    n = 50000
    seed = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)
    position = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)
    position[: n // 2] = torch.randint(0, 2**20, (n // 2,), generator=g)
    index = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    got = torch.ops.dspark.random_words(seed.cuda(), position.cuda(), index.cuda(), salt)
    assert got.dtype == torch.int64 and got.device.type == "cuda"
    want_ref = philox.random_words(seed, position, salt, index)
    assert torch.equal(got.cpu(), want_ref)
    if _backend.CPU_COMPILED:
        assert torch.equal(got.cpu(), torch.ops.dspark.random_words(seed, position, index, salt))


def test_random_words_shapes_and_int32():
    g = torch.Generator().manual_seed(3)
    seed = torch.randint(0, 2**31 - 1, (7, 9), generator=g, dtype=torch.int32)
    position = torch.randint(0, 2**31 - 1, (9, 7), generator=g, dtype=torch.int32).t()  # non-contiguous
    index = torch.randint(0, 2**31 - 1, (7, 9), generator=g, dtype=torch.int32)
    got = torch.ops.dspark.random_words(seed.cuda(), position.cuda(), index.cuda(), philox.SALT_RESAMPLE)
    assert got.shape == (7, 9)
    want = philox.random_words(seed.long(), position.long(), philox.SALT_RESAMPLE, index.long())
    assert torch.equal(got.cpu(), want)
    empty = torch.zeros(0, dtype=torch.int64, device="cuda")
    assert torch.ops.dspark.random_words(empty, empty, empty, 1).shape == (0,)
