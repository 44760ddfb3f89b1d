"""Non-finite input (docs/verification.md and docs/drafting.md, "Non-finite input"):
NaN logits count as -inf, +inf entries share the mass, temperatures that overflow
l / T follow the +inf rule, draft probabilities that are not finite positive numbers
never accept. Every backend gives exactly the reference's integers; the reference is
checked against the rule itself and, where it defines a distribution, by χ²."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import available_backends, backend_device
from helpers import chi2_check, make_verify_inputs

import dspark_kernels as dk

INF, NAN = float("inf"), float("nan")
VERIFY_BACKENDS = available_backends()
DRAFT_BACKENDS = [b for b, ok in dk.backends("draft_sample_block").items() if ok and b != "reference"]
SEEDS = range(2)


def _verify(backend, args, kwargs):
    device = backend_device(backend) if backend != "reference" else "cpu"
    args = tuple(a.to(device) for a in args)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    out, acc = dk.verify_block(*args, **kwargs, backend=backend)
    return out.cpu(), acc.cpu()


def _draft(backend, base, anchor, kwargs):
    device = backend_device(backend) if backend != "reference" else "cpu"
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    tokens, logits = dk.draft_sample_block(base.to(device), anchor.to(device), **kw, backend=backend)
    return tokens.cpu(), logits.cpu()


def _sprinkle(x, frac, value, seed):
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    x[torch.rand(x.shape, generator=g) < frac] = value
    return x


def _cases(seed, mode, temperature=None, top_k=None, top_p=None, vocab=37, num_draft=(3, 0, 2, 4)):
    temperature = temperature if temperature is not None else torch.tensor([0.7, 1.0, 1.3, 0.9])[: len(num_draft)]
    return make_verify_inputs(list(num_draft), vocab, seed=seed, draft=mode, temperature=temperature, top_k=top_k,
                              top_p=top_p, accept_bias=3.0)


def _target_rows(cu, b, n):
    return [int(cu[b]) + b + i for i in range(n + 1)]


def _check_verify(args, kwargs, forbid=None):
    """All backends equal the reference; `forbid(b, i, token)` is True for a token that
    must never be emitted or accepted at row i of request b."""
    ref = _verify("reference", args, kwargs)
    out, acc = ref
    if forbid is not None:
        _, _, cu = args
        for b in range(cu.numel() - 1):
            for i in range(int(acc[b]) + 1):
                assert not forbid(b, i, int(out[b, i])), (b, i, int(out[b, i]))
    for backend in VERIFY_BACKENDS:
        got = _verify(backend, args, kwargs)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (backend, got, ref)
    return ref


def _forbid_nan(target, cu):
    def forbid(b, i, token):
        row = target[int(cu[b]) + b + i]
        return bool(torch.isnan(row[token]))
    return forbid


FILTERS = [dict(), dict(top_k=5), dict(top_p=0.8), dict(top_k=7, top_p=0.9), dict(top_k=1)]
FILTER_IDS = ["none", "topk", "topp", "topk_topp", "topk1"]


# --------------------------------------------------------------------------
# verify_block: NaN target logits


@pytest.mark.parametrize("filters", FILTERS, ids=FILTER_IDS)
@pytest.mark.parametrize("mode", ["point", "probs", "logits"])
def test_nan_target_sampling(mode, filters):
    for seed in SEEDS:
        (target, drafts, cu), kwargs = _cases(seed, mode, **filters)
        target = _sprinkle(target, 0.3, NAN, seed + 100)
        for b in range(cu.numel() - 1):  # NaN at some draft tokens (the fuzzer's case)
            if int(cu[b + 1]) > int(cu[b]):
                target[int(cu[b]) + b, drafts[int(cu[b])]] = NAN
        _check_verify((target, drafts, cu), kwargs, _forbid_nan(target, cu))


@pytest.mark.parametrize("filters", [dict(), dict(top_k=5)], ids=["none", "topk"])
def test_nan_target_greedy(filters):
    for seed in SEEDS:
        (target, drafts, cu), kwargs = _cases(seed, "point", **filters)
        kwargs.pop("temperature")
        target = _sprinkle(target, 0.3, NAN, seed + 200)
        rows = torch.arange(target.shape[0])
        target[rows, rows % target.shape[1]] = NAN  # NaN in every row
        out, acc = _check_verify((target, drafts, cu), kwargs, _forbid_nan(target, cu))
        for b in range(cu.numel() - 1):  # the emitted token is the argmax over the non-NaN entries
            row = target[int(cu[b]) + b + int(acc[b])]
            clean = torch.where(torch.isnan(row), -INF, row)
            assert int(out[b, int(acc[b])]) == int(torch.argmax(clean))


def test_all_nan_rows():
    (target, drafts, cu), kwargs = _cases(0, "logits")
    target[:] = NAN
    kwargs["draft_logits"] = torch.full_like(kwargs["draft_logits"], NAN)
    out, acc = _check_verify((target, drafts, cu), kwargs)
    assert acc.tolist() == [0, 0, 0, 0] and out[:, 0].tolist() == [0, 0, 0, 0]  # as a row of -inf
    kwargs.pop("temperature")
    out, acc = _check_verify((target, drafts, cu), kwargs)
    assert acc.tolist() == [0, 0, 0, 0] and out[:, 0].tolist() == [0, 0, 0, 0]


# --------------------------------------------------------------------------
# verify_block: +inf rows, rows mixing +inf / -inf / NaN


def _inf_rows(target, seed, frac=0.1, mix=True):
    g = torch.Generator().manual_seed(seed)
    target = target.clone()
    for r in range(target.shape[0]):
        if r % 3 == 2:
            continue  # some rows stay finite
        n = int(torch.randint(1, 4, (1,), generator=g))
        target[r, torch.randperm(target.shape[1], generator=g)[:n]] = INF
    if mix:
        target = _sprinkle(target, frac, -INF, seed + 1)
        target = _sprinkle(target, frac, NAN, seed + 2)
    return target


def _forbid_not_inf(target, cu):
    def forbid(b, i, token):
        row = target[int(cu[b]) + b + i]
        return bool((row == INF).any()) and not bool(row[token] == INF)
    return forbid


@pytest.mark.parametrize("filters", [dict(), dict(top_k=2), dict(top_p=0.5), dict(top_k=6, top_p=0.9)],
                         ids=["none", "topk", "topp", "topk_topp"])
@pytest.mark.parametrize("mix", [False, True], ids=["inf", "inf_neginf_nan"])
@pytest.mark.parametrize("mode", ["point", "probs", "logits"])
def test_inf_target_rows(mode, mix, filters):
    for seed in SEEDS:
        (target, drafts, cu), kwargs = _cases(seed, mode, **filters)
        target = _inf_rows(target, seed + 300, mix=mix)
        for b in range(cu.numel() - 1):  # +inf at some draft tokens: accepted like any likely token
            if int(cu[b + 1]) > int(cu[b]) and seed % 2:
                target[int(cu[b]) + b, drafts[int(cu[b])]] = INF
        if mode == "logits":  # q with +inf rows too
            kwargs["draft_logits"] = _inf_rows(kwargs["draft_logits"], seed + 400, mix=mix)
        _check_verify((target, drafts, cu), kwargs, _forbid_not_inf(target, cu))


def test_inf_target_rows_greedy():
    for seed in SEEDS:
        (target, drafts, cu), kwargs = _cases(seed, "point")
        kwargs.pop("temperature")
        target = _inf_rows(target, seed + 500)
        out, acc = _check_verify((target, drafts, cu), kwargs, _forbid_not_inf(target, cu))
        for b in range(cu.numel() - 1):  # the first +inf entry
            row = target[int(cu[b]) + b + int(acc[b])]
            if (row == INF).any():
                assert int(out[b, int(acc[b])]) == int(torch.nonzero(row == INF)[0])


def test_point_mass_on_the_only_inf_entry_is_accepted():
    """p puts all its mass on the one +inf entry: a draft of it is always accepted."""
    (target, drafts, cu), kwargs = _cases(3, "point", num_draft=(2, 3))
    for b in range(2):
        for i in range(int(cu[b + 1] - cu[b])):
            target[int(cu[b]) + b + i, drafts[int(cu[b]) + i]] = INF
    out, acc = _check_verify((target, drafts, cu), kwargs)
    assert acc.tolist() == [2, 3]


# --------------------------------------------------------------------------
# verify_block: extreme temperatures, subnormal logits


@pytest.mark.parametrize("filters", [dict(), dict(top_k=4), dict(top_p=0.7)], ids=["none", "topk", "topp"])
@pytest.mark.parametrize("mode", ["point", "probs", "logits"])
@pytest.mark.parametrize("temperature", [1e-38, INF], ids=["1e-38", "inf"])
def test_extreme_temperature(temperature, mode, filters):
    for seed in SEEDS:
        (target, drafts, cu), kwargs = _cases(seed, mode, temperature=temperature, **filters)
        if seed % 2:  # with -inf, +inf and NaN entries
            target = _inf_rows(target, seed + 600, frac=0.05)
            if mode == "logits":
                kwargs["draft_logits"] = _sprinkle(kwargs["draft_logits"], 0.1, -INF, seed + 700)
        _check_verify((target, drafts, cu), kwargs, _forbid_nan(target, cu))


def test_tiny_temperature_emits_among_the_overflowing_entries():
    (target, drafts, cu), kwargs = _cases(1, "point", temperature=1e-38)
    out, acc = _check_verify((target, drafts, cu), kwargs)
    for b in range(cu.numel() - 1):  # only logits with l / T = +inf can be emitted
        row = target[int(cu[b]) + b + int(acc[b])]
        s = row / torch.tensor(1e-38)
        if (s == INF).any():
            assert bool(s[int(out[b, int(acc[b])])] == INF)


@pytest.mark.parametrize("mode", ["point", "probs", "logits"])
def test_subnormal_logits(mode):
    for seed in SEEDS:
        (target, drafts, cu), kwargs = _cases(seed, mode, top_k=5 if seed % 2 else None)
        target = target * 1e-39  # subnormal fp32 logits (and some zeros)
        if mode == "logits":
            kwargs["draft_logits"] = kwargs["draft_logits"] * 1e-40
        _check_verify((target, drafts, cu), kwargs)
        kwargs["temperature"] = torch.full((4,), 1e-30)  # subnormal / tiny: ordinary finite s
        _check_verify((target, drafts, cu), kwargs)


# --------------------------------------------------------------------------
# verify_block: invalid draft_probs, NaN draft_logits


@pytest.mark.parametrize("value", [NAN, -0.25, INF, 0.0], ids=["nan", "negative", "inf", "zero"])
@pytest.mark.parametrize("filters", [dict(), dict(top_k=5)], ids=["none", "topk"])
def test_invalid_draft_probs_are_never_accepted(value, filters):
    for seed in SEEDS:
        (target, drafts, cu), kwargs = _cases(seed, "probs", **filters)
        probs = kwargs["draft_probs"].clone()
        probs = _sprinkle(probs, 0.2, value, seed + 800)  # elsewhere in the rows too
        bad = set()
        for b in range(cu.numel() - 1):
            if int(cu[b + 1]) > int(cu[b]):
                probs[int(cu[b]), drafts[int(cu[b])]] = value
                bad.add(b)
        kwargs["draft_probs"] = probs
        out, acc = _check_verify((target, drafts, cu), kwargs)
        for b in bad:
            assert int(acc[b]) == 0, (b, acc)


@pytest.mark.parametrize("filters", FILTERS[:4], ids=FILTER_IDS[:4])
def test_nan_draft_logits(filters):
    for seed in SEEDS:
        (target, drafts, cu), kwargs = _cases(seed, "logits", **filters)
        dl = _sprinkle(kwargs["draft_logits"], 0.3, NAN, seed + 900)
        bad = set()
        for b in range(cu.numel() - 1):
            if int(cu[b + 1]) > int(cu[b]) and seed % 2:
                dl[int(cu[b]), drafts[int(cu[b])]] = NAN  # q(x) = 0: never accepted
                bad.add(b)
        kwargs["draft_logits"] = dl
        out, acc = _check_verify((target, drafts, cu), kwargs)
        for b in bad:
            assert int(acc[b]) == 0, (b, acc)


def test_nan_draft_logits_elsewhere_leave_acceptance_to_the_coin():
    """A NaN away from the draft token is q = 0 there: the rest of q is still a
    distribution, so a draft with p = q elsewhere is accepted."""
    (target, drafts, cu), kwargs = _cases(2, "logits", num_draft=(3, 2))
    rows = torch.tensor([r for b in range(2) for r in _target_rows(cu, b, int(cu[b + 1] - cu[b]))[:-1]])
    dl = target[rows].clone()
    for j in range(dl.shape[0]):
        v = (int(drafts[j]) + 1) % dl.shape[1]
        dl[j, v] = NAN
        target[rows[j], v] = -INF  # p = q exactly
    kwargs["draft_logits"] = dl
    out, acc = _check_verify((target, drafts, cu), kwargs)
    assert acc.tolist() == [3, 2]


# --------------------------------------------------------------------------
# The law of the +inf rule (fp64 oracle, χ², ≥ 1e5 seeds, false alarm ≤ 1e-6 per check)

STAT_TRIALS = 100_000
INF_ROW = torch.tensor([3.0, INF, -INF, NAN, INF, 50.0, INF, 0.0])
INF_ROW_P = [1 / 3 if x == INF else 0.0 for x in INF_ROW.tolist()]  # the oracle: uniform on the +inf entries


def _reference_race_samples(log_w, salt, trials, seed):
    """Tokens of the reference's race (sampling.race) over log_w, one per seed, with the
    reference's Philox noise (vectorised over seeds; the full op is ~5 ms per request)."""
    from dspark_kernels.reference import philox, sampling

    seeds = torch.randint(0, 2**62, (trials, 1), generator=torch.Generator().manual_seed(seed))
    noise = philox.gumbels(seeds, 0, salt, torch.arange(log_w.numel())[None, :])
    return torch.tensor([sampling.race(log_w, noise[t]) for t in range(trials)])


def test_reference_inf_row_law():
    """The reference's log p of a +inf row (any temperature, with filters) is -log 3 on
    its three +inf entries, and its race draws uniformly among them."""
    from dspark_kernels.reference import philox, sampling

    for t, k, p in ((0.5, 0, 1.0), (INF, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.3), (1e-38, 0, 1.0)):
        log_p = sampling.filtered_log_probs(INF_ROW, t, k, p)
        inf_set = [x > 0 for x in INF_ROW_P]
        if t == 1e-38:
            inf_set[5] = True  # 50 / 1e-38 overflows: a fourth +inf entry (3 / 1e-38 does not)
        expect = torch.tensor([-math.log(sum(inf_set)) if x else -INF for x in inf_set])
        assert torch.allclose(log_p, expect, atol=1e-6, rtol=0), (t, k, p, log_p)
    log_p = sampling.filtered_log_probs(INF_ROW, 0.5, 0, 1.0)
    chi2_check(_reference_race_samples(log_p, philox.SALT_RESAMPLE, STAT_TRIALS, 5), INF_ROW_P,
               "reference: +inf row race")
    # draft_sample_block's race weights (inf_rule over s): uniform among the +inf entries too
    w = sampling.inf_rule(sampling.scale_logits(INF_ROW, 0.8))
    chi2_check(_reference_race_samples(w, philox.SALT_DRAFT, STAT_TRIALS, 6), INF_ROW_P,
               "reference: draft +inf row race")


def test_reference_op_on_inf_rows_equals_cpu():
    """The full reference op on the statistical test's inputs (fewer seeds) gives the
    cpu kernel's integers, so the cpu χ² below is the reference's law."""
    if "cpu" not in VERIFY_BACKENDS:
        pytest.skip("cpu backend not built")
    args, kwargs = _inf_stat_inputs(300)
    ref = dk.verify_block(*args, **kwargs, backend="reference")
    got = dk.verify_block(*args, **kwargs, backend="cpu")
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    base = INF_ROW.repeat(300, 1, 1)
    kw = dict(temperature=0.8, seed=kwargs["seed"], offset=0)
    assert torch.equal(dk.draft_sample_block(base, torch.zeros(300, dtype=torch.int32), **kw, backend="reference")[0],
                       dk.draft_sample_block(base, torch.zeros(300, dtype=torch.int32), **kw, backend="cpu")[0])


def _inf_stat_inputs(trials):
    g = torch.Generator().manual_seed(77)
    seeds = torch.randint(0, 2**62, (trials,), generator=g)
    # One draft per request, drawn from q (uniform over q's two +inf entries 0 and 1).
    q_row = torch.tensor([INF, INF, 0.0, 1.0, -INF, NAN, 2.0, 5.0])
    drafts = torch.where(torch.rand(trials, generator=g) < 0.5, 0, 1).to(torch.int32)
    cu = torch.arange(0, trials + 1, dtype=torch.int32)
    target = torch.stack([INF_ROW, torch.randn(8, generator=g)]).repeat(trials, 1)
    return (target, drafts, cu), dict(draft_logits=q_row.repeat(trials, 1), temperature=1.0, seed=seeds,
                                      offset=torch.zeros(trials, dtype=torch.int64))


def test_inf_rows_are_lossless_on_cpu():
    """Drafts from q (a +inf row on entries 0, 1), target p (+inf on 1, 4, 6): the first
    token is distributed as p; x = 1 is accepted with probability min(1, p/q) = 2/3 and
    x = 0 (p = 0) never; the bonus token of a +inf row with no drafts is uniform too."""
    if "cpu" not in VERIFY_BACKENDS:
        pytest.skip("cpu backend not built")
    trials = STAT_TRIALS
    args, kwargs = _inf_stat_inputs(trials)
    out, acc = dk.verify_block(*args, **kwargs, backend="cpu")
    chi2_check(out[:, 0], INF_ROW_P, "cpu: +inf rows, first token")
    drafts = args[1]
    n1 = int((drafts == 1).sum())
    rate = float((acc[drafts == 1] >= 1).double().mean())
    assert abs(rate - 2 / 3) < 5 * math.sqrt(2 / 9 / n1), rate
    assert int(acc[drafts == 0].sum()) == 0
    out, _ = dk.verify_block(INF_ROW.repeat(trials, 1), torch.zeros(0, dtype=torch.int32),
                             torch.zeros(trials + 1, dtype=torch.int32), temperature=0.5, seed=kwargs["seed"],
                             offset=0, backend="cpu")
    chi2_check(out[:, 0], INF_ROW_P, "cpu: +inf row, bonus token")
    tokens, _ = dk.draft_sample_block(INF_ROW.repeat(trials, 1, 1), torch.zeros(trials, dtype=torch.int32),
                                      temperature=0.8, seed=kwargs["seed"], offset=0, return_logits=False,
                                      backend="cpu")
    chi2_check(tokens[:, 0], INF_ROW_P, "cpu: draft +inf row")


# --------------------------------------------------------------------------
# draft_sample_block


def _draft_inputs(seed, batch=4, gamma=3, vocab=29, rank=0, temperature=None, **kw):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, gamma, vocab, generator=g) * 2.0
    kwargs = dict(kw)
    if rank:  # weights on a 1/8 grid: every summation order is exact
        kwargs["markov_w1"] = torch.randint(-8, 9, (vocab, rank), generator=g).float() / 8
        kwargs["markov_w2"] = torch.randint(-8, 9, (rank, vocab), generator=g).float() / 8
    kwargs["temperature"] = temperature if temperature is not None else torch.tensor([0.7, 1.0, 0.0, 1.3])[:batch]
    kwargs["seed"] = torch.randint(0, 2**62, (batch,), generator=g)
    kwargs["offset"] = torch.randint(0, 2**40, (batch,), generator=g)
    anchor = torch.randint(0, vocab, (batch,), generator=g, dtype=torch.int32)
    return base, anchor, kwargs


def _check_draft(base, anchor, kwargs):
    ref = _draft("reference", base, anchor, kwargs)
    tokens, logits = ref
    temp = torch.as_tensor(kwargs["temperature"], dtype=torch.float32).expand(base.shape[0])
    for b in range(base.shape[0]):
        for k in range(base.shape[1]):
            row = logits[b, k]
            if temp[b] > 0:  # the scaled row: an overflowing l / T is +inf too
                row = torch.where(torch.isinf(row), row, row / temp[b])
            tok = int(tokens[b, k])
            live = bool((torch.where(torch.isnan(row), -INF, row) > -INF).any())
            assert not (live and bool(torch.isnan(row[tok]))), (b, k, tok)
            if bool((row == INF).any()):
                assert bool(row[tok] == INF), (b, k, tok)
    for backend in DRAFT_BACKENDS:
        got = _draft(backend, base, anchor, kwargs)
        assert torch.equal(got[0], ref[0]), (backend, got[0], ref[0])
        assert torch.equal(got[1], ref[1]) or (torch.isnan(got[1]) == torch.isnan(ref[1])).all()
    return ref


DRAFT_FILTERS = [dict(), dict(top_k=1), dict(top_k=4), dict(top_p=0.8)]
DRAFT_FILTER_IDS = ["none", "topk1", "topk", "topp"]


@pytest.mark.parametrize("rank", [0, 3], ids=["plain", "markov"])
@pytest.mark.parametrize("filters", DRAFT_FILTERS, ids=DRAFT_FILTER_IDS)
def test_draft_nan(filters, rank):
    for seed in SEEDS:
        base, anchor, kwargs = _draft_inputs(seed, rank=rank, **filters)
        base = _sprinkle(base, 0.3, NAN, seed + 10)
        base[:, :, 0] = NAN
        tokens, logits = _check_draft(base, anchor, kwargs)


def test_draft_nan_top_k_one_is_the_nan_free_argmax():
    base, anchor, kwargs = _draft_inputs(4, temperature=1.0, top_k=1)
    base = _sprinkle(base, 0.3, NAN, 11)
    tokens, logits = _check_draft(base, anchor, kwargs)
    clean = torch.where(torch.isnan(logits), -INF, logits)
    assert torch.equal(tokens, clean.argmax(-1).to(torch.int32))


@pytest.mark.parametrize("rank", [0, 3], ids=["plain", "markov"])
@pytest.mark.parametrize("filters", DRAFT_FILTERS, ids=DRAFT_FILTER_IDS)
def test_draft_inf(filters, rank):
    for seed in SEEDS:
        base, anchor, kwargs = _draft_inputs(seed, rank=rank, **filters)
        base = _inf_rows(base.reshape(-1, base.shape[-1]), seed + 20, mix=bool(seed % 2)).reshape(base.shape)
        _check_draft(base, anchor, kwargs)


@pytest.mark.parametrize("rank", [0, 3], ids=["plain", "markov"])
def test_draft_all_nan_rows(rank):
    base, anchor, kwargs = _draft_inputs(5, rank=rank)
    base[:, 1] = NAN
    base[0, 2] = NAN
    tokens, _ = _check_draft(base, anchor, kwargs)
    assert (tokens[:, 1] == 0).all() and int(tokens[0, 2]) == 0


@pytest.mark.parametrize("rank", [0, 3], ids=["plain", "markov"])
@pytest.mark.parametrize("temperature", [1e-38, INF], ids=["1e-38", "inf"])
def test_draft_extreme_temperature(temperature, rank):
    for seed in SEEDS:
        base, anchor, kwargs = _draft_inputs(seed, rank=rank, temperature=temperature,
                                             **(dict(top_k=3) if seed % 2 else {}))
        if seed % 3 == 0:
            base = _inf_rows(base.reshape(-1, base.shape[-1]), seed + 30).reshape(base.shape)
        _check_draft(base, anchor, kwargs)


def test_draft_subnormal_logits():
    for seed in SEEDS:
        base, anchor, kwargs = _draft_inputs(seed, **(dict(top_p=0.9) if seed % 2 else {}))
        _check_draft(base * 1e-39, anchor, kwargs)
