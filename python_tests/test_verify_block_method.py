"""verify_block(method="block"): block verification (Sun et al. 2024), docs/verification.md.

* an exact fp64 oracle (enumeration over every draft block): the emitted sequence,
  continued by the target, has exactly the target's sequential law; the expected
  accepted length is >= token-wise on the same (p, q);
* the reference's h_j against the oracle's;
* χ² losslessness of the op (draft_logits, draft_probs, point masses): the first
  emitted token, the second given the first, the accepted length against its exact law;
* every backend equals the reference exactly; method="token" unchanged; bad methods.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import defaultdict

import pytest
import torch
from conftest import available_backends, backend_device
from helpers import chi2_check, make_verify_inputs, softmax64

import dspark_kernels as dk
from dspark_kernels.reference import verify_block as ref_vb

BACKENDS = available_backends()
MODES = ["greedy", "point", "probs", "logits"]


# --------------------------------------------------------------------------
# The exact fp64 oracle (independent of dspark_kernels): distributions may depend on
# the prefix, p(prefix) for len(prefix) <= gamma, q(prefix) for len(prefix) < gamma.


def _block_h(p_fn, q_fn, x, gamma):
    """rho_0..rho_gamma, h_1..h_gamma (h[0] = 1) and the residuals r_j = max(rho_j p_j - q_j, 0)."""
    rho = [1.0]
    for i in range(gamma):
        a, b = p_fn(x[:i])[x[i]], q_fn(x[:i])[x[i]]
        rho.append(0.0 if a == 0 or rho[-1] == 0 else (1.0 if b == 0 else min(1.0, rho[-1] * a / b)))
    h = [1.0] * (gamma + 1)
    resid = [None] * (gamma + 1)
    for j in range(gamma):
        resid[j] = [max(rho[j] * a - b, 0.0) for a, b in zip(p_fn(x[:j]), q_fn(x[:j]))]
        if j >= 1:
            z = sum(resid[j])
            h[j] = 1.0 if rho[j] >= 1.0 else z / (z + (1.0 - rho[j]))
    if gamma >= 1:
        h[gamma] = rho[gamma]
    return rho, h, resid


def block_law(p_fn, q_fn, gamma, vocab, blocks=None):
    """Exact law of the emitted sequence (tuple -> probability) and of tau under block
    verification; `blocks` (x -> weight) replaces drafting from q (point-mass drafts)."""
    law = defaultdict(float)
    tau_law = [0.0] * (gamma + 1)
    if blocks is None:
        blocks = {}
        for x in itertools.product(range(vocab), repeat=gamma):
            w = math.prod(q_fn(x[:i])[x[i]] for i in range(gamma))
            if w > 0:
                blocks[x] = w
    for x, w in blocks.items():
        rho, h, resid = _block_h(p_fn, q_fn, x, gamma)
        for j in range(gamma + 1):
            pt = math.prod(1.0 - h[k] for k in range(j + 1, gamma + 1)) * h[j]
            if pt <= 0:
                continue
            tau_law[j] += w * pt
            if j == gamma:
                y = p_fn(x)
            else:
                z = sum(resid[j])
                assert z > 0, "stopping at a residual without mass"
                y = [r / z for r in resid[j]]
            for v in range(vocab):
                if y[v] > 0:
                    law[x[:j] + (v,)] += w * pt * y[v]
    return law, tau_law


def _token_expected_length(p_fn, q_fn, gamma, vocab):
    e = 0.0
    for i in range(1, gamma + 1):
        for x in itertools.product(range(vocab), repeat=i):
            w = 1.0
            for k in range(i):
                a, b = p_fn(x[:k])[x[k]], q_fn(x[:k])[x[k]]
                w *= min(a, b)
            e += w
    return e


def _assert_target_law(law, p_fn, gamma, vocab, tol=1e-12):
    """The emitted sequence continued by the target is the target's sequential law."""
    for z in itertools.product(range(vocab), repeat=gamma + 1):
        target = math.prod(p_fn(z[:k])[z[k]] for k in range(gamma + 1))
        got = 0.0
        for ell in range(1, gamma + 2):
            got += law.get(z[:ell], 0.0) * math.prod(p_fn(z[:k])[z[k]] for k in range(ell, gamma + 1))
        assert abs(got - target) <= tol, (z, got, target)


def _random_dists(rng, gamma, vocab, zeros=True):
    cache = {}

    def make(key):
        if key not in cache:
            w = [math.exp(rng.gauss(0, 1.5)) for _ in range(vocab)]
            if zeros and vocab > 1 and rng.random() < 0.3:
                w[rng.randrange(vocab)] = 0.0
            s = sum(w)
            cache[key] = [x / s for x in w]
        return cache[key]

    return (lambda pre: make(("p", pre))), (lambda pre: make(("q", pre)))


@pytest.mark.parametrize("gamma", [0, 1, 2, 3])
@pytest.mark.parametrize("vocab", [1, 2, 3, 4])
def test_oracle_block_verification_is_lossless(gamma, vocab):
    rng = random.Random(1000 * gamma + vocab)
    for _ in range(4):
        p_fn, q_fn = _random_dists(rng, gamma, vocab)
        law, tau_law = block_law(p_fn, q_fn, gamma, vocab)
        assert abs(sum(law.values()) - 1.0) < 1e-12 and abs(sum(tau_law) - 1.0) < 1e-12
        _assert_target_law(law, p_fn, gamma, vocab)


@pytest.mark.parametrize("gamma", [1, 2, 3])
@pytest.mark.parametrize("vocab", [2, 3, 4])
def test_oracle_point_mass_drafts_are_lossless(gamma, vocab):
    """Every fixed block, given as point masses (closed form rho (1 - p(x))), is lossless."""
    rng = random.Random(7 * gamma + vocab)
    p_fn, _ = _random_dists(rng, gamma, vocab)
    for x in itertools.product(range(vocab), repeat=gamma):
        def q_fn(pre, x=x):
            return [1.0 if v == x[len(pre)] else 0.0 for v in range(vocab)]
        law, _ = block_law(p_fn, q_fn, gamma, vocab, blocks={x: 1.0})
        _assert_target_law(law, p_fn, gamma, vocab)
        # the closed form of the residual mass
        rho, h, resid = _block_h(p_fn, q_fn, x, gamma)
        for j in range(1, gamma):
            assert abs(sum(resid[j]) - rho[j] * (1 - p_fn(x[:j])[x[j]])) < 1e-15


@pytest.mark.parametrize("gamma", [1, 2, 3])
@pytest.mark.parametrize("vocab", [2, 3, 4])
def test_oracle_expected_length_at_least_token_wise(gamma, vocab):
    rng = random.Random(31 * gamma + vocab)
    gains = []
    for _ in range(6):
        p_fn, q_fn = _random_dists(rng, gamma, vocab)
        _, tau_law = block_law(p_fn, q_fn, gamma, vocab)
        block = sum(j * w for j, w in enumerate(tau_law))
        token = _token_expected_length(p_fn, q_fn, gamma, vocab)
        assert block >= token - 1e-12, (block, token)
        if gamma == 1:
            assert abs(block - token) < 1e-12  # one draft: the same rule
        gains.append(block - token)
    if gamma >= 2:
        assert max(gains) > 1e-6  # strictly longer somewhere


def test_reference_acceptance_probabilities_match_oracle():
    """The reference's rho_j and h_j (fp32 / fp64) against the fp64 oracle."""
    rng = random.Random(5)
    gamma, vocab = 3, 4
    for _ in range(20):
        p_fn, q_fn = _random_dists(rng, gamma, vocab, zeros=False)
        x = tuple(rng.randrange(vocab) for _ in range(gamma))
        rho, h, _ = _block_h(p_fn, q_fn, x, gamma)
        lr = 0.0
        for j in range(1, gamma):
            lp = float(math.log(p_fn(x[: j - 1])[x[j - 1]]))
            lq = float(math.log(q_fn(x[: j - 1])[x[j - 1]]))
            lr = ref_vb.block_ratio_step(lr, lp, lq)
            assert abs(math.exp(lr) - rho[j]) < 1e-5 * max(rho[j], 1e-3)
            log_p = torch.tensor([math.log(v) for v in p_fn(x[:j])], dtype=torch.float32)
            q = torch.tensor(q_fn(x[:j]), dtype=torch.float32)
            z = ref_vb.block_residual_mass(lr, log_p, q, x[j])
            assert abs(ref_vb.block_accept_prob(lr, z) - h[j]) < 1e-5


# --------------------------------------------------------------------------
# χ²: the op is lossless (≥ 1e5 trials, false alarm 1e-6)

STAT_TRIALS = 100_000


def _stat_backend():
    # The CPU kernel equals the reference exactly (tested below) and runs 1e5 trials fast.
    return "cpu" if dk.backends("verify_block")["cpu"] else "reference"


@pytest.mark.parametrize("mode", ["point", "probs", "logits", "filters"])
def test_block_method_is_lossless_chi2(mode):
    if _stat_backend() == "reference":
        pytest.skip("statistical tests need the cpu backend (equal to the reference, tested here)")
    g = torch.Generator().manual_seed(4321)
    vocab, gamma, trials, temp = 5, 3, STAT_TRIALS, 0.9
    target_rows = torch.randn(gamma + 1, vocab, generator=g) * 1.5
    draft_rows = target_rows[:gamma] + torch.randn(gamma, vocab, generator=g) * 1.2
    top_k = 4 if mode == "filters" else 0
    top_p = 0.9 if mode == "filters" else 1.0
    p = [softmax64(r.tolist(), temp, top_k, top_p) for r in target_rows]
    if mode == "point":
        r = [[1.0 / vocab] * vocab for _ in range(gamma)]  # drafted uniformly, seen as point masses
        q = None
    elif mode == "probs":
        q = torch.softmax(draft_rows.double(), -1).float().double().tolist()
        r = q
    else:
        q = [softmax64(row.tolist(), temp, top_k, top_p) for row in draft_rows]
        r = q
    rt = torch.tensor(r, dtype=torch.float64)
    drafts = torch.stack([torch.multinomial(rt[i], trials, replacement=True, generator=g) for i in range(gamma)], 1)
    kwargs = dict(temperature=temp, top_k=top_k, top_p=top_p,
                  seed=torch.randint(0, 2**62, (trials,), generator=g),
                  offset=torch.randint(0, 2**40, (trials,), generator=g))
    if mode == "probs":
        kwargs["draft_probs"] = torch.tensor(q, dtype=torch.float32).repeat(trials, 1)
    elif mode in ("logits", "filters"):
        kwargs["draft_logits"] = draft_rows.repeat(trials, 1)
    cu = torch.arange(0, gamma * trials + 1, gamma, dtype=torch.int32)
    out, acc = dk.verify_block(target_rows.repeat(trials, 1), drafts.reshape(-1).to(torch.int32), cu,
                               backend=_stat_backend(), method="block", **kwargs)
    chi2_check(out[:, 0], p[0], f"{mode}: first token")
    two = acc >= 1  # the emitted sequence has a second token
    chi2_check(out[two, 1], p[1], f"{mode}: second token | a second token")
    top = int(torch.mode(out[two, 0]).values)
    chi2_check(out[two & (out[:, 0] == top), 1], p[1], f"{mode}: second token | first = {top}")
    chi2_check(out[acc >= 2, 2], p[2], f"{mode}: third token | a third token")
    # the accepted length against its exact law
    p_fn = lambda pre: p[len(pre)]  # noqa: E731
    if q is None:
        blocks = {x: vocab ** -gamma for x in itertools.product(range(vocab), repeat=gamma)}
        tau_law = [0.0] * (gamma + 1)
        for x, w in blocks.items():
            qx = lambda pre, x=x: [1.0 if v == x[len(pre)] else 0.0 for v in range(vocab)]  # noqa: E731
            _, tl = block_law(p_fn, qx, gamma, vocab, blocks={x: w})
            tau_law = [a + b for a, b in zip(tau_law, tl)]
    else:
        _, tau_law = block_law(p_fn, lambda pre: q[len(pre)], gamma, vocab)
    chi2_check(acc, tau_law, f"{mode}: accepted length")
    if q is not None:
        token = _token_expected_length(p_fn, lambda pre: q[len(pre)], gamma, vocab)
        assert float(acc.double().mean()) > token  # longer than token-wise on this (p, q)


def test_block_method_conditional_law_given_block_chi2():
    """For one fixed draft block, the joint law of (tau, emitted token) is the oracle's."""
    if _stat_backend() == "reference":
        pytest.skip("statistical tests need the cpu backend")
    g = torch.Generator().manual_seed(99)
    vocab, gamma, trials = 4, 3, STAT_TRIALS
    target_rows = torch.randn(gamma + 1, vocab, generator=g)
    q = torch.softmax(torch.randn(gamma, vocab, generator=g), -1).float()
    x = (1, 2, 0)
    p = [softmax64(r.tolist(), 1.0) for r in target_rows]
    qd = q.double().tolist()
    law, _ = block_law(lambda pre: p[len(pre)], lambda pre: qd[len(pre)], gamma, vocab, blocks={x: 1.0})
    cu = torch.arange(0, gamma * trials + 1, gamma, dtype=torch.int32)
    out, acc = dk.verify_block(target_rows.repeat(trials, 1), torch.tensor(x, dtype=torch.int32).repeat(trials), cu,
                               draft_probs=q.repeat(trials, 1), temperature=1.0,
                               seed=torch.randint(0, 2**62, (trials,), generator=g), offset=0,
                               backend=_stat_backend(), method="block")
    code = acc.long() * vocab + out.gather(1, acc.long()[:, None])[:, 0].long()
    probs = [0.0] * ((gamma + 1) * vocab)
    for seq, w in law.items():
        probs[(len(seq) - 1) * vocab + seq[-1]] += w
    chi2_check(code, probs, "(tau, emitted) | block")


# --------------------------------------------------------------------------
# Every backend equals the reference exactly


def _run(backend, args, kwargs, **extra):
    device = backend_device(backend)
    args = tuple(a.to(device) for a in args)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    out, acc = dk.verify_block(*args, **kwargs, backend=backend, **extra)
    return out.cpu(), acc.cpu()


def _case(rng, case, mode, vocab, batch, max_n=6):
    num_draft = [rng.randint(0, max_n) for _ in range(batch)]
    kw = {}
    if mode != "greedy":
        kw["temperature"] = torch.tensor([rng.choice([0.0, 0.5, 1.0, 1.7]) for _ in range(batch)])
        if rng.random() < 0.4:
            kw["top_k"] = torch.tensor([rng.randint(-1, vocab + 1) for _ in range(batch)], dtype=torch.int32)
        if rng.random() < 0.4:
            kw["top_p"] = torch.tensor([rng.choice([0.2, 0.5, 0.8, 0.99, 1.0]) for _ in range(batch)])
    args, kwargs = make_verify_inputs(num_draft, vocab, seed=case, accept_bias=rng.choice([0.0, 2.0, 4.0]),
                                      draft="point" if mode == "greedy" else mode, **kw)
    drafts = args[1].clone()
    if drafts.numel() and rng.random() < 0.4:
        drafts[rng.randrange(drafts.numel())] = -1
    return (args[0], drafts, args[2]), kwargs, num_draft


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_backends_equal_reference_random_sweep(backend):
    rng = random.Random(77)
    interp = backend == "triton" and backend_device(backend) == "cpu"
    cases = 16 if interp else 80
    for case in range(cases):
        mode = MODES[case % 4]
        vocab = rng.choice([1, 2, 3, 7, 16, 33, 129] + ([] if interp else [500, 1500]))
        args, kwargs, num_draft = _case(rng, case, mode, vocab, rng.randint(1, 5))
        ref = dk.verify_block(*args, **kwargs, backend="reference", method="block")
        got = _run(backend, args, kwargs, method="block")
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (case, mode, num_draft, vocab, got, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["point", "probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_backends_equal_reference_ragged(backend, mode, dtype):
    num_draft = [3, 0, 5, 1, 0, 4]
    args, kwargs = make_verify_inputs(num_draft, 41, dtype=dtype, seed=3, draft=mode, accept_bias=3.0,
                                      temperature=torch.tensor([1.0, 0.8, 0.0, 1.3, 0.0, 0.6]))
    drafts = args[1].clone()
    drafts[5] = -1  # request 2, position 2: its block ends there
    args = (args[0], drafts, args[2])
    ref = dk.verify_block(*args, **kwargs, backend="reference", method="block")
    got = _run(backend, args, kwargs, method="block")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (got, ref)


def test_block_greedy_rows_and_single_drafts_match_token():
    """Greedy rows are unchanged; with at most one draft the two methods are the same rule."""
    rng = random.Random(12)
    for case in range(20):
        mode = MODES[case % 4]
        args, kwargs, _ = _case(rng, case, mode, rng.choice([2, 7, 50]), rng.randint(1, 5), max_n=1)
        a = dk.verify_block(*args, **kwargs, backend="reference", method="block")
        b = dk.verify_block(*args, **kwargs, backend="reference", method="token")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), case
    for case in range(10):
        args, kwargs, _ = _case(rng, case, "greedy", 30, 4)
        for backend in ["reference"] + BACKENDS:
            a = _run(backend, args, kwargs, method="block")
            b = _run(backend, args, kwargs)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (backend, case)


def test_block_accepts_at_least_as_much_on_average():
    if _stat_backend() == "reference":
        pytest.skip("needs the cpu backend")
    args, kwargs = make_verify_inputs([4] * 3000, 20, seed=5, draft="logits", temperature=1.0, accept_bias=1.0)
    token = dk.verify_block(*args, **kwargs, backend="cpu")[1].double().mean()
    block = dk.verify_block(*args, **kwargs, backend="cpu", method="block")[1].double().mean()
    assert block >= token - 0.02, (float(block), float(token))


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_block_padding_ends_the_block(backend):
    """A -1 id ends the block: tokens after it are never accepted, its row is a bonus row."""
    args, kwargs = make_verify_inputs([4, 3], 9, seed=8, draft="logits", temperature=1.0)
    target, drafts, cu = args
    rows = torch.tensor([0, 1, 2, 3, 5, 6, 7])
    kwargs["draft_logits"] = target[rows].clone()  # p == q: every real draft is accepted
    drafts = drafts.clone()
    drafts[2] = -1
    drafts[4] = -1
    out, acc = _run(backend, (target, drafts, cu), kwargs, method="block")
    assert acc.tolist() == [2, 0]
    assert out[0, :2].tolist() == drafts[:2].tolist() and 0 <= int(out[0, 2]) < 9
    assert 0 <= int(out[1, 0]) < 9 and (out[1, 1:] == -1).all()


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_block_zero_target_probability_rejects_everything(backend):
    args, kwargs = make_verify_inputs([3, 2], 10, seed=5, draft="logits", temperature=1.0)
    target, drafts, cu = args
    target = target.clone()
    for b in range(2):
        for i in range(int(cu[b + 1] - cu[b])):
            target[int(cu[b]) + b + i, drafts[int(cu[b]) + i]] = float("-inf")
    out, acc = _run(backend, (target, drafts, cu), kwargs, method="block")
    ref = dk.verify_block(target, drafts, cu, **kwargs, backend="reference", method="block")
    assert acc.tolist() == [0, 0] and torch.equal(out, ref[0])
    for b in range(2):
        assert int(out[b, 0]) != int(drafts[int(cu[b])]) and (out[b, 1:] == -1).all()


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_block_zero_draft_probability_and_all_accepted(backend):
    """q(x) = 0 < p(x) sets rho = 1; p == q (rho stays 1, h = 1) accepts the whole block."""
    num_draft = [4, 1, 3]
    args, kwargs = make_verify_inputs(num_draft, 33, seed=8, draft="logits", temperature=1.0)
    target, drafts, cu = args
    rows = torch.cat([torch.arange(int(cu[b]) + b, int(cu[b + 1]) + b) for b in range(3)])
    kwargs["draft_logits"] = target[rows].clone()
    out, acc = _run(backend, args, kwargs, method="block")
    assert acc.tolist() == num_draft
    args2, kwargs2 = make_verify_inputs([3, 2], 6, seed=9, draft="probs", temperature=1.0, accept_bias=2.0)
    probs = kwargs2["draft_probs"].clone()
    probs[0, args2[1][0]] = 0.0
    kwargs2["draft_probs"] = probs
    ref = dk.verify_block(*args2, **kwargs2, backend="reference", method="block")
    got = _run(backend, args2, kwargs2, method="block")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_strided_inputs(backend):
    args, kwargs = make_verify_inputs([3, 2, 4], 64, seed=12, draft="logits", temperature=0.8, accept_bias=3.0)
    target, drafts, cu = args
    wide = torch.full((target.shape[0], 100), float("nan"))
    wide[:, 10:74] = target
    dl = kwargs["draft_logits"]
    wide_d = torch.full((dl.shape[0], 80), float("nan"))
    wide_d[:, 3:67] = dl
    ref = dk.verify_block(*args, **kwargs, backend="reference", method="block")
    got = _run(backend, (wide[:, 10:74], drafts, cu), dict(kwargs, draft_logits=wide_d[:, 3:67]), method="block")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if not (b == "triton" and backend_device(b) == "cpu")])
def test_block_bf16(backend):
    for mode in MODES:
        args, kwargs = make_verify_inputs([3, 1, 0, 5], 300, dtype=torch.bfloat16, seed=11, accept_bias=3.0,
                                          draft="point" if mode == "greedy" else mode,
                                          temperature=None if mode == "greedy" else 0.9)
        ref = dk.verify_block(*args, **kwargs, backend="reference", method="block")
        got = _run(backend, args, kwargs, method="block")
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), mode


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_block_empty_batch_and_no_drafts(backend):
    target = torch.randn(3, 11)
    out, acc = _run(backend, (target, torch.zeros(0, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)),
                    dict(temperature=1.0, seed=1, offset=0), max_num_draft=2, method="block")
    ref = dk.verify_block(target, torch.zeros(0, dtype=torch.int32), torch.zeros(4, dtype=torch.int32),
                          temperature=1.0, seed=1, offset=0, max_num_draft=2)
    assert torch.equal(out, ref[0]) and torch.equal(acc, ref[1])
    out, acc = _run(backend, (torch.randn(0, 5), torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)),
                    dict(temperature=1.0, seed=1, offset=0), max_num_draft=0, method="block")
    assert out.shape == (0, 1) and acc.shape == (0,)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_block_batch_invariance(backend):
    num_draft = [3, 0, 5, 2]
    args, kwargs = make_verify_inputs(num_draft, 30, seed=21, draft="probs", temperature=0.9, accept_bias=2.0)
    full = _run(backend, args, kwargs, method="block")
    target, drafts, cu = args
    for b in range(len(num_draft)):
        s, e = int(cu[b]), int(cu[b + 1])
        one = _run(backend, (target[s + b : e + b + 1], drafts[s:e], torch.tensor([0, e - s])),
                   dict(draft_probs=kwargs["draft_probs"][s:e], temperature=0.9, seed=kwargs["seed"][b : b + 1],
                        offset=kwargs["offset"][b : b + 1]), max_num_draft=5, method="block")
        assert int(one[1][0]) == int(full[1][b])
        assert one[0][0, : e - s + 1].tolist() == full[0][b, : e - s + 1].tolist()


# --------------------------------------------------------------------------
# method="token" unchanged; bad methods are named


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_token_method_is_the_default(backend):
    rng = random.Random(3)
    for case in range(4):
        args, kwargs, _ = _case(rng, case, MODES[case], 33, 4)
        a = _run(backend, args, kwargs)
        b = _run(backend, args, kwargs, method="token")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", [None, "reference"] + BACKENDS)
@pytest.mark.parametrize("method", ["Block", "tree", "", 3])
def test_bad_method_is_named(backend, method):
    args, kwargs = make_verify_inputs([2, 1], 10, seed=40, draft="logits", temperature=1.0)
    device = "cpu" if backend is None else backend_device(backend)
    args = [a.to(device) for a in args]
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises((ValueError, RuntimeError), match="method"):
        dk.verify_block(*args, **kwargs, backend=backend, method=method)


def test_direct_op_call_checks_method():
    args, kwargs = make_verify_inputs([2, 1], 10, seed=40, draft="logits", temperature=1.0)
    with pytest.raises((ValueError, RuntimeError), match="method"):
        torch.ops.dspark.verify_block(*args, **kwargs, max_num_draft=2, method="blocks")


def test_opcheck_block():
    args, kwargs = make_verify_inputs([2, 0, 3], 17, seed=50, draft="logits", accept_bias=2.0)
    kwargs = dict(kwargs, temperature=torch.tensor([1.0, 0.0, 0.7]), top_k=torch.tensor([0, 3, 5], dtype=torch.int32),
                  top_p=torch.tensor([1.0, 0.9, 0.8]), max_num_draft=4, method="block")
    torch.library.opcheck(torch.ops.dspark.verify_block.default, args, kwargs)



def test_bench_verify_method_block(tmp_path):
    """`dspark-bench verify --method block` times block verification beside token-wise (same inputs)."""
    import json

    from dspark_kernels.bench.__main__ import main

    js = tmp_path / "b.json"
    rc = main(["verify", "--vocab", "200", "--batch", "3", "--gamma", "3", "--mode", "sample-draft-logits",
               "--method", "block", "--backend", "reference", "cpu", "eager", "--json", str(js),
               "--device", "cpu", "--quiet", "--max-time", "0.005", "--threads", "1"])
    assert rc == 0
    cases = json.loads(js.read_text())["cases"]
    block = [c for c in cases if "method=block" in c["group"]]
    token = [c for c in cases if "method=block" not in c["group"]]
    assert block and token
    assert all(c["status"] != "error" and c["correct"] is not False for c in cases), cases
    ref = [c for c in block if c["backend"] == "reference"][0]
    assert ref["status"] == "ok" and "vs token" in ref["note"] and ref["mean_accepted"] is not None
    assert [c for c in block if c["backend"] == "eager"][0]["status"] == "skipped"
    if dk.backends("verify_block")["cpu"]:
        cpu = [c for c in block if c["backend"] == "cpu"][0]
        assert cpu["status"] == "ok" and cpu["correct"] is True
