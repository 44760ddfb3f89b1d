"""verify_block: reference against an fp64 oracle, statistics, backend equality,
edge cases, bad inputs, opcheck and torch.compile (docs/verification.md, docs/correctness.md)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import available_backends, backend_device
from helpers import chi2_check, make_verify_inputs, softmax64

import dspark_kernels as dk
from dspark_kernels.reference import philox
from dspark_kernels.reference.sampling import mass_fraction_bits

BACKENDS = available_backends()  # cpu, and triton / cuda where they can run
SIZES_V = [1, 2, 7, 129, 769]
MODES = ["greedy", "point", "probs", "logits"]


def _run(backend, args, kwargs, **extra):
    device = backend_device(backend)
    args = tuple(a.to(device) for a in args)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    out, acc = dk.verify_block(*args, **kwargs, backend=backend, **extra)
    return out.cpu(), acc.cpu()


def _mode_kwargs(mode):
    if mode == "greedy":
        return dict(draft="point")
    return dict(draft=mode, temperature=torch.tensor([0.7, 1.0, 1.3, 0.9, 2.0, 0.5, 1.0, 1.1]))


def _inputs(num_draft, vocab, mode, seed, dtype=torch.float32, **kw):
    mk = _mode_kwargs(mode)
    if "temperature" in mk:
        mk["temperature"] = mk["temperature"][: len(num_draft)]
        if len(num_draft) > 8:
            mk["temperature"] = torch.rand(len(num_draft), generator=torch.Generator().manual_seed(seed)) + 0.3
    mk.update(kw)
    return make_verify_inputs(num_draft, vocab, dtype=dtype, seed=seed, accept_bias=3.0, **mk)


# --------------------------------------------------------------------------
# The reference against an independent fp64 oracle


def _oracle_verify(target, drafts, cu, b, temperature, top_k, top_p, seed, offset, draft_logits=None,
                   draft_probs=None):
    """Re-derive request b's outputs in fp64 with the same random words."""
    start, n = int(cu[b]), int(cu[b + 1] - cu[b])
    vocab = target.shape[1]
    if not temperature > 0:
        out = []
        for i in range(n + 1):
            row = target[start + b + i].tolist()
            am = max(range(vocab), key=lambda v: (row[v], -v))
            if i < n and int(drafts[start + i]) == am:
                out.append(am)
                continue
            return out + [am], len(out)
    out = []
    for i in range(n + 1):
        p = softmax64(target[start + b + i].tolist(), temperature, top_k, top_p)
        noise = philox.gumbels(seed, offset + i, philox.SALT_RESAMPLE, torch.arange(vocab)).double().tolist()
        if i == n:
            w = [math.log(x) if x > 0 else -math.inf for x in p]
            return out + [max(range(vocab), key=lambda v: (w[v] + noise[v], -v))], len(out)
        x = int(drafts[start + i])
        if draft_logits is not None:
            q = softmax64(draft_logits[start + i].tolist(), temperature, top_k, top_p)
        elif draft_probs is not None:
            q = draft_probs[start + i].double().tolist()
        else:
            q = [1.0 if v == x else 0.0 for v in range(vocab)]
        u = float(philox.uniforms(seed, offset + i, philox.SALT_ACCEPT, 0))
        q_ok = 0 < q[x] < math.inf  # else x was not drawn from q: rejected, sampled from p
        if p[x] > 0 and q_ok and u < p[x] / q[x]:
            out.append(x)
            continue
        r = [max(pv - qv, 0.0) for pv, qv in zip(p, q)]
        if sum(r) <= 0 or not q_ok:
            r = p
        w = [math.log(x) if x > 0 else -math.inf for x in r]
        return out + [max(range(vocab), key=lambda v: (w[v] + noise[v], -v))], len(out)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("filters", [None, "top_k", "top_p", "both"])
def test_reference_matches_fp64_oracle(mode, filters):
    if mode == "greedy" and filters:
        pytest.skip("filters do not change a greedy row")
    if mode == "probs" and filters:
        pytest.skip("draft_probs are used as given")
    rng = random.Random(hash((mode, filters)) & 0xFFFF)
    checked = 0
    for trial in range(12):
        vocab = rng.choice([1, 2, 3, 5, 8])
        num_draft = [rng.randint(0, 4) for _ in range(rng.randint(1, 4))]
        kw = {}
        if filters in ("top_k", "both"):
            kw["top_k"] = torch.tensor([rng.randint(0, vocab + 1) for _ in num_draft], dtype=torch.int32)
        if filters in ("top_p", "both"):
            kw["top_p"] = torch.tensor([rng.choice([0.3, 0.6, 0.9, 1.0]) for _ in num_draft])
        args, kwargs = _inputs(num_draft, vocab, mode, seed=trial, **kw)
        out, acc = dk.verify_block(*args, **kwargs, backend="reference")
        target, drafts, cu = args
        for b in range(len(num_draft)):
            t = float(kwargs["temperature"][b]) if "temperature" in kwargs else 0.0
            k = int(kw["top_k"][b]) if "top_k" in kw else 0
            p = float(kw["top_p"][b]) if "top_p" in kw else 1.0
            expect, n_acc = _oracle_verify(target, drafts, cu, b, t, k, p, int(kwargs["seed"][b]),
                                           int(kwargs["offset"][b]), kwargs.get("draft_logits"),
                                           kwargs.get("draft_probs"))
            assert int(acc[b]) == n_acc, (trial, b)
            assert out[b, : n_acc + 1].tolist() == expect, (trial, b)
            assert (out[b, n_acc + 1 :] == -1).all()
            checked += 1
    assert checked > 0


# --------------------------------------------------------------------------
# Statistics: the emitted tokens follow the target distribution (χ², ≥ 1e5 trials)

CHI2_FALSE_ALARM = 1e-6


def _stat_backend():
    # The CPU kernel equals the reference exactly (tested below), and runs 1e5 trials in a blink.
    return "cpu" if dk.backends("verify_block")["cpu"] else "reference"


STAT_TRIALS = 100_000


@pytest.mark.parametrize("mode", ["point", "probs", "logits", "filters"])
def test_emitted_tokens_follow_target(mode):
    """First token ~ p_0; second given the first draft was accepted ~ p_1; acceptance
    rate of the first draft = Σ min(p_0, q_0) (Σ q p for point-mass drafts)."""
    if _stat_backend() == "reference":
        pytest.skip("statistical tests need the cpu backend")
    g = torch.Generator().manual_seed(1234)
    vocab, gamma, trials, temp = 6, 2, STAT_TRIALS, 0.8
    target_rows = torch.randn(gamma + 1, vocab, generator=g) * 1.5
    draft_rows = target_rows[:gamma] + torch.randn(gamma, vocab, generator=g)
    top_k = 4 if mode == "filters" else 0
    top_p = 0.85 if mode == "filters" else 1.0
    p = [softmax64(r.tolist(), temp, top_k, top_p) for r in target_rows]
    if mode == "point":
        q = [[1.0 / vocab] * vocab for _ in range(gamma)]  # drafts uniform, given as point masses
    elif mode == "probs":
        q = torch.softmax(draft_rows.double(), -1).tolist()
    else:
        q = [softmax64(r.tolist(), temp, top_k, top_p) for r in draft_rows]
    qt = torch.tensor(q, dtype=torch.float64)
    drafts = torch.stack([torch.multinomial(qt[i], trials, replacement=True, generator=g) for i in range(gamma)], 1)
    kwargs = dict(temperature=temp, top_k=top_k, top_p=top_p,
                  seed=torch.randint(0, 2**62, (trials,), generator=g), offset=torch.zeros(trials, dtype=torch.int64))
    if mode == "probs":
        kwargs["draft_probs"] = qt.float().repeat(trials, 1)
    elif mode in ("logits", "filters"):
        kwargs["draft_logits"] = draft_rows.repeat(trials, 1)
    cu = torch.arange(0, gamma * trials + 1, gamma, dtype=torch.int32)
    out, acc = dk.verify_block(target_rows.repeat(trials, 1), drafts.reshape(-1).to(torch.int32), cu,
                               backend=_stat_backend(), **kwargs)
    chi2_check(out[:, 0], p[0], f"{mode}: first token")
    first_accepted = acc >= 1
    chi2_check(out[first_accepted, 1], p[1], f"{mode}: second token | first accepted")
    rate = float(first_accepted.double().mean())
    if mode == "point":  # the op sees q = one_hot(x): accepted with probability p(x)
        expected = sum(a * b for a, b in zip(p[0], q[0]))
    else:
        expected = sum(min(a, b) for a, b in zip(p[0], q[0]))
    sigma = math.sqrt(expected * (1 - expected) / trials)
    assert abs(rate - expected) < 5.0 * sigma + 1e-12, (rate, expected)


def test_greedy_rows_emit_argmax_and_ignore_randomness():
    args, kwargs = _inputs([3, 0, 5, 2], 50, "greedy", seed=3)
    out1, acc1 = dk.verify_block(*args, **kwargs, backend="reference")
    kwargs["seed"] = kwargs["seed"] + 1
    out2, acc2 = dk.verify_block(*args, **kwargs, backend="reference")
    assert torch.equal(out1, out2) and torch.equal(acc1, acc2)
    target, drafts, cu = args
    for b in range(4):
        row = int(cu[b]) + b + int(acc1[b])
        assert int(out1[b, acc1[b]]) == int(target[row].argmax())


# --------------------------------------------------------------------------
# Every backend equals the reference exactly

GRID = [
    ([2, 0, 3], 7),
    ([1], 1),
    ([0, 0], 5),
    ([4, 1, 0, 2, 3], 129),
    ([7, 7, 7], 769),
    ([3], 2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_draft,vocab", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backend_equals_reference(backend, mode, num_draft, vocab, dtype):
    args, kwargs = _inputs(num_draft, vocab, mode, seed=vocab + len(num_draft), dtype=dtype)
    ref = dk.verify_block(*args, **kwargs, backend="reference")
    got = _run(backend, args, kwargs)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (got, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["point", "logits"])
@pytest.mark.parametrize("vocab", [7, 129, 1000])
def test_backend_equals_reference_with_filters(backend, mode, vocab):
    rng = torch.Generator().manual_seed(vocab)
    num_draft = [3, 0, 2, 4, 1]
    top_k = torch.tensor([0, 1, 5, vocab, 3], dtype=torch.int32)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.7, 0.95])
    args, kwargs = _inputs(num_draft, vocab, mode, seed=vocab, top_k=top_k, top_p=top_p)
    kwargs["temperature"] = torch.rand(len(num_draft), generator=rng) + 0.5
    ref = dk.verify_block(*args, **kwargs, backend="reference")
    got = _run(backend, args, kwargs)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"] + (["triton"] if "triton" in BACKENDS else []))
def test_backend_equals_reference_bf16(backend):
    if backend == "triton" and backend_device(backend) == "cpu":
        pytest.skip("the Triton interpreter gets bf16 arithmetic wrong (triton #4972)")
    for mode in MODES:
        args, kwargs = _inputs([3, 1, 0, 5], 300, mode, seed=11, dtype=torch.bfloat16)
        ref = dk.verify_block(*args, **kwargs, backend="reference")
        got = _run(backend, args, kwargs)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), mode


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_shapes_equal_reference(backend):
    """Many random shapes, modes and per-row settings (a seeded sweep, hypothesis-style)."""
    rng = random.Random(2024)
    cases = 25 if backend_device(backend) == "cpu" and backend == "triton" else 60
    for case in range(cases):
        batch = rng.randint(1, 6)
        vocab = rng.choice([1, 2, 3, 7, 16, 33, 129, 500])
        num_draft = [rng.randint(0, 6) for _ in range(batch)]
        mode = rng.choice(MODES)
        kw = {}
        if mode != "greedy" and rng.random() < 0.5:
            kw["top_k"] = torch.tensor([rng.randint(-1, vocab + 1) for _ in range(batch)], dtype=torch.int32)
        if mode != "greedy" and rng.random() < 0.5:
            kw["top_p"] = torch.tensor([rng.choice([0.2, 0.5, 0.8, 0.99, 1.0]) for _ in range(batch)])
        args, kwargs = _inputs(num_draft, vocab, mode, seed=case, **kw)
        if mode != "greedy":  # mix greedy rows into sampled batches
            temps = torch.tensor([rng.choice([0.0, 0.5, 1.0, 1.7]) for _ in range(batch)])
            kwargs["temperature"] = temps
        # padding ids
        drafts = args[1].clone()
        if drafts.numel() and rng.random() < 0.3:
            drafts[rng.randrange(drafts.numel())] = -1
        args = (args[0], drafts, args[2])
        ref = dk.verify_block(*args, **kwargs, backend="reference")
        got = _run(backend, args, kwargs)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (case, mode, num_draft, vocab)


# --------------------------------------------------------------------------
# Edge cases of docs/correctness.md


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_all_rejected_when_target_gives_zero_probability(backend):
    args, kwargs = _inputs([3, 2], 10, "logits", seed=5)
    target, drafts, cu = args
    target = target.clone()
    for b in range(2):
        for i in range(int(cu[b + 1] - cu[b])):
            target[int(cu[b]) + b + i, drafts[int(cu[b]) + i]] = float("-inf")
    out, acc = _run(backend, (target, drafts, cu), kwargs)
    assert acc.tolist() == [0, 0]
    for b in range(2):
        emitted = int(out[b, 0])
        assert emitted != int(drafts[int(cu[b])]) and 0 <= emitted < 10
        assert (out[b, 1:] == -1).all()


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_all_accepted_when_p_equals_q(backend):
    num_draft = [4, 1, 3]
    args, kwargs = _inputs(num_draft, 33, "logits", seed=8)
    target, drafts, cu = args
    rows = torch.cat([torch.arange(int(cu[b]) + b, int(cu[b + 1]) + b) for b in range(3)])
    kwargs["draft_logits"] = target[rows].clone()  # p == q: every draft is accepted
    out, acc = _run(backend, args, kwargs)
    assert acc.tolist() == num_draft
    for b in range(3):
        assert out[b, : num_draft[b]].tolist() == drafts[int(cu[b]) : int(cu[b + 1])].tolist()
        assert 0 <= int(out[b, num_draft[b]]) < 33


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_zero_draft_probability_and_padding_are_rejected(backend):
    args, kwargs = _inputs([2, 2], 6, "probs", seed=9)
    target, drafts, cu = args
    probs = kwargs["draft_probs"].clone()
    probs[0, drafts[0]] = 0.0  # q(x) = 0: x was not drawn from q, rejected (docs: Non-finite input)
    kwargs["draft_probs"] = probs
    drafts = drafts.clone()
    drafts[2] = -1  # padding: always rejected, the row is sampled from p
    out, acc = _run(backend, (target, drafts, cu), kwargs)
    assert int(acc[0]) == 0 and 0 <= int(out[0, 0]) < 6
    assert int(acc[1]) == 0 and 0 <= int(out[1, 0]) < 6
    ref = dk.verify_block(target, drafts, cu, **kwargs, backend="reference")
    assert torch.equal(out, ref[0]) and torch.equal(acc, ref[1])


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_empty_batch_and_no_drafts(backend):
    target = torch.randn(3, 11)
    out, acc = _run(backend, (target, torch.zeros(0, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)),
                    dict(temperature=1.0, seed=1, offset=0), max_num_draft=2)
    assert out.shape == (3, 3) and acc.tolist() == [0, 0, 0]
    assert (out[:, 0] >= 0).all() and (out[:, 1:] == -1).all()


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_strided_inputs(backend):
    args, kwargs = _inputs([3, 2, 4], 64, "logits", seed=12)
    target, drafts, cu = args
    wide = torch.full((target.shape[0], 100), float("nan"))
    wide[:, 10:74] = target
    dl = kwargs["draft_logits"]
    wide_d = torch.full((dl.shape[0], 80), float("nan"))
    wide_d[:, 3:67] = dl
    strided = dict(kwargs, draft_logits=wide_d[:, 3:67])
    ref = dk.verify_block(*args, **kwargs, backend="reference")
    got = _run(backend, (wide[:, 10:74], drafts, cu), strided)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_cpu_accepts_column_strided_logits():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    args, kwargs = _inputs([3, 2], 40, "point", seed=13)
    target = args[0].t().contiguous().t()  # stride (1, rows)
    ref = dk.verify_block(*args, **kwargs, backend="reference")
    got = dk.verify_block(target, *args[1:], **kwargs, backend="cpu")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def _mass_rule_rows(vocab):
    """Two rows whose fixed-point mass (docs/verification.md, "Order-independent sums")
    differs from an fp64 and from an fp32 sequential sum. Row 0: one logit 0 and the
    rest at log(1.7 * 2^-K), each worth one unit 2^-K of Z, while 1 + 1.7 * 2^-K rounds
    in fp64 to 1 (K = 54 at V = 129) or to 1 + 2^-51 (K = 52 at V = 769), so an fp64
    sequential sum gives another lse. Row 1 (filtered by min-p 1e-30, which keeps every
    entry): one logit 1 and the rest at -16.3, whose exp(-17.3) = 3e-8 each round away
    when added to 1 in fp32 (an online fp32 sum gives lse = 1), while their integer
    masses add up to lse = 1 + log(1 + (V - 1) 3e-8)."""
    bits = mass_fraction_bits(vocab)
    logits = torch.full((2, vocab), math.log(1.7) - bits * math.log(2.0))
    logits[0, 0] = 0.0
    logits[1] = -16.3
    logits[1, 0] = 1.0
    return logits, dict(temperature=torch.ones(2), min_p=torch.tensor([0.0, 1e-30]))


@pytest.mark.parametrize("vocab", [129, 769])
def test_cpu_log_probs_follow_the_fixed_point_mass(vocab):
    """The CPU kernels' log-sum-exp is the reference's order-independent fixed-point rule,
    bit for bit, in the unfiltered and the filtered path (exp(0) = 1 and the dropped
    terms are exact, so the C library's exp and PyTorch's agree here)."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    logits, kw = _mass_rule_rows(vocab)
    tokens = torch.tensor([[0, 1, vocab - 1], [0, 1, vocab - 1]])
    rows = torch.tensor([[0, 0, 0], [1, 1, 1]])
    ref = dk.token_logprobs(logits, tokens, rows, **kw, backend="reference")
    got = dk.token_logprobs(logits, tokens, rows, **kw, backend="cpu")
    assert ref[0, 0] < 0.0 and ref[1, 0] < 0.0, ref  # the rows do test the rule
    assert torch.equal(got, ref), (got - ref).tolist()


@pytest.mark.parametrize("filters", ["none", "min_p", "top_k", "top_p"])
def test_cpu_log_probs_do_not_depend_on_the_column_order(filters):
    """Integer masses sum to the same bits in any order: permuting a row's columns
    permutes its log-probabilities exactly, on every path of row_stats."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    vocab, batch = 769, 6
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(batch, vocab, generator=gen) * 3.0
    kw = dict(temperature=torch.rand(batch, generator=gen) + 0.5)
    if filters == "min_p":
        kw["min_p"] = torch.full((batch,), 1e-4)
    if filters == "top_k":
        kw["top_k"] = torch.full((batch,), 500, dtype=torch.int32)
    if filters == "top_p":
        kw["top_p"] = torch.full((batch,), 0.9)
    tokens = torch.arange(vocab).repeat(batch, 1)
    rows = torch.arange(batch).unsqueeze(1).expand(batch, vocab).contiguous()
    base = dk.token_logprobs(logits, tokens, rows, **kw, backend="cpu")
    for seed in range(3):
        perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
        got = dk.token_logprobs(logits[:, perm].contiguous(), tokens, rows, **kw, backend="cpu")
        assert torch.equal(got, base[:, perm]), (filters, seed)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_batch_invariance(backend):
    """A request's outputs depend only on its own inputs, seed and offset."""
    num_draft = [3, 0, 5, 2, 4]
    args, kwargs = _inputs(num_draft, 50, "logits", seed=21)
    full = _run(backend, args, kwargs)
    target, drafts, cu = args
    perm = [3, 1, 4, 0, 2]
    rows, dr, dl, nd = [], [], [], []
    for b in perm:
        rows.append(target[int(cu[b]) + b : int(cu[b + 1]) + b + 1])
        dr.append(drafts[int(cu[b]) : int(cu[b + 1])])
        dl.append(kwargs["draft_logits"][int(cu[b]) : int(cu[b + 1])])
        nd.append(num_draft[b])
    cu2 = torch.zeros(len(nd) + 1, dtype=torch.int32)
    cu2[1:] = torch.cumsum(torch.tensor(nd), 0)
    kw2 = dict(kwargs, draft_logits=torch.cat(dl), temperature=kwargs["temperature"][perm],
               seed=kwargs["seed"][perm], offset=kwargs["offset"][perm])
    out2, acc2 = _run(backend, (torch.cat(rows), torch.cat(dr), cu2), kw2)
    for j, b in enumerate(perm):
        assert int(acc2[j]) == int(full[1][b])
        assert out2[j, : num_draft[b] + 1].tolist() == full[0][b, : num_draft[b] + 1].tolist()


def test_same_seed_same_result_and_offsets_change_it():
    args, kwargs = _inputs([5] * 8, 20, "point", seed=30)
    a = dk.verify_block(*args, **kwargs, backend="reference")
    b = dk.verify_block(*args, **kwargs, backend="reference")
    assert torch.equal(a[0], b[0])
    c = dk.verify_block(*args, **dict(kwargs, offset=kwargs["offset"] + 1), backend="reference")
    assert not torch.equal(a[0], c[0])


def test_seed_none_is_reproducible_under_manual_seed():
    args, kwargs = _inputs([3, 3], 30, "point", seed=31)
    kwargs.pop("seed")
    torch.manual_seed(7)
    a = dk.verify_block(*args, **kwargs)
    torch.manual_seed(7)
    b = dk.verify_block(*args, **kwargs)
    assert torch.equal(a[0], b[0])


@pytest.mark.slow
def test_cpu_64bit_addressing_past_2_31_elements():
    """Request 1's rows start past 2^31 elements (T * V > 2^31): 64-bit offsets."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    vocab = 262144
    rows = (2**31 // vocab) + 6  # 8198 rows, 4.3 GB in fp16
    try:
        target = torch.empty(rows, vocab, dtype=torch.float16)  # untouched pages cost nothing
    except RuntimeError:
        pytest.skip("not enough memory")
    n0 = rows - 2 - 3  # request 0: all drafts but the first are never read (rejected at once)
    g = torch.Generator().manual_seed(0)
    drafts = torch.randint(0, vocab, (n0 + 3,), generator=g, dtype=torch.int32)
    target[0] = torch.randn(vocab, generator=g).half()
    target[0, drafts[0]] = -30.0  # greedy: rejected at position 0
    tail = target[n0 + 1 :]  # request 1's 4 rows, past 2^31 elements
    assert (n0 + 1) * vocab > 2**31
    tail.copy_(torch.randn(tail.shape, generator=g).half())
    for i in range(2):
        tail[i, drafts[n0 + i]] = 40.0  # accept two drafts, reject the third
    cu = torch.tensor([0, n0, n0 + 3], dtype=torch.int32)
    for temperature in (0.0, 1.0):
        out, acc = dk.verify_block(target, drafts, cu, temperature=temperature, seed=1, offset=0,
                                   max_num_draft=n0, backend="cpu")
        assert int(acc[1]) == 2 and out[1, :2].tolist() == drafts[n0 : n0 + 2].tolist()
        if temperature == 0.0:
            assert int(acc[0]) == 0 and int(out[0, 0]) == int(target[0].float().argmax())
            assert int(out[1, 2]) == int(tail[2].float().argmax())


# --------------------------------------------------------------------------
# Bad inputs name the argument; the op is well-formed for the compiler


def _good():
    args, kwargs = _inputs([2, 1], 10, "logits", seed=40)
    return list(args), kwargs


BAD_CASES = [
    ("target_logits", lambda a, k: (a.__setitem__(0, a[0][:, :, None]), k)),
    ("target_logits", lambda a, k: (a.__setitem__(0, a[0].to(torch.int32)), k)),
    ("target_logits", lambda a, k: (a.__setitem__(0, a[0][:-1]), k)),
    ("draft_tokens", lambda a, k: (a.__setitem__(1, a[1].float()), k)),
    ("draft_tokens", lambda a, k: (a.__setitem__(1, a[1][None]), k)),
    ("cu_num_draft", lambda a, k: (a.__setitem__(2, a[2].float()), k)),
    ("draft_logits", lambda a, k: (a, k.update(draft_logits=k["draft_logits"][:, :5]))),
    ("draft_logits or draft_probs", lambda a, k: (a, k.update(draft_probs=k["draft_logits"]))),
    ("temperature", lambda a, k: (a, k.update(temperature=torch.ones(5)))),
    ("top_k", lambda a, k: (a, k.update(top_k=torch.ones(2)))),
    ("seed", lambda a, k: (a, k.update(seed=torch.ones(3, dtype=torch.int64)))),
    ("offset", lambda a, k: (a, k.update(offset=torch.ones(2)))),
]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("name,mutate", BAD_CASES)
def test_bad_input_names_the_argument(backend, name, mutate):
    args, kwargs = _good()
    mutate(args, kwargs)
    device = backend_device(backend)
    args = [a.to(device) for a in args]
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.verify_block(*args, **kwargs, backend=backend)


DATA_CASES = [
    ("draft_tokens", lambda a: a[1].__setitem__(0, 10)),
    ("draft_tokens", lambda a: a[1].__setitem__(0, -2)),
    ("cu_num_draft", lambda a: a[2].__setitem__(0, 1)),
    ("max_num_draft", None),
]


@pytest.mark.parametrize("backend", ["reference"] + [b for b in BACKENDS if backend_device(b) == "cpu"])
@pytest.mark.parametrize("name,mutate", DATA_CASES)
def test_data_dependent_checks_on_cpu(backend, name, mutate):
    args, kwargs = _good()
    args = [a.clone() for a in args]
    extra = {}
    if mutate is None:
        extra["max_num_draft"] = 1
    else:
        mutate(args)
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.verify_block(*args, **kwargs, backend=backend, **extra)


def test_direct_op_call_checks_arguments():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    args, kwargs = _good()
    with pytest.raises(RuntimeError, match="draft_logits"):
        torch.ops.dspark.verify_block(*args, draft_logits=kwargs["draft_logits"][:1], seed=kwargs["seed"],
                                      offset=kwargs["offset"], max_num_draft=2)


def test_unknown_backend_is_rejected():
    args, kwargs = _good()
    with pytest.raises(ValueError, match="backend"):
        dk.verify_block(*args, **kwargs, backend="tpu")


def test_opcheck():
    args, kwargs = _inputs([2, 0, 3], 17, "logits", seed=50)
    kwargs = dict(kwargs, temperature=torch.tensor([1.0, 0.0, 0.7]), top_k=torch.tensor([0, 3, 5], dtype=torch.int32),
                  top_p=torch.tensor([1.0, 0.9, 0.8]), max_num_draft=4)
    torch.library.opcheck(torch.ops.dspark.verify_block.default, args, kwargs)
    args2, kwargs2 = _inputs([1, 4], 9, "probs", seed=51)
    torch.library.opcheck(torch.ops.dspark.verify_block.default, args2, dict(kwargs2, max_num_draft=4))
    torch.library.opcheck(torch.ops.dspark.random_words.default,
                          (torch.arange(5), torch.arange(5) * 3, torch.arange(5) + 9, philox.SALT_DRAFT))


def test_torch_compile_fullgraph():
    args, kwargs = _inputs([2, 3, 1], 40, "logits", seed=60)

    def step(target, drafts, cu, draft_logits, temperature, seed, offset):
        return dk.verify_block(target, drafts, cu, draft_logits=draft_logits, temperature=temperature, seed=seed,
                               offset=offset, max_num_draft=3)

    call = (*args, kwargs["draft_logits"], kwargs["temperature"], kwargs["seed"], kwargs["offset"])
    eager = step(*call)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*call)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
