"""draft_sample_block: the reference against an independent oracle, backend equality,
batch invariance, greedy and filtered rows, χ² tests of the drafted distribution, and
the end-to-end test: drafts sampled by this op and verified by verify_block with the
returned logits follow the target distribution (docs/drafting.md, docs/correctness.md)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import backend_device
from helpers import chi2_check, softmax64

import dspark_kernels as dk
from dspark_kernels.reference import philox

OP = "draft_sample_block"
BACKENDS = [b for b, ok in dk.backends(OP).items() if ok and b != "reference"]
INTERPRETED = {b for b in BACKENDS if b == "triton" and backend_device(b) == "cpu"}


def make_inputs(batch, gamma, vocab, *, rank=0, exact=True, seed=0, dtype=torch.float32, temperature="mixed",
                top_k=None, top_p=None):
    """Random inputs. ``exact=True`` draws Markov weights from multiples of 1/8 so that
    every sum of their products is exact in fp32, whatever the order (backends then
    agree bit for bit on the logits); ``exact=False`` draws Gaussian weights."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(batch, gamma, vocab, generator=g) * 2.0).to(dtype)
    kwargs = {}
    if rank:
        if exact:
            kwargs["markov_w1"] = torch.randint(-8, 9, (vocab, rank), generator=g).float() / 8
            kwargs["markov_w2"] = torch.randint(-8, 9, (rank, vocab), generator=g).float() / 8
        else:
            kwargs["markov_w1"] = torch.randn(vocab, rank, generator=g) / math.sqrt(rank)
            kwargs["markov_w2"] = torch.randn(rank, vocab, generator=g)
    if temperature == "mixed":
        kwargs["temperature"] = torch.tensor([0.0, 1.0, 0.7, 1.5, 0.0, 2.0, 0.9, 1.1][:batch] +
                                             [1.0] * max(0, batch - 8))
    elif temperature is not None:
        kwargs["temperature"] = temperature
    if top_k is not None:
        kwargs["top_k"] = top_k
    if top_p is not None:
        kwargs["top_p"] = top_p
    kwargs["seed"] = torch.randint(-(2**62), 2**62, (batch,), generator=g)
    kwargs["offset"] = torch.randint(0, 2**40, (batch,), generator=g)
    anchor = torch.randint(0, vocab, (batch,), generator=g, dtype=torch.int32)
    return base, anchor, kwargs


def run(backend, base, anchor, kwargs, **extra):
    device = backend_device(backend) if backend != "reference" else "cpu"
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    tokens, logits = dk.draft_sample_block(base.to(device), anchor.to(device), **kw, backend=backend, **extra)
    assert tokens.dtype == torch.int32 and logits.dtype == torch.float32
    return tokens.cpu(), logits.cpu()


def check_equal(got, ref, exact_logits):
    assert torch.equal(got[0], ref[0]), (got[0], ref[0])
    if exact_logits:
        assert torch.equal(got[1], ref[1])
    else:
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# The reference against an independent oracle (numpy, fp64 filters, same noise)


def oracle(base, anchor, kwargs):
    batch, gamma, vocab = base.shape
    w1, w2 = kwargs.get("markov_w1"), kwargs.get("markov_w2")
    temp = kwargs.get("temperature")
    tk, tp = kwargs.get("top_k"), kwargs.get("top_p")
    out = []
    for b in range(batch):
        prev = int(anchor[b])
        t = float(temp[b]) if temp is not None else 0.0
        row_tokens = []
        for k in range(gamma):
            logits = base[b, k].double().numpy()
            if w1 is not None:  # exact weights: fp64 equals every fp32 order
                logits = logits + w1[prev].double().numpy() @ w2.double().numpy()
            logits = logits.astype(np.float32)
            if not t > 0:
                tok = int(np.argmax(logits))
            else:
                s = logits / np.float32(t)
                p = softmax64(s.astype(np.float64).tolist(), 1.0, int(tk[b]) if tk is not None else 0,
                              float(tp[b]) if tp is not None else 1.0)
                g = philox.gumbels(int(kwargs["seed"][b]), int(kwargs["offset"][b]) + k, philox.SALT_DRAFT,
                                   torch.arange(vocab)).numpy()
                score = [float(np.float32(s[v]) + np.float32(g[v])) if p[v] > 0 else -math.inf for v in range(vocab)]
                tok = max(range(vocab), key=lambda v: (score[v], -v))
            row_tokens.append(tok)
            prev = tok
        out.append(row_tokens)
    return out


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("filters", [False, True])
def test_reference_matches_oracle(rank, filters):
    rng = random.Random(rank * 10 + filters)
    for trial in range(6):
        batch, gamma, vocab = rng.randint(1, 5), rng.randint(1, 4), rng.choice([1, 2, 5, 9, 30])
        kw = {}
        if filters:
            kw["top_k"] = torch.tensor([rng.randint(0, vocab + 1) for _ in range(batch)], dtype=torch.int32)
            kw["top_p"] = torch.tensor([rng.choice([0.3, 0.7, 0.95, 1.0]) for _ in range(batch)])
        base, anchor, kwargs = make_inputs(batch, gamma, vocab, rank=rank, seed=trial, **kw)
        tokens, logits = dk.draft_sample_block(base, anchor, **kwargs, backend="reference")
        assert tokens.tolist() == oracle(base, anchor, kwargs), trial
        assert logits.shape == (batch, gamma, vocab)


def test_returned_logits_are_the_markov_corrected_rows():
    base, anchor, kwargs = make_inputs(3, 4, 20, rank=5, seed=3)
    tokens, logits = dk.draft_sample_block(base, anchor, **kwargs, backend="reference")
    w1, w2 = kwargs["markov_w1"], kwargs["markov_w2"]
    prev = anchor.long()
    for k in range(4):
        expect = base[:, k] + w1[prev] @ w2
        assert torch.equal(logits[:, k], expect)  # exact weights: every order agrees
        prev = tokens[:, k].long()


# --------------------------------------------------------------------------
# Every backend equals the reference

GRID = [  # (batch, gamma, vocab, rank)
    (1, 1, 1, 0),
    (3, 4, 7, 0),
    (2, 5, 129, 0),
    (4, 2, 769, 0),
    (3, 3, 7, 2),
    (2, 4, 129, 16),
    (5, 2, 200, 40),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,gamma,vocab,rank", GRID)
def test_backend_equals_reference(backend, batch, gamma, vocab, rank):
    if backend in INTERPRETED and vocab * batch * gamma > 3000:
        pytest.skip("interpreter: the small shapes cover the same code")
    base, anchor, kwargs = make_inputs(batch, gamma, vocab, rank=rank, seed=vocab + rank)
    ref = run("reference", base, anchor, kwargs)
    check_equal(run(backend, base, anchor, kwargs), ref, exact_logits=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [0, 4])
def test_backend_equals_reference_with_filters(backend, rank):
    vocab = 64 if backend in INTERPRETED else 300
    batch = 4
    top_k = torch.tensor([0, 3, 10, vocab], dtype=torch.int32)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.8])
    base, anchor, kwargs = make_inputs(batch, 3, vocab, rank=rank, seed=17, top_k=top_k, top_p=top_p,
                                       temperature=torch.tensor([1.0, 0.8, 0.0, 1.3]))
    ref = run("reference", base, anchor, kwargs)
    check_equal(run(backend, base, anchor, kwargs), ref, exact_logits=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_gaussian_weights_and_fp16(backend):
    """Gaussian Markov weights (logits agree to fp32 rounding) and fp16 inputs."""
    vocab, rank = (48, 8) if backend in INTERPRETED else (500, 64)
    base, anchor, kwargs = make_inputs(3, 3, vocab, rank=rank, exact=False, seed=23)
    ref = run("reference", base, anchor, kwargs)
    check_equal(run(backend, base, anchor, kwargs), ref, exact_logits=backend == "cpu")
    base16 = base.half()
    kw16 = dict(kwargs, markov_w1=kwargs["markov_w1"].half(), markov_w2=kwargs["markov_w2"].half())
    ref16 = run("reference", base16, anchor, kw16)
    check_equal(run(backend, base16, anchor, kw16), ref16, exact_logits=backend == "cpu")


def test_cpu_random_sweep():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    rng = random.Random(99)
    for case in range(30):
        batch, gamma, vocab = rng.randint(1, 6), rng.randint(1, 6), rng.choice([1, 2, 3, 16, 33, 129, 500])
        rank = rng.choice([0, 0, 1, 7, 32])
        kw = {}
        if rng.random() < 0.4:
            kw["top_k"] = torch.tensor([rng.randint(-1, vocab + 1) for _ in range(batch)], dtype=torch.int32)
        if rng.random() < 0.4:
            kw["top_p"] = torch.tensor([rng.choice([0.2, 0.5, 0.99, 1.0]) for _ in range(batch)])
        temps = torch.tensor([rng.choice([0.0, 0.5, 1.0, 1.7]) for _ in range(batch)])
        base, anchor, kwargs = make_inputs(batch, gamma, vocab, rank=rank, seed=case, temperature=temps, **kw)
        ref = run("reference", base, anchor, kwargs)
        check_equal(run("cpu", base, anchor, kwargs), ref, exact_logits=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_triton_vocabulary_splits(backend):
    """Several splits of a row (the last-block-done merge) and small chunks."""
    from dspark_kernels.triton.draft_sample_block import draft_sample_block as triton_draft

    device = backend_device(backend)
    for rank in (0, 4):
        base, anchor, kwargs = make_inputs(3, 2, 100, rank=rank, seed=31 + rank)
        ref = run("reference", base, anchor, kwargs)
        args = [base, anchor, kwargs.get("markov_w1"), kwargs.get("markov_w2"), kwargs["temperature"], None, None,
                kwargs["seed"], kwargs["offset"], True]
        got = triton_draft(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args], _splits=3,
                           _block_v=16)
        check_equal((got[0].cpu(), got[1].cpu()), ref, exact_logits=True)


# --------------------------------------------------------------------------
# Semantics: greedy, filters, logits, layout, batch invariance, randomness


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_greedy_is_argmax_and_ignores_seeds(backend):
    base, anchor, kwargs = make_inputs(3, 3, 40, rank=4, seed=41, temperature=None)
    a = run(backend, base, anchor, kwargs)
    b = run(backend, base, anchor, dict(kwargs, seed=kwargs["seed"] + 1, offset=kwargs["offset"] + 5))
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[0], a[1].argmax(-1).to(torch.int32))


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_top_k_one_is_greedy(backend):
    base, anchor, kwargs = make_inputs(4, 3, 50, seed=43, temperature=1.0, top_k=1)
    tokens, logits = run(backend, base, anchor, kwargs)
    assert torch.equal(tokens, logits.argmax(-1).to(torch.int32))


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_return_logits_false_and_strided_inputs(backend):
    base, anchor, kwargs = make_inputs(3, 4, 30, rank=3, seed=47)
    ref = run("reference", base, anchor, kwargs)
    wide = torch.full((3, 6, 45), float("nan"))
    wide[:, 1:5, 10:40] = base
    w1t = kwargs["markov_w1"].t().contiguous().t()  # column-major
    kw = dict(kwargs, markov_w1=w1t)
    tokens, logits = run(backend, wide[:, 1:5, 10:40], anchor, kw, return_logits=False)
    assert logits.shape == (0,)
    assert torch.equal(tokens, ref[0])


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_batch_invariance(backend):
    """A request's tokens depend only on its own inputs, seed and offset."""
    base, anchor, kwargs = make_inputs(5, 3, 40, rank=4, seed=53)
    full = run(backend, base, anchor, kwargs)
    per_request = ("temperature", "top_k", "top_p", "seed", "offset")

    def pick(idx):
        return {k: (v[idx] if k in per_request else v) for k, v in kwargs.items()}

    perm = [3, 1, 4, 0, 2]
    part = run(backend, base[perm], anchor[perm], pick(perm))
    assert torch.equal(part[0], full[0][perm])
    assert torch.equal(part[1], full[1][perm])
    single = run(backend, base[2:3], anchor[2:3], pick(slice(2, 3)))
    assert torch.equal(single[0][0], full[0][2]) and torch.equal(single[1][0], full[1][2])


def test_randomness_depends_on_seed_and_offset_only():
    base, anchor, kwargs = make_inputs(6, 5, 30, seed=59, temperature=1.0)
    a = dk.draft_sample_block(base, anchor, **kwargs, backend="reference")
    b = dk.draft_sample_block(base, anchor, **kwargs, backend="reference")
    assert torch.equal(a[0], b[0])
    c = dk.draft_sample_block(base, anchor, **dict(kwargs, offset=kwargs["offset"] + 1), backend="reference")
    assert not torch.equal(a[0], c[0])
    # Position k uses offset + k: shifting the block by one reuses the noise of the next position.
    d = dk.draft_sample_block(base[:, 1:], anchor, **dict(kwargs, offset=kwargs["offset"] + 1), backend="reference")
    assert torch.equal(d[0], a[0][:, 1:])


def test_seed_none_is_reproducible_under_manual_seed():
    base, anchor, kwargs = make_inputs(2, 3, 30, seed=61, temperature=1.0)
    kwargs.pop("seed")
    torch.manual_seed(3)
    a = dk.draft_sample_block(base, anchor, **kwargs)
    torch.manual_seed(3)
    b = dk.draft_sample_block(base, anchor, **kwargs)
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_degenerate_rows(backend):
    base = torch.full((2, 2, 5), float("-inf"))
    base[1, 1, 3] = 0.0
    base[0, 1, 2] = float("nan")
    tokens, _ = run(backend, base, torch.zeros(2, dtype=torch.int32),
                    dict(temperature=torch.tensor([1.0, 0.0]), seed=torch.tensor([1, 2]), offset=torch.tensor([0, 0])))
    assert tokens.tolist() == [[0, 0], [0, 3]]
    # Empty batch and empty block.
    for shape in ((0, 3, 7), (2, 0, 7)):
        tokens, logits = run(backend, torch.randn(shape), torch.zeros(shape[0], dtype=torch.int32),
                             dict(temperature=1.0, seed=1, offset=0))
        assert tokens.shape == shape[:2] and logits.shape == shape


# --------------------------------------------------------------------------
# Statistics (χ², ≥ 1e5 trials, false alarm ≤ 1e-6 per check)

CHI2_FALSE_ALARM = 1e-6
TRIALS = 100_000


def _stat_backend():
    return "cpu" if "cpu" in BACKENDS else "reference"


def _stat_problem(vocab=6, gamma=2, rank=3, seed=1234):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(gamma, vocab, generator=g) * 1.5
    w1 = torch.randn(vocab, rank, generator=g)
    w2 = torch.randn(rank, vocab, generator=g) * 0.7
    return rows, w1, w2, g


@pytest.mark.parametrize("filters", [False, True])
def test_drafted_tokens_follow_the_markov_distribution(filters):
    if _stat_backend() == "reference":
        pytest.skip("statistical tests need the cpu backend")
    vocab, temp = 6, 0.8
    rows, w1, w2, g = _stat_problem(vocab)
    top_k, top_p = (4, 0.9) if filters else (0, 1.0)
    anchor = 2
    trials = TRIALS
    tokens, logits = dk.draft_sample_block(
        rows.repeat(trials, 1, 1), torch.full((trials,), anchor, dtype=torch.int32), markov_w1=w1, markov_w2=w2,
        temperature=temp, top_k=top_k, top_p=top_p, seed=torch.randint(0, 2**62, (trials,), generator=g), offset=0,
        backend=_stat_backend())
    l0 = (rows[0] + w1[anchor] @ w2).tolist()
    chi2_check(tokens[:, 0], softmax64(l0, temp, top_k, top_p), "position 0")
    for x0 in torch.bincount(tokens[:, 0].long(), minlength=vocab).argsort(descending=True)[:2].tolist():
        sel = tokens[:, 0] == x0
        l1 = (rows[1] + w1[x0] @ w2).tolist()
        chi2_check(tokens[sel, 1], softmax64(l1, temp, top_k, top_p), f"position 1 | x0 = {x0}")
        assert torch.allclose(logits[sel, 1][0], torch.tensor(l1), atol=1e-5)


def test_drafted_tokens_follow_softmax_without_markov():
    if _stat_backend() == "reference":
        pytest.skip("statistical tests need the cpu backend")
    rows, _, _, g = _stat_problem(7, 1)
    tokens, _ = dk.draft_sample_block(rows.repeat(TRIALS, 1, 1), torch.zeros(TRIALS, dtype=torch.int32),
                                      temperature=1.3, seed=torch.randint(0, 2**62, (TRIALS,), generator=g),
                                      offset=torch.arange(TRIALS), return_logits=False, backend=_stat_backend())
    chi2_check(tokens[:, 0], softmax64(rows[0].tolist(), 1.3), "softmax(base / T)")


@pytest.mark.parametrize("mode", ["markov", "markov-filters", "plain", "shared-noise-probe"])
def test_end_to_end_draft_then_verify_is_lossless(mode):
    """Drafts sampled by draft_sample_block and verified by verify_block with the
    returned logits: the emitted tokens follow the target, position by position. The
    same seed and offset feed both ops (only the salts differ), so shared noise between
    the draft and the verify streams would bias these counts."""
    if _stat_backend() == "reference":
        pytest.skip("statistical tests need the cpu backend")
    vocab, gamma, temp = 6, 2, 0.9
    rows, w1, w2, g = _stat_problem(vocab, gamma)
    target = torch.randn(gamma + 1, vocab, generator=g) * 1.5
    if mode == "shared-noise-probe":
        # q and p chosen so that reusing the draft's Gumbel noise for the residual (or
        # its words for the accept coin) skews the output by chi2 ~ 1e3 at 1e5 trials:
        # the residual's support {2, 3} has very different q.
        vocab, gamma, temp = 4, 1, 1.0
        rows = torch.tensor([[0.5, 0.3, 0.19, 0.01]]).log()
        target = torch.tensor([0.1, 0.1, 0.4, 0.4]).log().repeat(2, 1)
    filt = dict(top_k=4, top_p=0.85) if mode == "markov-filters" else dict(top_k=0, top_p=1.0)
    markov = dict(markov_w1=w1, markov_w2=w2) if mode.startswith("markov") else {}
    trials = TRIALS
    seed = torch.randint(0, 2**62, (trials,), generator=g)
    offset = torch.randint(0, 2**40, (trials,), generator=g)
    drafts, dlogits = dk.draft_sample_block(rows.repeat(trials, 1, 1), torch.full((trials,), 1, dtype=torch.int32),
                                            **markov, temperature=temp, **filt, seed=seed, offset=offset,
                                            backend=_stat_backend())
    cu = torch.arange(0, gamma * trials + 1, gamma, dtype=torch.int32)
    target_rows = target.repeat(trials, 1)
    out, acc = dk.verify_block(target_rows, drafts.reshape(-1), cu, draft_logits=dlogits.reshape(-1, vocab),
                               temperature=temp, **filt, seed=seed, offset=offset, max_num_draft=gamma,
                               backend=_stat_backend())
    p = [softmax64(r.tolist(), temp, filt["top_k"], filt["top_p"]) for r in target]
    chi2_check(out[:, 0], p[0], f"{mode}: first emitted token")
    first_accepted = acc >= 1
    chi2_check(out[first_accepted, 1], p[1], f"{mode}: {'bonus' if gamma == 1 else 'second'} token | first accepted")
    both = acc >= 2
    if gamma >= 2 and int(both.sum()) > 2000:
        chi2_check(out[both, 2], p[2], f"{mode}: bonus token | both accepted")
    # Acceptance of the first draft: sum_v min(p0, q0) with q0 the drafted distribution.
    q0 = softmax64(((rows[0] + w1[1] @ w2) if markov else rows[0]).tolist(), temp, filt["top_k"], filt["top_p"])
    expected = sum(min(a, b) for a, b in zip(p[0], q0))
    rate = float(first_accepted.double().mean())
    assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / trials) + 1e-12, (rate, expected)


# --------------------------------------------------------------------------
# Bad inputs, data checks, opcheck, compile


def _good():
    base, anchor, kwargs = make_inputs(2, 3, 10, rank=2, seed=71)
    return [base, anchor], kwargs


BAD_CASES = [
    ("base_logits", lambda a, k: a.__setitem__(0, a[0][0])),
    ("base_logits", lambda a, k: a.__setitem__(0, a[0].to(torch.int32))),
    ("anchor", lambda a, k: a.__setitem__(1, a[1].float())),
    ("anchor", lambda a, k: a.__setitem__(1, a[1][:1])),
    ("markov_w1", lambda a, k: k.pop("markov_w2")),
    ("markov_w1", lambda a, k: k.update(markov_w1=k["markov_w1"][:5])),
    ("markov_w2", lambda a, k: k.update(markov_w2=k["markov_w2"][:, :5])),
    ("markov_w2", lambda a, k: k.update(markov_w2=k["markov_w2"].half())),
    ("temperature", lambda a, k: k.update(temperature=torch.ones(3))),
    ("top_k", lambda a, k: k.update(top_k=torch.ones(2))),
    ("seed", lambda a, k: k.update(seed=torch.ones(3, dtype=torch.int64))),
    ("offset", lambda a, k: k.update(offset=torch.ones(2))),
]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("name,mutate", BAD_CASES)
def test_bad_input_names_the_argument(backend, name, mutate):
    args, kwargs = _good()
    mutate(args, kwargs)
    device = backend_device(backend) if backend != "reference" else "cpu"
    args = [a.to(device) for a in args]
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.draft_sample_block(*args, **kwargs, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + [b for b in BACKENDS if backend_device(b) == "cpu"])
def test_anchor_out_of_range_is_an_error_on_cpu(backend):
    args, kwargs = _good()
    args[1] = args[1].clone()
    args[1][1] = 10
    with pytest.raises((ValueError, RuntimeError), match="anchor"):
        dk.draft_sample_block(*args, **kwargs, backend=backend)


def test_direct_op_call_checks_arguments():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    args, kwargs = _good()
    with pytest.raises(RuntimeError, match="markov_w2"):
        torch.ops.dspark.draft_sample_block(*args, markov_w1=kwargs["markov_w1"], markov_w2=kwargs["markov_w2"][:1],
                                            seed=kwargs["seed"], offset=kwargs["offset"])


def test_opcheck():
    args, kwargs = _good()
    kwargs = dict(kwargs, top_k=torch.tensor([0, 3], dtype=torch.int32), top_p=torch.tensor([0.9, 1.0]))
    torch.library.opcheck(torch.ops.dspark.draft_sample_block.default, tuple(args), kwargs)
    plain = {k: v for k, v in kwargs.items() if not k.startswith("markov")}
    torch.library.opcheck(torch.ops.dspark.draft_sample_block.default, tuple(args), dict(plain, return_logits=False))


def test_torch_compile_fullgraph():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built (the reference is not traceable)")
    (base, anchor), kwargs = _good()

    def step(base, anchor, w1, w2, temperature, seed, offset):
        return dk.draft_sample_block(base, anchor, markov_w1=w1, markov_w2=w2, temperature=temperature, seed=seed,
                                     offset=offset)

    call = (base, anchor, kwargs["markov_w1"], kwargs["markov_w2"], kwargs["temperature"], kwargs["seed"],
            kwargs["offset"])
    eager = step(*call)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*call)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


# --------------------------------------------------------------------------
# The Triton kernels compile for the GPU (sm_90) even where none is present


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts programs the compiler rejects: compile both drafting ops'
    kernels ahead of time for sm_90 with the wrappers' GPU configurations (a
    subprocess, since the interpreter replaces the JIT); no kernel may spill."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = Path(__file__).resolve().parent / "aot_compile_drafting.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "No module named 'triton.backends" in proc.stderr):
        pytest.skip(f"no usable Triton CUDA backend here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_bench_draft_quick(tmp_path):
    """`dspark-bench draft --quick` runs, checks every backend and writes JSON."""
    import json

    from dspark_kernels.bench.__main__ import main

    js = tmp_path / "draft.json"
    rc = main(["draft", "--quick", "--json", str(js), "--device", "cpu", "--quiet", "--max-time", "0.005",
               "--threads", "1"])
    assert rc == 0
    cases = json.loads(js.read_text())["cases"]
    assert {c["mode"] for c in cases} == {"parallel", "markov"} and {c["batch"] for c in cases} == {1, 4}
    for c in cases:
        assert c["status"] in ("ok", "skipped", "n/a"), c
        assert c["correct"] is not False, c
        if c["status"] == "ok":
            assert c["bytes"] > 0 and c["median_s"] > 0
    assert any(c["backend"] == "reference" and c["status"] == "ok" for c in cases)


# --------------------------------------------------------------------------
# On a GPU (bench/gpu_check.sh runs `-m cuda`)

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in BACKENDS]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_equals_cpu_at_model_shapes(backend):
    """Real vocabularies and rank: tokens equal the cpu backend's (weights on a 1/8 grid:
    every summation order is exact), fp32 and bf16, with and without filters."""
    ref_backend = "cpu" if "cpu" in BACKENDS else "reference"
    for vocab, batch, gamma, rank, filt in ((151936, 4, 5, 256, False), (129280, 16, 7, 256, False),
                                           (32000, 3, 3, 64, True), (151936, 2, 5, 0, False),
                                           (262144, 33, 7, 0, True)):
        kw = dict(top_k=torch.tensor([50] * batch, dtype=torch.int32), top_p=torch.full((batch,), 0.9)) if filt \
            else {}
        base, anchor, kwargs = make_inputs(batch, gamma, vocab, rank=rank, seed=vocab + batch, **kw)
        for dtype in (torch.float32, torch.bfloat16):
            b = base.to(dtype)
            kwd = dict(kwargs)
            if rank:
                kwd.update(markov_w1=kwargs["markov_w1"].to(dtype), markov_w2=kwargs["markov_w2"].to(dtype))
            ref = run(ref_backend, b, anchor, kwd)
            got = run(backend, b, anchor, kwd)
            assert torch.equal(got[0], ref[0]), (vocab, batch, gamma, rank, filt, dtype)
            assert torch.equal(got[1], ref[1]), (vocab, batch, gamma, rank, filt, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("rank", [0, 256])
def test_gpu_captures_in_a_cuda_graph(backend, rank):
    base, anchor, kwargs = make_inputs(8, 7, 151936, rank=rank, seed=5)
    dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    base_d, anchor_d = base.cuda(), anchor.cuda()

    def call():
        return dk.draft_sample_block(base_d, anchor_d, **dev, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, logits = call()
    for step in range(3):
        dev["offset"].add_(1)
        graph.replay()
        torch.cuda.synchronize()
        host = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in dev.items()}
        ref = run("cpu" if "cpu" in BACKENDS else "reference", base, anchor, host)
        assert torch.equal(tokens.cpu(), ref[0]), step
