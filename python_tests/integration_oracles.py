"""Independent statements of what each engine's verify function does, for the adapter
tests (python_tests/test_integrations_*.py): exact output laws in fp64 Python and the
engines' deterministic (greedy) rules, written from the engines' documentation and
code, not from dspark_kernels. Also engine-layout input builders and a χ² test of
joint outcomes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import dspark_kernels as dk

CHI2_FALSE_ALARM = 1e-6

# The χ² tests draw ~10^4 requests per call: with the C++ CPU kernels that takes
# milliseconds, with only the Python reference (DSPARK_NO_EXTENSION=1) minutes, so they
# skip there, as the op's own statistical tests do.
needs_cpu_kernels = pytest.mark.skipif(
    not (dk.backends("verify_block").get("cpu") and dk.backends("verify_tree").get("cpu")),
    reason="statistical tests need the cpu backend (the C++ extension)")


# ----------------------------------------------------------------------------------------
# χ² of joint outcomes against an exact law


def chi2_outcomes(outcomes, law: dict, label: str, false_alarm: float = CHI2_FALSE_ALARM, min_expected=5.0):
    """Pearson χ² of a list of hashable outcomes against ``law`` (outcome -> probability),
    at a fixed false-alarm rate. Outcomes outside the law's support fail at once;
    categories expected fewer than ``min_expected`` times are pooled into one."""
    from scipy.stats import chi2

    n = len(outcomes)
    assert n >= 1000, label
    counts: dict = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    impossible = [o for o in counts if law.get(o, 0.0) <= 0.0]
    assert not impossible, f"{label}: outcomes of probability zero: {impossible[:5]}"
    total = sum(law.values())
    assert abs(total - 1.0) < 1e-9, f"{label}: the law sums to {total}"
    stat, cells, pooled_e, pooled_c = 0.0, 0, 0.0, 0
    for o, p in law.items():
        e = p * n
        c = counts.get(o, 0)
        if e < min_expected:
            pooled_e += e
            pooled_c += c
            continue
        stat += (c - e) ** 2 / e
        cells += 1
    if pooled_e > 0:
        stat += (pooled_c - pooled_e) ** 2 / pooled_e
        cells += 1
    dof = max(cells - 1, 1)
    limit = chi2.isf(false_alarm, dof)
    assert stat < limit, f"{label}: chi2 = {stat:.1f} >= {limit:.1f} (dof {dof}, n {n})"


# ----------------------------------------------------------------------------------------
# Chain speculative sampling (Leviathan et al. 2023 / Chen et al. 2023), the rule of
# vLLM V1, MRV2 and FlashInfer: accept x_i with probability min(1, p_i(x_i) / q_i(x_i));
# at the first rejection emit a sample of norm(max(p_i - q_i, 0)); after all n
# accepted, the bonus (FlashInfer / MRV2 / ours: a sample of p_n; vLLM V1's
# rejection_sample: the given bonus token).


def chain_law(p_rows, q_rows, drafts, bonus=None) -> dict:
    """Exact law of (number accepted a, emitted token) for one request. p_rows: n + 1
    target distributions (lists), q_rows: n draft distributions (None = point masses at
    the drafts), bonus: a fixed bonus token (vLLM V1) or None (sampled from p_n)."""
    n = len(drafts)
    law: dict = {}
    reach = 1.0
    for i, x in enumerate(drafts):
        p = p_rows[i]
        q = [1.0 if v == x else 0.0 for v in range(len(p))] if q_rows is None else q_rows[i]
        accept = 0.0 if q[x] <= 0 else min(1.0, p[x] / q[x])
        residual = [max(a - b, 0.0) for a, b in zip(p, q)]
        z = sum(residual)
        if z <= 0:
            residual, z = list(p), sum(p)
        for t, r in enumerate(residual):
            if r > 0 and reach * (1 - accept) > 0:
                law[(i, t)] = law.get((i, t), 0.0) + reach * (1 - accept) * r / z
        reach *= accept
    if reach > 0:
        if bonus is not None:
            law[(n, bonus)] = law.get((n, bonus), 0.0) + reach
        else:
            for t, r in enumerate(p_rows[n]):
                if r > 0:
                    law[(n, t)] = law.get((n, t), 0.0) + reach * r
    return law


def chain_outcome(row: list[int], n: int) -> tuple[int, int]:
    """(accepted, emitted token) of one -1 padded output row of a request with n drafts."""
    valid = [t for t in row if t != -1]
    return len(valid) - 1, valid[-1]


def greedy_chain(drafts, argmax_rows, bonus):
    """vLLM V1's ``rejection_greedy_sample_kernel``: write the target argmax at every
    position up to and including the first mismatch; the bonus after a full match."""
    out = []
    for x, a in zip(drafts, argmax_rows):
        out.append(a)
        if x != a:
            return out
    return out + [bonus]


# ----------------------------------------------------------------------------------------
# vLLM layouts


def vllm_spec_decode_metadata(spec_tokens: list[list[int]], device="cpu"):
    """A stand-in of vLLM's ``SpecDecodeMetadata`` with its fields (as
    ``SpecDecodeMetadata.make_dummy`` builds them): inclusive cumsums without the
    leading 0, rows per request = drafts then bonus."""
    n = [len(s) for s in spec_tokens]
    flat = [t for s in spec_tokens for t in s]
    cu_draft = torch.tensor(n, dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_sampled = (torch.tensor(n, dtype=torch.int32) + 1).cumsum(0).to(torch.int32)
    target_idx, bonus_idx = [], []
    start = 0
    for k in n:
        target_idx += list(range(start, start + k))
        bonus_idx.append(start + k)
        start += k + 1
    return SimpleNamespace(
        draft_token_ids=torch.tensor(flat, dtype=torch.int32, device=device), num_draft_tokens=n,
        cu_num_draft_tokens=cu_draft.to(device), cu_num_sampled_tokens=cu_sampled.to(device),
        target_logits_indices=torch.tensor(target_idx, dtype=torch.int32, device=device),
        bonus_logits_indices=torch.tensor(bonus_idx, dtype=torch.int32, device=device),
        logits_indices=torch.arange(start, dtype=torch.int32, device=device), max_spec_len=max(n) if n else 0)


def vllm_sampling_metadata(*, temperature=None, top_k=None, top_p=None, generators=None, min_p=None,
                           all_greedy=None):
    """A stand-in of vLLM V1's ``SamplingMetadata`` with the fields the sampler reads;
    ``min_p`` becomes a ``MinPLogitsProcessor``-like object in ``logitsprocs.all``."""
    if all_greedy is None:
        all_greedy = temperature is None
    procs = []
    if min_p is not None:
        procs.append(SimpleNamespace(min_p_count=int((min_p > 0).sum()), min_p=min_p))
    return SimpleNamespace(
        temperature=temperature, all_greedy=all_greedy,
        all_random=(not all_greedy) and temperature is not None and bool((temperature > 0).all()),
        top_p=top_p, top_k=top_k, generators=generators or {}, max_num_logprobs=None, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=torch.tensor([]), presence_penalties=torch.tensor([]),
        repetition_penalties=torch.tensor([]), output_token_ids=[], spec_token_ids=[], allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=SimpleNamespace(all=procs))


class MockSampler:
    """vLLM's tests mock the Sampler that draws the bonus tokens."""

    def __init__(self, bonus_token_ids):
        self.bonus_token_ids = bonus_token_ids
        self.calls = 0

    def __call__(self, **kwargs):
        self.calls += 1
        return SimpleNamespace(sampled_token_ids=self.bonus_token_ids, logprobs_tensors=None)


def vllm_greedy_logits(output_tokens: list[list[int]], vocab: int = 100):
    """vLLM's ``create_logits_tensor``: N rows whose argmax are the wanted tokens."""
    rows = [t[:-1] for t in output_tokens]
    logits = torch.full((sum(len(r) for r in rows), vocab), -100.0)
    i = 0
    for r in rows:
        for t in r:
            logits[i, t] = 100.0
            i += 1
    return logits


def mrv2_inputs(num_draft: list[int], slots: list[int], max_reqs: int, steps: int, vocab: int, *, seed=0,
                draft_logits=True, greedy=(), positions=None):
    """Model Runner V2's ``rejection_sample`` inputs as its model runner builds them:
    ``L = sum(n_r + 1)`` logit rows, ``draft_sampled = input_ids[logits_indices]``
    (row i's draft is ``draft_sampled[i + 1]``; a request's first entry is the last
    verified token), ``pos`` absolute positions, per-slot temperature / seed and
    ``draft_logits [max_reqs, K, V]``."""
    g = torch.Generator().manual_seed(seed)
    batch = len(num_draft)
    cu = [0]
    for n in num_draft:
        cu.append(cu[-1] + n + 1)
    num_logits = cu[-1]
    target = torch.randn(num_logits, vocab, generator=g) * 1.5
    draft_sampled = torch.randint(0, vocab, (num_logits,), generator=g)
    pos = torch.empty(num_logits, dtype=torch.int64)
    expanded_idx, expanded_local = [], []
    for r in range(batch):
        start = 100 * (r + 1) if positions is None else positions[r]
        for j in range(num_draft[r] + 1):
            pos[cu[r] + j] = start + j
            expanded_idx.append(slots[r])
            expanded_local.append(j)
    temperature = torch.full((max_reqs,), 0.8)
    for s in greedy:
        temperature[s] = 0.0
    seeds = torch.randint(0, 2**40, (max_reqs,), generator=g)
    dl = torch.randn(max_reqs, steps, vocab, generator=g) * 1.5 if draft_logits else None
    return dict(target_logits=target, draft_logits=dl, draft_sampled=draft_sampled,
                cu_num_logits=torch.tensor(cu, dtype=torch.int32), pos=pos,
                idx_mapping=torch.tensor(slots, dtype=torch.int32),
                expanded_idx_mapping=torch.tensor(expanded_idx, dtype=torch.int32),
                expanded_local_pos=torch.tensor(expanded_local, dtype=torch.int32),
                temperature=temperature, seed=seeds, num_speculative_steps=steps)


# ----------------------------------------------------------------------------------------
# SGLang trees


def sglang_tree(children: dict[int, list[int]], n: int):
    """SGLang's (retrive_next_token, retrive_next_sibling) rows for one request from
    {node: [children in walk order]}."""
    nxt = [-1] * n
    sib = [-1] * n
    for u, cs in children.items():
        if cs:
            nxt[u] = cs[0]
            for a, b in zip(cs, cs[1:]):
                sib[a] = b
    return nxt, sib


def sglang_target_only_law(p_rows, tokens, children) -> dict:
    """Exact law of sgl-kernel's target-only tree walk (thresholds 1): at the current
    node with law p', try its children in walk order; child c (token t) is accepted
    with probability p'(t); on rejection p'(t) = 0 and p' is renormalised; after an
    acceptance continue from c with c's own row; when no child is accepted emit a sample
    of p'. Outcome: (path of nodes from the root, emitted token)."""
    law: dict = {}

    def walk(node, path, weight):
        p = list(p_rows[node])
        z = sum(p)
        p = [x / z for x in p]
        stay = 1.0
        for c in children.get(node, []):
            t = tokens[c]
            a = p[t]
            if a > 0:
                walk(c, path + (c,), weight * stay * a)
            stay *= 1 - a
            if stay <= 0:
                return
            p[t] = 0.0
            z = sum(p)
            p = [x / z for x in p]
        for t, x in enumerate(p):
            if x > 0:
                law[(path, t)] = law.get((path, t), 0.0) + weight * stay * x

    walk(0, (0,), 1.0)
    return law


def sglang_greedy(tokens, children, predict, width):
    """sgl-kernel's ``verify_tree_greedy`` for one request: follow the first child (walk
    order) whose token equals the current node's target argmax, at most width - 1 steps.
    Returns (path nodes, predicts written {node: token})."""
    path = [0]
    for _ in range(width - 1):
        nxt = next((c for c in children.get(path[-1], []) if tokens[c] == predict[path[-1]]), None)
        if nxt is None:
            break
        path.append(nxt)
    return path, {u: predict[u] for u in path}


def softmax_rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in torch.softmax(t.double(), -1)]
