"""dspark_kernels.integrations.flashinfer: chain_speculative_sampling with FlashInfer's
arguments and return triple: its docstring example exactly, the chain law and the law
of accepted_token_num (independent accept tests: a Poisson-binomial count) by χ²,
every request's seed honoured (FlashInfer PR #4861), the seed / offset / generator
forms, errors (docs/integration.md)."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import requires_cuda
from integration_oracles import chain_law, chain_outcome, chi2_outcomes, needs_cpu_kernels

import dspark_kernels as dk
from dspark_kernels.integrations import flashinfer as dfi

BACKENDS = [b for b, ok in dk.backends("verify_block").items() if ok and b != "cuda"]

# flashinfer/sampling.py docstring of chain_speculative_sampling (FLASHINFER_COMMIT)
DOC_DRAFT_PROBS = [[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]]
DOC_DRAFT_IDS = [[2, 1]]
DOC_TARGET_PROBS = [[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]]


def test_importable_without_flashinfer():
    assert "flashinfer" not in sys.modules or sys.modules["flashinfer"] is None


def test_docstring_example():
    torch.manual_seed(42)
    out, accepted, emitted = dfi.chain_speculative_sampling(
        torch.tensor(DOC_DRAFT_PROBS), torch.tensor(DOC_DRAFT_IDS, dtype=torch.int32), torch.tensor(DOC_TARGET_PROBS))
    assert out.dtype == torch.int32
    assert out.tolist() == [[2, 0, -1]]
    assert accepted.tolist() == [1] and emitted.tolist() == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_docstring_example_every_backend(backend):
    out, accepted, emitted = dfi.chain_speculative_sampling(
        torch.tensor(DOC_DRAFT_PROBS), torch.tensor(DOC_DRAFT_IDS), torch.tensor(DOC_TARGET_PROBS), seed=3,
        backend=backend)
    assert (out.tolist(), accepted.tolist(), emitted.tolist()) == ([[2, 0, -1]], [1], [1])


def test_maybe_outputs_accumulate_in_place():
    acc = torch.tensor([5], dtype=torch.int32)
    emi = torch.tensor([7], dtype=torch.int32)
    for _ in range(3):
        out, a, e = dfi.chain_speculative_sampling(
            torch.tensor(DOC_DRAFT_PROBS), torch.tensor(DOC_DRAFT_IDS), torch.tensor(DOC_TARGET_PROBS), acc, emi)
        assert a is acc and e is emi
    assert acc.tolist() == [8] and emi.tolist() == [10]


def _copies(copies, steps=2, vocab=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    p_one = torch.softmax(torch.randn(steps + 1, vocab, generator=g), -1)
    q_one = torch.softmax(torch.randn(steps, vocab, generator=g), -1)
    drafts = torch.randint(0, vocab, (steps,), generator=g)
    return (q_one, drafts, p_one), (q_one.expand(copies, -1, -1), drafts.expand(copies, -1),
                                    p_one.expand(copies, -1, -1))


@needs_cpu_kernels
def test_chain_law_chi2():
    copies = 12000
    (q, d, p), args = _copies(copies)
    out, accepted, emitted = dfi.chain_speculative_sampling(*args, seed=torch.arange(copies), offset=0)
    rows = lambda t: [(r / r.sum()).tolist() for r in t.double()]  # noqa: E731 - fp32 rows, normalised in fp64
    law = chain_law(rows(p), rows(q), d.tolist())
    chi2_outcomes([chain_outcome(r, 2) for r in out.tolist()], law, "flashinfer chain")
    assert torch.equal(emitted, torch.tensor([chain_outcome(r, 2)[0] for r in out.tolist()], dtype=torch.int32))


@needs_cpu_kernels
def test_accepted_token_num_is_the_independent_count():
    """FlashInfer's meaning: per request, how many drafts pass their own accept test
    (u_i < p_i(x_i) / q_i(x_i)), regardless of earlier rejections: a sum of independent
    Bernoulli(min(1, p/q)) -- a Poisson-binomial law. The emitted drafts are among them."""
    copies, steps = 12000, 3
    alphas_wanted = [0.5, 0.7, 0.4]  # q_i(x_i) = 0.5, p_i(x_i) = 0.5 * alpha_i: every test can fail
    q = torch.tensor([[0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]] * steps)
    p = torch.tensor([[0.5 * a] + [(1 - 0.5 * a) / 3] * 3 for a in alphas_wanted + [0.5]])
    d = torch.zeros(steps, dtype=torch.int64)
    args = (q.expand(copies, -1, -1), d.expand(copies, -1), p.expand(copies, -1, -1))
    out, accepted, emitted = dfi.chain_speculative_sampling(*args, seed=torch.arange(copies) * 7 + 1)
    alphas = [min(1.0, float(p[i, d[i]]) / float(q[i, d[i]])) for i in range(steps)]
    law = {0: 1.0}
    for a in alphas:
        nxt = {}
        for k, w in law.items():
            nxt[k + 1] = nxt.get(k + 1, 0.0) + w * a
            nxt[k] = nxt.get(k, 0.0) + w * (1 - a)
        law = {k: w for k, w in nxt.items() if w > 0}
    chi2_outcomes(accepted.tolist(), law, "accepted_token_num")
    assert bool((accepted >= emitted).all())
    assert not torch.equal(accepted, emitted)  # the metric is not the emitted count


def test_every_request_seed_is_honoured():
    """FlashInfer PR #4861: only seed[0] was read. Here request b's row depends on
    (seed[b], offset[b]) only."""
    copies = 64
    _, args = _copies(copies, steps=3, vocab=6, seed=1)
    same = dfi.chain_speculative_sampling(*args, seed=torch.full((copies,), 1111), offset=torch.full((copies,), 9))[0]
    assert bool((same == same[0]).all())  # one stream for all: identical rows
    per = dfi.chain_speculative_sampling(*args, seed=torch.arange(copies) + 1111, offset=9)[0]
    assert len({tuple(r) for r in per.tolist()}) > 3  # distinct streams: varied rows
    for b in (0, 5, 63):
        alone = dfi.chain_speculative_sampling(*(a[b:b + 1] for a in args), seed=1111 + b, offset=9)[0]
        assert alone[0].tolist() == per[b].tolist()
    # offsets are per request too
    shifted = dfi.chain_speculative_sampling(*args, seed=torch.full((copies,), 1111), offset=torch.arange(copies))[0]
    assert len({tuple(r) for r in shifted.tolist()}) > 3


def test_seed_forms_and_generator():
    _, args = _copies(16, steps=2, vocab=5, seed=2)
    a = dfi.chain_speculative_sampling(*args, seed=77, offset=3)[0]
    b = dfi.chain_speculative_sampling(*args, seed=torch.tensor([77]), offset=torch.tensor([3]))[0]
    c = dfi.chain_speculative_sampling(*args, seed=torch.full((16,), 77), offset=torch.full((16,), 3))[0]
    assert torch.equal(a, b) and torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d = dfi.chain_speculative_sampling(*args, generator=g1)[0]
    e = dfi.chain_speculative_sampling(*args, generator=g2)[0]
    assert torch.equal(d, e)


def test_empty_batches_and_no_drafts():
    out, a, e = dfi.chain_speculative_sampling(torch.rand(0, 2, 5), torch.zeros(0, 2, dtype=torch.int64),
                                               torch.rand(0, 3, 5))
    assert out.shape == (0, 3) and a.shape == e.shape == (0,)
    target = torch.zeros(2, 1, 5)
    target[0, 0, 3] = target[1, 0, 1] = 1.0
    out, a, e = dfi.chain_speculative_sampling(torch.rand(2, 0, 5), torch.zeros(2, 0, dtype=torch.int64), target)
    assert out.tolist() == [[3], [1]] and a.tolist() == e.tolist() == [0, 0]


def test_bad_shapes_are_errors():
    q, d, p = torch.tensor(DOC_DRAFT_PROBS), torch.tensor(DOC_DRAFT_IDS), torch.tensor(DOC_TARGET_PROBS)
    with pytest.raises(ValueError, match="target_probs"):
        dfi.chain_speculative_sampling(q, d, p[:, :2])
    with pytest.raises(ValueError, match="draft_token_ids"):
        dfi.chain_speculative_sampling(q, d[:, :1], p)
    with pytest.raises(ValueError, match="B, K, V"):
        dfi.chain_speculative_sampling(q[0], d, p)


def test_no_host_reads_meta_tensors():
    """On meta tensors every read of a value fails: the adapter never reads the device back."""
    meta = "meta"
    out, accepted, emitted = dfi.chain_speculative_sampling(
        torch.rand(4, 3, 16, device=meta), torch.zeros(4, 3, dtype=torch.int64, device=meta),
        torch.rand(4, 4, 16, device=meta), seed=torch.arange(4, device=meta), offset=5)
    assert out.shape == (4, 4) and accepted.shape == emitted.shape == (4,)


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_and_no_sync():
    _, args = _copies(8, steps=3, vocab=32, seed=4)
    args = tuple(a.contiguous().cuda() for a in args)
    seed = torch.arange(8, device="cuda")
    offset = torch.full((8,), 12, device="cuda")
    acc = torch.zeros(8, dtype=torch.int32, device="cuda")
    emi = torch.zeros(8, dtype=torch.int32, device="cuda")

    def step():
        return dfi.chain_speculative_sampling(*args, acc, emi, seed=seed, offset=offset)[0]

    eager = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    acc.zero_()
    emi.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    assert int(emi.sum()) == int((eager >= 0).sum()) - 8


def _flashinfer():
    try:
        import flashinfer.sampling  # type: ignore
    except Exception:  # noqa: BLE001
        return None
    return flashinfer.sampling


@pytest.mark.cuda
@pytest.mark.skipif(_flashinfer() is None or not torch.cuda.is_available(), reason="needs FlashInfer and a GPU")
def test_same_as_flashinfer():
    fi = _flashinfer()
    args = (torch.tensor(DOC_DRAFT_PROBS).cuda(), torch.tensor(DOC_DRAFT_IDS, dtype=torch.int32).cuda(),
            torch.tensor(DOC_TARGET_PROBS).cuda())
    theirs = fi.chain_speculative_sampling(*args)
    ours = dfi.chain_speculative_sampling(*args)
    for a, b in zip(ours, theirs):
        assert a.tolist() == b.tolist()
    # sampled: FlashInfer's own outputs follow the oracle's chain law that ours passes
    copies = 12000
    (q, d, p), big = _copies(copies)
    big = tuple(a.contiguous().cuda() for a in big)
    out = fi.chain_speculative_sampling(*big)[0]
    rows = lambda t: [(r / r.sum()).tolist() for r in t.double()]  # noqa: E731
    chi2_outcomes([chain_outcome(r, 2) for r in out.cpu().tolist()], chain_law(rows(p), rows(q), d.tolist()),
                  "FlashInfer's chain_speculative_sampling")
