"""min_p, draft_index and return_logprobs (verify_block, verify_tree, draft_sample_block) and
the token_logprobs op: every backend against the reference, fp64 oracles, chi-square
losslessness with min-p, and the argument errors (docs/verification.md)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import available_backends, backend_device
from helpers import chi2_check, make_verify_inputs

import dspark_kernels as dk
from dspark_kernels.reference import philox

BACKENDS = available_backends()  # cpu, and triton / cuda where they can run
NEG_INF = float("-inf")


def _dev(backend, x):
    device = backend_device(backend)
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _dev(backend, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_dev(backend, v) for v in x)
    return x


def _cpu(out):
    return tuple(t.cpu() for t in out)


def _block(backend, args, kwargs, **extra):
    return _cpu(dk.verify_block(*_dev(backend, args), **_dev(backend, kwargs), backend=backend, **extra))


def _tree(backend, args, kwargs, **extra):
    return _cpu(dk.verify_tree(*_dev(backend, args), **_dev(backend, kwargs), backend=backend, **extra))


def _assert_same(got, want, label):
    for i, (g, w) in enumerate(zip(got, want)):
        if g.dtype.is_floating_point:  # log-probabilities: fp32 sums in another order
            assert torch.equal(torch.isinf(g), torch.isinf(w)), f"{label}[{i}]: -inf pattern"
            fin = torch.isfinite(w)
            assert torch.allclose(g[fin], w[fin], atol=2e-5, rtol=1e-5), f"{label}[{i}]: {g} vs {w}"
        else:
            assert torch.equal(g, w), f"{label}[{i}]: {g.tolist()} vs {w.tolist()}"


MIN_P_CASES = {
    "zero": lambda b: torch.zeros(b),
    "one": lambda b: torch.ones(b),
    "tiny": lambda b: torch.full((b,), 1e-30),
    "mixed": lambda b: torch.tensor([0.0, 0.05, 0.3, 1.0, 0.6, 1e-6, 0.1, -1.0])[:b] if b <= 8 else torch.rand(b),
}


def _inputs(num_draft, vocab, draft, seed, **kw):
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.9, 2.0, 0.5, 1.0, 1.1])[: len(num_draft)]
    return make_verify_inputs(num_draft, vocab, seed=seed, draft=draft, temperature=temperature, accept_bias=3.0,
                              **kw)


# --------------------------------------------------------------------------------------
# min_p: every backend equals the reference


# Interpreted Triton is slow: its block-method cases are the mixed min_p only.
_VB_CASES = [(backend, case, draft, method) for backend in BACKENDS for case in sorted(MIN_P_CASES)
             for draft in ("point", "probs", "logits") for method in ("token", "block")
             if not (backend == "triton" and method == "block" and case != "mixed")]


@pytest.mark.parametrize("backend,case,draft,method", _VB_CASES)
def test_min_p_verify_block_matches_reference(backend, case, draft, method):
    num_draft = [3, 0, 5, 1, 2, 4, 1]
    # the edge cases on a small vocabulary, the mixed case also on an odd larger one (kept short for Triton's interpreter)
    for seed, vocab in ((1, 7), (2, 129))[: 2 if case == "mixed" else 1]:
        args, kwargs = _inputs(num_draft, vocab, draft, seed)
        kwargs["min_p"] = MIN_P_CASES[case](len(num_draft))
        want = _block("reference", args, kwargs, method=method)
        _assert_same(_block(backend, args, kwargs, method=method), want, f"{backend} {case} {draft} V={vocab}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_p_with_top_k_top_p_matches_reference(backend):
    num_draft = [2, 3, 1, 4]
    args, kwargs = _inputs(num_draft, 33, "logits", 5, top_k=torch.tensor([3, 0, 10, 40], dtype=torch.int32),
                           top_p=torch.tensor([0.9, 0.5, 1.0, 0.8]))
    kwargs["min_p"] = torch.tensor([0.2, 0.01, 0.5, 0.0])
    _assert_same(_block(backend, args, kwargs), _block("reference", args, kwargs), backend)
    par = torch.tensor([-1, 0, -1, 0, 1, -1, -1, 0, 1, 1])
    _assert_same(_tree(backend, (args[0], args[1], par, args[2]), kwargs),
                 _tree("reference", (args[0], args[1], par, args[2]), kwargs), backend)


def _tree_inputs(vocab, draft, seed):
    # request 0: root -> {0, 1}, 0 -> {2}; request 1: empty; request 2: a chain of 3; request 3: 4 siblings
    num_draft = [3, 0, 3, 4]
    parents = torch.tensor([-1, -1, 0, -1, 0, 1, -1, -1, -1, -1])
    args, kwargs = _inputs(num_draft, vocab, draft, seed)
    target, drafts, cu = args
    return (target, drafts, parents, cu), kwargs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(MIN_P_CASES))
@pytest.mark.parametrize("draft", ["point", "probs", "logits"])
def test_min_p_verify_tree_matches_reference(backend, case, draft):
    for seed, vocab in ((3, 7), (4, 129))[: 2 if case == "mixed" else 1]:
        args, kwargs = _tree_inputs(vocab, draft, seed)
        kwargs["min_p"] = MIN_P_CASES[case](4)
        _assert_same(_tree(backend, args, kwargs), _tree("reference", args, kwargs), f"{backend} {case} {draft}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(MIN_P_CASES))
@pytest.mark.parametrize("markov", [False, True])
def test_min_p_draft_sample_block_matches_reference(backend, case, markov):
    g = torch.Generator().manual_seed(11)
    batch, gamma, vocab = 5, 3, 37
    base = torch.randn(batch, gamma, vocab, generator=g) * 2
    kw = dict(temperature=torch.tensor([1.0, 0.7, 0.0, 1.5, 1.0]), min_p=MIN_P_CASES[case](batch),
              seed=torch.arange(batch) * 7 + 1, offset=torch.arange(batch))
    if markov:
        kw.update(markov_w1=torch.randn(vocab, 4, generator=g), markov_w2=torch.randn(4, vocab, generator=g))
    anchor = torch.randint(0, vocab, (batch,), generator=g)
    want = dk.draft_sample_block(base, anchor, **kw, backend="reference")
    got = dk.draft_sample_block(*_dev(backend, (base, anchor)), **_dev(backend, kw), backend=backend)
    assert torch.equal(got[0].cpu(), want[0]), f"{backend} {case}: {got[0].tolist()} vs {want[0].tolist()}"


def test_min_p_zero_is_off():
    """min_p = 0 (or None) gives exactly the tokens without it, on the reference."""
    args, kwargs = _inputs([3, 2, 4], 29, "logits", 9)
    without = _block("reference", args, kwargs)
    with_zero = _block("reference", args, dict(kwargs, min_p=0.0))
    _assert_same(with_zero, without, "min_p=0")


def test_min_p_one_keeps_only_the_max():
    """min_p = 1: every sampled token is its row's argmax (temperature does not matter)."""
    args, kwargs = _inputs([0] * 64, 11, "point", 13)
    kwargs["temperature"] = 1.0
    out, n = _block("reference", args, dict(kwargs, min_p=1.0))
    assert torch.equal(out[:, 0].long(), args[0].argmax(1))


# --------------------------------------------------------------------------------------
# draft_index: gathered rows, read in place


def _gathered(args, kwargs, name, index_dtype, pattern, extra_rows=5):
    """The same call with q stored in a larger tensor and addressed through draft_index."""
    q = kwargs[name]
    n = q.shape[0]
    g = torch.Generator().manual_seed(17)
    rows = n + extra_rows
    if pattern == "permuted":
        index = torch.randperm(rows, generator=g)[:n]
    else:  # repeated: every draft reads one of two rows
        index = torch.randint(0, min(2, rows), (n,), generator=g)
    store = torch.randn(rows, q.shape[1], generator=g).to(q.dtype)
    if name == "draft_probs":
        store = torch.softmax(store * 2, -1).to(q.dtype)
    gathered = store[index]
    return dict(kwargs, **{name: store}, draft_index=index.to(index_dtype)), dict(kwargs, **{name: gathered})


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("name", ["draft_logits", "draft_probs"])
@pytest.mark.parametrize("pattern,index_dtype", [("permuted", torch.int32), ("repeated", torch.int64)])
def test_draft_index_equals_gathered_rows(backend, name, pattern, index_dtype):
    draft = "logits" if name == "draft_logits" else "probs"
    args, kwargs = _inputs([3, 0, 4, 1], 23, draft, 21)
    kwargs["min_p"] = torch.tensor([0.0, 0.1, 0.02, 0.3])
    indexed, gathered = _gathered(args, kwargs, name, index_dtype, pattern)
    for method in ("token", "block"):
        got = _block(backend, args, indexed, method=method)
        _assert_same(got, _block(backend, args, gathered, method=method), f"{backend} {method} vs gathered")
        _assert_same(got, _block("reference", args, indexed, method=method), f"{backend} {method} vs reference")
    targs, tkw = _tree_inputs(23, draft, 22)
    indexed, gathered = _gathered(targs, tkw, name, index_dtype, pattern)
    got = _tree(backend, targs, indexed)
    _assert_same(got, _tree(backend, targs, gathered), f"{backend} tree vs gathered")
    _assert_same(got, _tree("reference", targs, indexed), f"{backend} tree vs reference")


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("bad", [-1, 9])
def test_draft_index_out_of_range_is_an_error(backend, bad):
    args, kwargs = _inputs([2, 2], 7, "logits", 3)
    kwargs["draft_logits"] = torch.randn(9, 7)
    kwargs["draft_index"] = torch.tensor([0, 8, bad, 1])
    with pytest.raises((ValueError, RuntimeError), match=r"draft_index\[2\]"):
        _block(backend, args, kwargs)
    par = torch.tensor([-1, -1, -1, 0])
    with pytest.raises((ValueError, RuntimeError), match=r"draft_index\[2\]"):
        _tree(backend, (args[0], args[1], par, args[2]), kwargs)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_draft_index_argument_errors(backend):
    args, kwargs = _inputs([2, 1], 7, "point", 3)
    with pytest.raises((ValueError, RuntimeError), match="draft_index needs draft_logits or draft_probs"):
        _block(backend, args, dict(kwargs, draft_index=torch.tensor([0, 1, 2])))
    with pytest.raises((ValueError, RuntimeError), match="draft_index must"):
        _block(backend, args, dict(kwargs, draft_logits=torch.randn(5, 7), draft_index=torch.tensor([0, 1])))
    with pytest.raises((ValueError, RuntimeError), match="draft_index must"):
        _block(backend, args, dict(kwargs, draft_logits=torch.randn(5, 7), draft_index=torch.tensor([0., 1., 2.])))
    with pytest.raises((ValueError, RuntimeError), match="draft_index needs at least one row"):
        _block(backend, args, dict(kwargs, draft_logits=torch.randn(0, 7), draft_index=torch.tensor([0, 0, 0])))
    # Without draft_index the rows must still be [N, V].
    with pytest.raises((ValueError, RuntimeError), match="draft_logits must have shape"):
        _block(backend, args, dict(kwargs, draft_logits=torch.randn(5, 7)))


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_min_p_argument_errors(backend):
    args, kwargs = _inputs([2, 1], 7, "point", 3)
    with pytest.raises((ValueError, RuntimeError), match="min_p must"):
        _block(backend, args, dict(kwargs, min_p=torch.tensor([1, 0])))
    with pytest.raises((ValueError, RuntimeError), match="min_p must"):
        _block(backend, args, dict(kwargs, min_p=torch.tensor([0.1, 0.2, 0.3])))
    with pytest.raises(ValueError, match="min_p must be a float"):
        dk.verify_block(*args, **kwargs, min_p="0.1", backend="reference")
    with pytest.raises(ValueError, match="return_logprobs must be a bool"):
        dk.verify_block(*args, **kwargs, return_logprobs=1, backend="reference")


# --------------------------------------------------------------------------------------
# return_logprobs


def softmax64_min_p(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """Filtered probabilities in fp64 by explicit sorting: min-p, top-k, top-p (vLLM's order)."""
    s = [float(x) / temperature if not math.isnan(float(x)) else NEG_INF for x in logits]
    vocab = len(s)
    keep = [x > NEG_INF for x in s]
    m = max(s)
    if min_p > 0:
        keep = [k and math.exp(x - m) >= min(min_p, 1.0) * (1 - 1e-6) for k, x in zip(keep, s)]
    if 0 < top_k < vocab:
        kth = sorted(s, reverse=True)[top_k - 1]
        keep = [k and x >= kth for k, x in zip(keep, s)]
    if 0.0 < top_p < 1.0:
        e = [math.exp(x - m) if k else 0.0 for x, k in zip(s, keep)]
        total = sum(e)
        keep = [k and sum(ew for xw, ew in zip(s, e) if xw > x) < top_p * total for k, x in zip(keep, s)]
    e = [math.exp(x - m) if k else 0.0 for x, k in zip(s, keep)]
    z = sum(e)
    return [x / z for x in e]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draft", ["point", "logits"])
def test_logprobs_match_reference(backend, draft):
    for vocab, seed in ((7, 1), (129, 2))[: 2 if draft == "logits" else 1]:
        args, kwargs = _inputs([3, 0, 5, 1, 2], vocab, draft, seed, top_k=torch.tensor([0, 3, 0, 50, 2]))
        kwargs["min_p"] = torch.tensor([0.0, 0.05, 0.2, 0.0, 0.5])
        kwargs["temperature"][1] = 0.0  # one greedy request
        want = _block("reference", args, kwargs, return_logprobs=True)
        _assert_same(_block(backend, args, kwargs, return_logprobs=True), want, f"{backend} block V={vocab}")
        targs, tkw = _tree_inputs(vocab, draft, seed)
        tkw["min_p"] = torch.tensor([0.1, 0.0, 0.3, 0.01])
        want = _tree("reference", targs, tkw, return_logprobs=True)
        _assert_same(_tree(backend, targs, tkw, return_logprobs=True), want, f"{backend} tree V={vocab}")


# Rows of the bit-identity test: s = [0, a, b, c] then tiny entries in [-36, -22] whose
# fixed-point terms trunc(exp(s) 2^K) drop a fractional part (K = 54 at V = 129, 52 at
# V = 769): the row mass is below its fp64 sum by about 2^-48 (V = 129) / 2^-43 (V = 769).
# a, b, c are tuned so that, at top_p = 1 - 2^-24, the fixed-point rule keeps the max
# alone (2^K >= p Z, by about 2^-49 relative) while an fp64 sum of the exps (the former
# Triton masses) keeps the second value too. Their fp32 exps are the same in torch and
# in numpy (the interpreter's tl.exp), so the two backends sum the same terms.
_TOP_P_EDGE = {129: (-16.715200424194336, -25.000110626220703, -19.99998664855957),
               769: (-16.97877311706543, -24.99978256225586, -20.000062942504883)}
_ONE_MINUS_ULP = 1.0 - 2.0 ** -24  # the largest fp32 below 1


def _tiny_tail(n):
    return [-36.0 + 14.0 * (i + 0.5) / n for i in range(n)]


@pytest.mark.skipif("triton" not in BACKENDS or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton interpreter (a GPU's tl.exp rounds differently from torch's)")
@pytest.mark.parametrize("vocab", [129, 769])
def test_triton_logprobs_bit_identical_to_reference(vocab):
    """Triton's token_logprobs equal the reference's bit for bit (torch.equal) with the
    order-independent fixed-point row mass (docs/verification.md#order-independent-sums),
    with and without top-p: random rows, a row whose max holds all but ~2^-30 of the mass
    (log p of the max is -log Z itself, so an fp64 sum of the exps gives other bits), and
    the top-p edge row above (an fp64 mass keeps one more token)."""
    a, b, c = _TOP_P_EDGE[vocab]
    g = torch.Generator().manual_seed(vocab)
    logits = torch.stack([
        torch.tensor([0.0, a, b, c] + _tiny_tail(vocab - 4)),
        torch.tensor([0.0, -21.0] + _tiny_tail(vocab - 2)),
        torch.randn(vocab, generator=g) * 3,
        torch.randn(vocab, generator=g) * 2 + 1,
    ]).to(torch.float32)
    tokens = torch.stack([torch.tensor([0, 1, 2, 3, 7]), torch.tensor([0, 1, 2, 5, 9]),
                          torch.cat([logits[2].topk(3).indices, torch.randint(0, vocab, (2,), generator=g)]),
                          torch.cat([logits[3].topk(3).indices, torch.randint(0, vocab, (2,), generator=g)])])
    rows = torch.arange(4)[:, None].expand(4, 5).contiguous()
    temperature = torch.tensor([1.0, 1.0, 0.8, 1.3])
    for top_p in (None, torch.tensor([_ONE_MINUS_ULP, 0.99, 0.9, 0.5])):
        kw = dict(temperature=temperature, top_p=top_p)
        want = dk.token_logprobs(logits, tokens, rows, **kw, backend="reference")
        got = dk.token_logprobs(logits, tokens, rows, **kw, backend="triton")
        assert torch.equal(got, want), f"V={vocab} top_p={top_p}: {got.tolist()} vs {want.tolist()}"
    # the edge row at top_p = 1 - 2^-24 keeps its max alone (log p = 0)
    assert want[0, 0] == 0.0 and bool((want[0, 1:] == NEG_INF).all()), want[0]


def test_logprobs_against_fp64_oracle():
    """Reference log-probs against an fp64 oracle: the filtered target row of each output
    column (greedy requests: temperature 1), -inf after the emitted token."""
    vocab = 13
    args, kwargs = _inputs([3, 0, 2, 4], vocab, "logits", 31, top_p=torch.tensor([1.0, 0.9, 0.7, 1.0]))
    kwargs["temperature"][2] = 0.0
    kwargs["min_p"] = torch.tensor([0.05, 0.0, 0.2, 0.4])
    target, drafts, cu = args
    out, n, lp = _block("reference", args, kwargs, return_logprobs=True)
    assert lp.dtype == torch.float32 and lp.shape == out.shape
    for b in range(4):
        t = float(kwargs["temperature"][b])
        for j in range(out.shape[1]):
            if j > int(n[b]):
                assert lp[b, j] == NEG_INF and out[b, j] == -1
                continue
            p = softmax64_min_p(target[int(cu[b]) + b + j].tolist(), t if t > 0 else 1.0, 0,
                                float(kwargs["top_p"][b]), float(kwargs["min_p"][b]))
            x = int(out[b, j])
            want = math.log(p[x]) if p[x] > 0 else NEG_INF
            assert abs(float(lp[b, j]) - want) < 1e-5 or (want == NEG_INF and lp[b, j] == NEG_INF), (b, j)
    # verify_tree: column j is drawn at path node j (its parent's row for an accepted node)
    targs, tkw = _tree_inputs(vocab, "logits", 32)
    path, n, out, lp = _tree("reference", targs, tkw, return_logprobs=True)
    cu = targs[3]
    for b in range(4):
        for j in range(path.shape[1]):
            if j > int(n[b]):
                assert lp[b, j] == NEG_INF
                continue
            row = int(cu[b]) + b + int(path[b, j])
            p = softmax64_min_p(targs[0][row].tolist(), float(tkw["temperature"][b]))
            assert abs(float(lp[b, j]) - math.log(p[int(out[b, j])])) < 1e-5, (b, j)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_token_logprobs_exact_tiny_vocab(backend):
    """token_logprobs on a 3-token vocabulary with exact probabilities: padding rows, ids
    outside [0, V), filters (min-p 0.2 drops row 1's 0.125 < 0.2 * 0.75; min-p 0.6 drops row 0's
    0.25 < 0.6 * 0.5) and greedy requests (temperature 1)."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.75, 0.125]]))
    tokens = torch.tensor([[0, 2, 1, 3], [1, 0, -1, 2]])
    rows = torch.tensor([[0, 0, -1, 0], [1, 0, 1, 1]])
    kw = dict(temperature=torch.tensor([1.0, 0.0]), min_p=torch.tensor([0.0, 0.2]))
    got = dk.token_logprobs(*_dev(backend, (logits, tokens, rows)), **_dev(backend, kw), backend=backend).cpu()
    want = torch.tensor([[0.5, 0.25, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]]).log()
    assert torch.allclose(got.exp(), want.exp(), atol=1e-6), got
    got = dk.token_logprobs(*_dev(backend, (logits, tokens, rows)), temperature=_dev(backend, torch.ones(2)),
                            min_p=0.6, backend=backend).cpu()
    assert torch.allclose(got[0].exp(), torch.tensor([1.0, 0.0, 0.0, 0.0]), atol=1e-6), got
    with pytest.raises((ValueError, RuntimeError), match=r"rows\[0, 1\] = 2"):
        dk.token_logprobs(*_dev(backend, (logits, tokens, torch.tensor([[0, 2, 0, 0], [0, 0, 0, 0]]))),
                          backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_logprobs_empty_batch(backend):
    args, kwargs = make_verify_inputs([], 5)
    out, n, lp = _block(backend, args, kwargs, max_num_draft=2, return_logprobs=True)
    assert out.shape == lp.shape == (0, 3)


# --------------------------------------------------------------------------------------
# Losslessness with min-p (chi-square, false alarm 1e-6)


def _chi2_block_first_token(backend, trials):
    """One request with one drafted token, repeated `trials` times with distinct seeds: the
    first output token must follow the min-p filtered target distribution."""
    target = torch.tensor([2.0, 1.6, 0.9, 0.0, -0.5, 1.2])
    draft = torch.tensor([0.0, 2.0, 1.5, 0.4, 1.0, -1.0])
    temperature, min_p = 1.3, 0.3
    q = torch.tensor(softmax64_min_p(draft.tolist(), temperature, min_p=min_p))
    g = torch.Generator().manual_seed(5)
    drafts = torch.multinomial(q, trials, replacement=True, generator=g)
    target_logits = target.repeat(2 * trials, 1)  # rows: draft row, bonus row per request
    cu = torch.arange(trials + 1)
    out, _ = _block(backend, (target_logits, drafts, cu),
                    dict(draft_logits=draft.repeat(trials, 1), temperature=temperature, min_p=min_p,
                         seed=torch.arange(trials) * 3 + 17, offset=0))
    chi2_check(out[:, 0], softmax64_min_p(target.tolist(), temperature, min_p=min_p), f"{backend} verify_block")


@pytest.mark.parametrize("backend", ["cpu"] if "cpu" in BACKENDS else [])
def test_chi2_verify_block_min_p(backend):
    _chi2_block_first_token(backend, 6000)


@pytest.mark.parametrize("backend", ["cpu"] if "cpu" in BACKENDS else [])
def test_chi2_verify_tree_min_p(backend):
    """A root with two children drawn i.i.d. from the min-p filtered q: the first output
    token follows the min-p filtered target."""
    trials, temperature, min_p = 5000, 1.0, 0.2
    target = torch.tensor([1.0, 2.0, 0.5, -1.0, 1.5])
    draft = torch.tensor([2.0, 0.0, 1.0, 0.5, -0.5])
    q = torch.tensor(softmax64_min_p(draft.tolist(), temperature, min_p=min_p)).float()
    g = torch.Generator().manual_seed(6)
    drafts = torch.multinomial(q, 2 * trials, replacement=True, generator=g)
    parents = torch.tensor([-1, -1]).repeat(trials)
    cu = torch.arange(trials + 1) * 2
    out = _tree(backend, (target.repeat(3 * trials, 1), drafts, parents, cu),
                dict(draft_logits=draft.repeat(2 * trials, 1), temperature=temperature, min_p=min_p,
                     seed=torch.arange(trials) + 101, offset=0))[2]
    chi2_check(out[:, 0], softmax64_min_p(target.tolist(), temperature, min_p=min_p), f"{backend} verify_tree")


@pytest.mark.parametrize("backend", ["cpu"] if "cpu" in BACKENDS else [])
def test_chi2_draft_sample_block_min_p(backend):
    trials, temperature, min_p = 5000, 0.8, 0.15
    logits = torch.tensor([0.3, 1.0, -0.2, 0.8, 0.0, -2.0, 0.9])
    tokens, _ = dk.draft_sample_block(logits.repeat(trials, 1, 1), torch.zeros(trials, dtype=torch.long),
                                      temperature=temperature, min_p=min_p, seed=torch.arange(trials) + 7,
                                      offset=0, return_logits=False, backend=backend)
    chi2_check(tokens[:, 0].cpu(), softmax64_min_p(logits.tolist(), temperature, min_p=min_p),
               f"{backend} draft_sample_block")


def test_min_p_rule_is_one_fp32_addition():
    """The threshold is max s + float32(log(float64(min_p))): a token exactly at the cut is kept."""
    from dspark_kernels.reference.sampling import filter_threshold, min_p_log

    s = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float32)
    mp = float(torch.tensor(math.exp(-1.0), dtype=torch.float32))
    thr = filter_threshold(s, 0, 1.0, mp)
    assert thr == float(torch.tensor(0.0) + torch.tensor(min_p_log(mp)))
    assert min_p_log(0.0) == NEG_INF and min_p_log(-3.0) == NEG_INF and min_p_log(2.0) == 0.0
    assert philox.SALT_ACCEPT != philox.SALT_RESAMPLE  # min-p uses no randomness of its own
