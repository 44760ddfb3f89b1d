"""dspark_kernels.integrations.vllm: V1's rejection_sample / RejectionSampler and Model
Runner V2's rejection_sample, with inputs in vLLM's layouts (integration_oracles.py
builds them as vLLM's model runners and tests do): vLLM's own greedy cases exactly,
the chain law by χ² through each entry point, the MRV2 layout mapping bit for bit
against a hand-built verify_block call, seeds reproducible and batch-invariant, and
the engine-side limits as clear errors (docs/integration.md)."""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import requires_cuda
from helpers import softmax64
from integration_oracles import (
    MockSampler,
    chain_law,
    chain_outcome,
    chi2_outcomes,
    greedy_chain,
    mrv2_inputs,
    needs_cpu_kernels,
    softmax_rows,
    vllm_greedy_logits,
    vllm_sampling_metadata,
    vllm_spec_decode_metadata,
)

import dspark_kernels as dk
from dspark_kernels.integrations import vllm as dv



def test_importable_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # any "import vllm..." now fails
    monkeypatch.setitem(sys.modules, "vllm.v1", None)
    monkeypatch.setitem(sys.modules, "vllm.v1.outputs", None)
    mod = importlib.reload(dv)
    out = mod.SamplerOutput(sampled_token_ids=torch.zeros(1, 1, dtype=torch.int32))
    assert out.logprobs_tensors is None
    importlib.reload(dv)


# ----------------------------------------------------------------------------------------
# vLLM's own greedy cases (tests/v1/sample/test_rejection_sampler.py at VLLM_V1_COMMIT's era)

P = dv.PLACEHOLDER_TOKEN_ID
VLLM_GREEDY_CASES = [
    ([[1, 2, 3]], [[1, 2, 3, 4]], [[1, 2, 3, 4]]),                              # test_perfect_match
    ([[1, 2, 3]], [[1, 5, 3, 4]], [[1, 5, P, P]]),                              # test_early_mismatch
    ([[1, 2], [3]], [[1, 2, 5], [3, 4]], [[1, 2, 5], [3, 4, P]]),               # test_multiple_sequences
    ([[1]], [[1, 2]], [[1, 2]]),                                                # test_single_token_sequence
    ([[]], [[5]], [[5]]),                                                       # test_empty_sequence
    ([[1, 2, 3], [4, 5, 6]], [[1, 2, 7, 6], [4, 8, 6, 9]], [[1, 2, 7, P], [4, 8, P, P]]),  # test_multiple_mismatches
    ([[1, 2]], [[1, 2, 3]], [[1, 2, 3]]),                                       # test_parametrized_cases
    ([[1]], [[2, 3]], [[2, P]]),
    ([[1, 2], [3, 4]], [[1, 5, 6], [3, 4, 7]], [[1, 5, P], [3, 4, 7]]),
]


@pytest.mark.parametrize("spec, output, expected", VLLM_GREEDY_CASES)
def test_vllm_greedy_cases_n_rows(spec, output, expected):
    """vLLM's tests pass N target rows and mock the Sampler that draws the bonus tokens."""
    logits = vllm_greedy_logits(output)
    metadata = vllm_spec_decode_metadata(spec)
    metadata.target_logits_indices = torch.arange(logits.shape[0])
    metadata.bonus_logits_indices = torch.empty(0, dtype=torch.int32)
    bonus = torch.tensor([o[-1] for o in output])
    sampler = MockSampler(bonus)
    out = dv.RejectionSampler(sampler)(metadata, draft_probs=None, logits=logits,
                                       sampling_metadata=vllm_sampling_metadata())
    assert out.sampled_token_ids.dtype == torch.int32
    assert out.sampled_token_ids.tolist() == expected
    assert sampler.calls == 1


@pytest.mark.parametrize("spec, output, expected", VLLM_GREEDY_CASES)
def test_vllm_greedy_cases_model_runner_layout(spec, output, expected):
    """V1's model runner passes N + B rows (drafts, then the bonus row, per request);
    the bonus token is then the bonus row's argmax, drawn by our kernel."""
    vocab = 100
    rows = []
    for o in output:
        for t in o:  # the draft rows' argmax, then the bonus row's
            r = torch.full((vocab,), -100.0)
            r[t] = 100.0
            rows.append(r)
    logits = torch.stack(rows)
    out = dv.RejectionSampler()(vllm_spec_decode_metadata(spec), None, logits, vllm_sampling_metadata())
    assert out.sampled_token_ids.tolist() == expected


def test_rejection_sample_greedy_random_batches():
    g = torch.Generator().manual_seed(3)
    vocab = 7
    for trial in range(20):
        n = torch.randint(0, 5, (6,), generator=g).tolist()
        spec = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in n]
        metadata = vllm_spec_decode_metadata(spec)
        probs = torch.softmax(torch.randn(sum(n), vocab, generator=g) * 3, -1)
        for b, s in enumerate(spec):  # make matches likely
            for i, x in enumerate(s):
                if torch.rand((), generator=g) < 0.6:
                    probs[sum(n[:b]) + i, x] = 2.0
        bonus = torch.randint(0, vocab, (len(n), 1), generator=g)
        out = dv.rejection_sample(metadata.draft_token_ids, n, max(n), metadata.cu_num_draft_tokens, None, probs,
                                  bonus, vllm_sampling_metadata())
        argmax = probs.argmax(-1).tolist()
        for b, s in enumerate(spec):
            want = greedy_chain(s, argmax[sum(n[:b]):sum(n[:b]) + len(s)], int(bonus[b]))
            assert out[b].tolist() == want + [P] * (max(n) + 1 - len(want)), (trial, b)


def test_rejection_sample_mixed_batch_greedy_rows_exact():
    """Greedy rows (temperature 0, or -1 as older vLLM wrote it) in a batch with sampled
    rows follow vLLM's greedy kernel exactly."""
    g = torch.Generator().manual_seed(9)
    vocab, n = 6, [3, 2, 4, 1, 3]
    spec = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in n]
    metadata = vllm_spec_decode_metadata(spec)
    probs = torch.softmax(torch.randn(sum(n), vocab, generator=g) * 3, -1)
    for b, s in enumerate(spec):
        probs[sum(n[:b]), s[0]] = 3.0  # the first draft is every greedy row's argmax
    temperature = torch.tensor([0.0, 1.0, -1.0, 0.7, 0.0])
    bonus = torch.randint(0, vocab, (len(n), 1), generator=g)
    sm = vllm_sampling_metadata(temperature=temperature, all_greedy=False)
    out = dv.rejection_sample(metadata.draft_token_ids, n, max(n), metadata.cu_num_draft_tokens, None, probs, bonus,
                              sm)
    argmax = probs.argmax(-1).tolist()
    for b in (0, 2, 4):
        want = greedy_chain(spec[b], argmax[sum(n[:b]):sum(n[:b]) + n[b]], int(bonus[b]))
        assert out[b].tolist() == want + [P] * (max(n) + 1 - len(want)), b


# ----------------------------------------------------------------------------------------
# χ²: the chain law through each entry point


def _repeat(spec_one, copies):
    return [list(spec_one) for _ in range(copies)]


@pytest.mark.parametrize("with_q", [False, True])
@needs_cpu_kernels
def test_rejection_sample_chi2(with_q):
    """vLLM V1 rejection_sample on probabilities: (accepted, emitted) ~ the chain law with
    the given bonus token."""
    vocab, drafts, copies = 5, [1, 3], 12000
    g = torch.Generator().manual_seed(11)
    p_one = torch.softmax(torch.randn(len(drafts), vocab, generator=g), -1)
    q_one = torch.softmax(torch.randn(len(drafts), vocab, generator=g), -1)
    spec = _repeat(drafts, copies)
    metadata = vllm_spec_decode_metadata(spec)
    probs = p_one.repeat(copies, 1)
    q = q_one.repeat(copies, 1) if with_q else None
    bonus = torch.full((copies, 1), 4)
    sm = vllm_sampling_metadata(temperature=torch.ones(copies))
    out = dv.rejection_sample(metadata.draft_token_ids, [2] * copies, 2, metadata.cu_num_draft_tokens, q, probs,
                              bonus, sm)
    law = chain_law(softmax_rows(p_one.log()) + [None], softmax_rows(q_one.log()) if with_q else None, drafts,
                    bonus=4)
    chi2_outcomes([chain_outcome(r, 2) for r in out.tolist()], law, f"rejection_sample q={with_q}")


@needs_cpu_kernels
def test_rejection_sampler_forward_chi2_filters():
    """RejectionSampler.forward on N + B logits with temperature and top-k: the law of
    the filtered target (softmax64, the documented filters), bonus drawn from the bonus
    row."""
    vocab, drafts, copies = 6, [2, 0], 12000
    g = torch.Generator().manual_seed(5)
    logits_one = torch.randn(len(drafts) + 1, vocab, generator=g) * 1.5
    logits_one[0, 2] += 1.0
    spec = _repeat(drafts, copies)
    logits = logits_one.repeat(copies, 1)
    sm = vllm_sampling_metadata(temperature=torch.full((copies,), 0.8), top_k=torch.full((copies,), 4))
    out = dv.RejectionSampler()(vllm_spec_decode_metadata(spec), None, logits, sm).sampled_token_ids
    p = [softmax64(row.tolist(), 0.8, top_k=4) for row in logits_one]
    chi2_outcomes([chain_outcome(r, 2) for r in out.tolist()], chain_law(p, None, drafts), "forward top-k")


@needs_cpu_kernels
def test_rejection_sampler_n_rows_chi2():
    """vLLM's unit-test layout with sampled rows: the bonus from the (mock) sampler."""
    vocab, drafts, copies = 5, [3], 12000
    g = torch.Generator().manual_seed(8)
    logits_one = torch.randn(1, vocab, generator=g)
    metadata = vllm_spec_decode_metadata(_repeat(drafts, copies))
    metadata.bonus_logits_indices = torch.empty(0, dtype=torch.int32)
    sm = vllm_sampling_metadata(temperature=torch.ones(copies))
    out = dv.RejectionSampler(MockSampler(torch.full((copies, 1), 2)))(
        metadata, None, logits_one.repeat(copies, 1), sm).sampled_token_ids
    law = chain_law(softmax_rows(logits_one) + [None], None, drafts, bonus=2)
    chi2_outcomes([chain_outcome(r, 1) for r in out.tolist()], law, "forward N rows")


# ----------------------------------------------------------------------------------------
# Seeds


def _seeded_run(order, seeds_by_request, spec_by_request, probs_by_request, vocab, positions=None):
    spec = [spec_by_request[r] for r in order]
    metadata = vllm_spec_decode_metadata(spec)
    probs = torch.cat([probs_by_request[r] for r in order])
    gens = {i: torch.Generator().manual_seed(seeds_by_request[r]) for i, r in enumerate(order)
            if seeds_by_request.get(r) is not None}
    sm = vllm_sampling_metadata(temperature=torch.ones(len(order)), generators=gens)
    bonus = torch.full((len(order), 1), vocab - 1)
    n = [len(s) for s in spec]
    pos = None if positions is None else torch.tensor([positions[r] for r in order])
    out = dv.rejection_sample(metadata.draft_token_ids, n, max(n), metadata.cu_num_draft_tokens, None, probs, bonus,
                              sm, positions=pos)
    return {r: out[i, :len(spec[i]) + 1].tolist() for i, r in enumerate(order)}


@pytest.mark.parametrize("with_positions", [False, True])
def test_seeded_requests_reproducible_and_batch_invariant(with_positions):
    vocab = 9
    g = torch.Generator().manual_seed(1)
    requests = range(6)
    spec = {r: torch.randint(0, vocab, (4,), generator=g).tolist() for r in requests}
    probs = {r: torch.softmax(torch.randn(4, vocab, generator=g), -1) for r in requests}
    seeds = {0: 123, 2: 77, 3: 2**63 + 5}  # 1, 4, 5 unseeded
    positions = {r: 1000 * r + 7 for r in requests} if with_positions else None
    first = _seeded_run([0, 1, 2, 3], seeds, spec, probs, vocab, positions)
    again = _seeded_run([0, 1, 2, 3], seeds, spec, probs, vocab, positions)
    moved = _seeded_run([4, 3, 5, 2, 1, 0], seeds, spec, probs, vocab, positions)
    for r in seeds:
        assert first[r] == again[r] == moved[r], r
    # a different seed gives a different stream (over a few requests, some outcome differs)
    other = _seeded_run([0, 1, 2, 3], {0: 124, 2: 78, 3: 6}, spec, probs, vocab, positions)
    assert any(other[r] != first[r] for r in seeds)


# ----------------------------------------------------------------------------------------
# Model Runner V2


def _mrv2_by_hand(inp, method="token", backend=None):
    """MRV2's layout rewritten into verify_block's by explicit loops (independent of the
    adapter's index arithmetic)."""
    cu_l = inp["cu_num_logits"].tolist()
    slots = inp["idx_mapping"].tolist()
    drafts, cu, q_rows, temps, seeds, offsets = [], [0], [], [], [], []
    for r, s in enumerate(slots):
        n = cu_l[r + 1] - cu_l[r] - 1
        for j in range(n):
            drafts.append(int(inp["draft_sampled"][cu_l[r] + j + 1]))
            if inp["draft_logits"] is not None:
                q_rows.append(inp["draft_logits"][s, j])
        cu.append(cu[-1] + n)
        temps.append(0.0 if float(inp["temperature"][s]) == 0 else 1.0)
        seeds.append(int(inp["seed"][s]))
        offsets.append(int(inp["pos"][cu_l[r]]))
    kw = {}
    if q_rows:
        kw["draft_logits"] = torch.stack(q_rows)
    out, acc = dk.verify_block(inp["target_logits"], torch.tensor(drafts, dtype=torch.int64),
                               torch.tensor(cu), temperature=torch.tensor(temps), seed=torch.tensor(seeds),
                               offset=torch.tensor(offsets), max_num_draft=inp["num_speculative_steps"],
                               method=method, backend=backend, **kw)
    return out.long(), acc + 1


BACKENDS = [b for b, ok in dk.backends("verify_block").items() if ok and b != "cuda"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_q", [False, True])
@pytest.mark.parametrize("block", [False, True])
def test_mrv2_layout_bit_exact(backend, with_q, block):
    steps = 3
    num_draft = [3, 0, 2, 3] if backend != "triton" else [2, 1]
    slots = [5, 0, 2, 7] if backend != "triton" else [3, 1]
    inp = mrv2_inputs(num_draft, slots, 8, steps, 11, seed=4, draft_logits=with_q, greedy=(2,))
    sampled, num_sampled = dv.rejection_sample_mrv2(**inp, use_block_verification=block, backend=backend)
    want, want_n = _mrv2_by_hand(inp, "block" if block else "token", backend)
    assert sampled.dtype == torch.int64 and num_sampled.dtype == torch.int32
    assert torch.equal(num_sampled, want_n.int())
    for r in range(len(num_draft)):
        k = int(num_sampled[r])
        assert sampled[r, :k].tolist() == want[r, :k].tolist()


def test_mrv2_greedy_slot_is_vllm_greedy():
    """A greedy slot (temperature 0): MRV2 accepts while the draft is the argmax and
    emits the argmax (the bonus row's argmax after a full match)."""
    inp = mrv2_inputs([3, 3], [1, 0], 2, 3, 6, seed=2, greedy=(0, 1))
    logits, ds, cu = inp["target_logits"], inp["draft_sampled"], inp["cu_num_logits"].tolist()
    for r in range(2):  # make the first draft of each request match
        ds[cu[r] + 1] = int(logits[cu[r]].argmax())
    sampled, num_sampled = dv.rejection_sample_mrv2(**inp)
    for r in range(2):
        rows = list(range(cu[r], cu[r + 1]))
        want = greedy_chain([int(ds[i + 1]) for i in rows[:-1]], [int(logits[i].argmax()) for i in rows[:-1]],
                            int(logits[rows[-1]].argmax()))
        assert sampled[r, :int(num_sampled[r])].tolist() == want


@pytest.mark.parametrize("block", [False, True])
@needs_cpu_kernels
def test_mrv2_chi2(block):
    """MRV2's law: p = softmax(processed target logits), q = softmax(draft_logits[slot, j]),
    bonus from p_n; the block method has the same law."""
    copies, steps, vocab = 10000, 2, 5
    one = mrv2_inputs([steps], [0], 1, steps, vocab, seed=9)
    L = steps + 1
    inp = dict(one)
    inp["target_logits"] = one["target_logits"].repeat(copies, 1)
    inp["draft_sampled"] = one["draft_sampled"].repeat(copies)
    inp["cu_num_logits"] = torch.arange(copies + 1, dtype=torch.int32) * L
    inp["pos"] = one["pos"].repeat(copies)
    inp["idx_mapping"] = torch.zeros(copies, dtype=torch.int32)
    inp["expanded_idx_mapping"] = torch.zeros(copies * L, dtype=torch.int32)
    inp["expanded_local_pos"] = one["expanded_local_pos"].repeat(copies)
    inp["seed"] = torch.zeros(1, dtype=torch.int64)
    inp["temperature"] = torch.ones(1)
    # one slot, one seed for all: distinct streams through distinct positions
    inp["pos"] = inp["pos"] + torch.arange(copies).repeat_interleave(L) * 1000
    sampled, num_sampled = dv.rejection_sample_mrv2(**inp, use_block_verification=block)
    drafts = [int(one["draft_sampled"][i + 1]) for i in range(steps)]
    law = chain_law(softmax_rows(one["target_logits"]), softmax_rows(one["draft_logits"][0]), drafts)
    outcomes = [(int(k) - 1, int(row[int(k) - 1])) for row, k in zip(sampled.tolist(), num_sampled.tolist())]
    chi2_outcomes(outcomes, law, f"mrv2 block={block}")


def test_mrv2_method_spellings_and_errors():
    inp = mrv2_inputs([2, 1], [1, 0], 2, 2, 7, seed=1)
    a = dv.rejection_sample_mrv2(**inp, use_block_verification=True)
    b = dv.rejection_sample_mrv2(**inp, rejection_sample_method="block")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(NotImplementedError, match="synthetic"):
        dv.rejection_sample_mrv2(**dict(inp, synthetic_conditional_rates=torch.ones(2)))
    with pytest.raises(ValueError, match="rejection_sample_method"):
        dv.rejection_sample_mrv2(**inp, rejection_sample_method="fast")
    with pytest.raises(NotImplementedError, match="watermark"):
        dv.rejection_sample_mrv2(**inp, watermark_key=3, contexts=torch.zeros(3, dtype=torch.int64))


def test_mrv2_seed_batch_invariant():
    """A request's output depends only on its slot's seed, temperature and its positions."""
    base = mrv2_inputs([3, 2, 3], [4, 1, 6], 8, 3, 9, seed=6, positions=[50, 60, 70])
    sampled, num = dv.rejection_sample_mrv2(**base)
    # request 2 alone, in slot 0, with slot 6's seed / temperature copied there
    alone = mrv2_inputs([3], [0], 8, 3, 9, seed=6, positions=[70])
    cu = base["cu_num_logits"].tolist()
    alone["target_logits"] = base["target_logits"][cu[2]:cu[3]]
    alone["draft_sampled"] = base["draft_sampled"][cu[2]:cu[3]]
    alone["seed"][0] = base["seed"][6]
    alone["temperature"][0] = base["temperature"][6]
    alone["draft_logits"][0] = base["draft_logits"][6]
    s2, n2 = dv.rejection_sample_mrv2(**alone)
    assert int(n2[0]) == int(num[2])
    assert s2[0, :int(n2[0])].tolist() == sampled[2, :int(num[2])].tolist()


def test_mrv2_reads_draft_logits_in_place(monkeypatch):
    seen = {}
    real = dk.verify_block

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(dv, "_verify_block", spy)
    inp = mrv2_inputs([2, 2], [1, 0], 3, 2, 7, seed=1)
    dv.rejection_sample_mrv2(**inp)
    assert seen["draft_logits"].data_ptr() == inp["draft_logits"].data_ptr()
    assert "draft_index" in seen


# ----------------------------------------------------------------------------------------
# min-p, engine-side processing, log-probs


def _min_p_case(copies=12000):
    vocab, drafts = 6, [1]
    g = torch.Generator().manual_seed(21)
    logits_one = torch.randn(2, vocab, generator=g) * 2
    spec = _repeat(drafts, copies)
    sm = vllm_sampling_metadata(temperature=torch.ones(copies), min_p=torch.full((copies,), 0.2))
    return logits_one, spec, sm, drafts


@needs_cpu_kernels
def test_rejection_sampler_min_p_chi2():
    logits_one, spec, sm, drafts = _min_p_case()
    out = dv.RejectionSampler()(vllm_spec_decode_metadata(spec), None, logits_one.repeat(len(spec), 1),
                                sm).sampled_token_ids
    p = []
    for row in softmax_rows(logits_one):
        keep = [x if x >= 0.2 * max(row) else 0.0 for x in row]
        p.append([x / sum(keep) for x in keep])
    chi2_outcomes([chain_outcome(r, 1) for r in out.tolist()], chain_law(p, None, drafts), "forward min_p")



def test_engine_side_processing_is_the_engines():
    spec = [[1, 2]]
    logits = torch.randn(3, 5)
    sm = vllm_sampling_metadata(temperature=torch.ones(1))
    sm.no_penalties = False
    with pytest.raises(NotImplementedError, match="penalties"):
        dv.RejectionSampler()(vllm_spec_decode_metadata(spec), None, logits, sm)
    sm.no_penalties, sm.bad_words_token_ids = True, {0: [[3]]}
    with pytest.raises(NotImplementedError, match="bad_words"):
        dv.RejectionSampler()(vllm_spec_decode_metadata(spec), None, logits, sm)
    sm.bad_words_token_ids = {}
    sm.logitsprocs.all.append(SimpleNamespace(biases={0: {2: 1.5}}))
    with pytest.raises(NotImplementedError, match="logit_bias"):
        dv.RejectionSampler()(vllm_spec_decode_metadata(spec), None, logits, sm)
    calls = []

    def processor(x, sampling_metadata, metadata):  # the engine's hook: here it bans token 3
        calls.append(x.shape)
        x = x.clone()
        x[:, 3] = -float("inf")
        return x

    sm = vllm_sampling_metadata(temperature=torch.ones(1))
    sm.bad_words_token_ids = {0: [[3]]}
    for _ in range(20):
        out = dv.RejectionSampler(logits_processor=processor)(vllm_spec_decode_metadata(spec), None, logits, sm)
        assert 3 not in out.sampled_token_ids.tolist()[0]
    assert calls and calls[0] == (3, 5)
    sm.max_num_logprobs = 2  # log-probs of the raw rows (vLLM's default raw_logprobs), before the hook
    out = dv.RejectionSampler(logits_processor=processor)(vllm_spec_decode_metadata(spec), None, logits, sm)
    assert out.logprobs_tensors.logprobs.shape[1] == 3
    with pytest.raises(NotImplementedError, match="processed_logprobs"):
        dv.RejectionSampler(logits_processor=processor, logprobs_mode="processed_logprobs")(
            vllm_spec_decode_metadata(spec), None, logits, sm)


@pytest.mark.parametrize("mode", ["raw_logprobs", "raw_logits"])
def test_rejection_sampler_logprobs_tensors_match_vllm_semantics(mode):
    """max_num_logprobs = k: for every output token in row-major order, [token, top-k] ids,
    their values under the raw row the token came from, and the token's rank — computed
    here per token from vLLM's definition (log_softmax or raw logits; rank = #{v: lp_v >= lp_x})."""
    torch.manual_seed(3)
    spec = [[1, 2, 0], [], [4, 4]]
    vocab, k = 6, 3
    rows = sum(len(s) + 1 for s in spec)
    logits = torch.randn(rows, vocab) * 2
    for mode_t in (None, torch.tensor([0.0, 1.0, 1.0])):
        sm = vllm_sampling_metadata(temperature=mode_t) if mode_t is not None else vllm_sampling_metadata()
        sm.max_num_logprobs = k
        sampler = dv.RejectionSampler(logprobs_mode=mode)
        res = sampler(vllm_spec_decode_metadata(spec), None, logits, sm)
        out = res.sampled_token_ids
        got = res.logprobs_tensors
        ids, vals, ranks = [], [], []
        row = 0
        for b, s in enumerate(spec):
            for j in range(len(s) + 1):
                x = int(out[b, j])
                if x != -1:
                    r = logits[row + j].double()
                    lp = r if mode == "raw_logits" else r - torch.logsumexp(r, 0)
                    order = sorted(range(vocab), key=lambda v: (-float(lp[v]), v))[:k]
                    ids.append([x] + order)
                    vals.append([float(lp[x])] + [float(lp[v]) for v in order])
                    ranks.append(sum(1 for v in range(vocab) if float(lp[v]) >= float(lp[x])))
            row += len(s) + 1
        assert got.logprob_token_ids.dtype == torch.int32
        assert got.logprob_token_ids[:, 0].tolist() == [i[0] for i in ids]
        assert torch.allclose(got.logprobs.double(), torch.tensor(vals, dtype=torch.float64), atol=1e-5)
        assert got.selected_token_ranks.tolist() == ranks
        # the top-k ids: equal to the oracle's except where values tie (none with random rows)
        assert got.logprob_token_ids[:, 1:].tolist() == [i[1:] for i in ids]


def test_empty_batches():
    metadata = vllm_spec_decode_metadata([])
    out = dv.RejectionSampler()(metadata, None, torch.randn(0, 5), vllm_sampling_metadata())
    assert out.sampled_token_ids.shape == (0, 1)
    out = dv.rejection_sample(metadata.draft_token_ids, [], 0, metadata.cu_num_draft_tokens, None, torch.rand(0, 5),
                              torch.zeros(0, 1, dtype=torch.int64),
                              vllm_sampling_metadata(temperature=torch.ones(0), all_greedy=False))
    assert out.shape == (0, 1)
    sampled, num_sampled = dv.rejection_sample_mrv2(**mrv2_inputs([], [], 2, 3, 5))
    assert sampled.shape == (0, 4) and num_sampled.shape == (0,)


def test_bad_layout_is_an_error():
    with pytest.raises(ValueError, match="rows"):
        dv.RejectionSampler()(vllm_spec_decode_metadata([[1, 2]]), None, torch.randn(5, 5),
                              vllm_sampling_metadata())
    with pytest.raises(ValueError, match="bonus tokens"):
        dv.RejectionSampler()(vllm_spec_decode_metadata([[1, 2]]), None, torch.randn(2, 5),
                              vllm_sampling_metadata())


# ----------------------------------------------------------------------------------------
# GPU: CUDA graphs and no host syncs; vLLM itself when installed


def test_no_host_reads_meta_tensors():
    """The CPU stand-in for "no host sync": on meta tensors (shapes, no data) every read of
    a value fails, so an adapter that runs there never reads the device back."""
    meta = "meta"
    metadata = vllm_spec_decode_metadata([[1, 2, 3], [4], [0, 0]], device=meta)
    sm = vllm_sampling_metadata(temperature=torch.full((3,), 0.7), top_p=torch.full((3,), 0.9))
    sm.temperature, sm.top_p = sm.temperature.to(meta), sm.top_p.to(meta)
    pos = torch.zeros(3, dtype=torch.int64, device=meta)
    out = dv.RejectionSampler()(metadata, None, torch.randn(9, 32, device=meta), sm, positions=pos)
    assert out.sampled_token_ids.shape == (3, 4) and out.sampled_token_ids.device.type == meta
    out = dv.rejection_sample(metadata.draft_token_ids, [3, 1, 2], 3, metadata.cu_num_draft_tokens, None,
                              torch.rand(6, 32, device=meta), torch.zeros(3, 1, dtype=torch.int64, device=meta), sm,
                              positions=pos)
    assert out.shape == (3, 4)
    inp = mrv2_inputs([2, 3], [1, 0], 2, 3, 32)
    inp = {k: (v.to(meta) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    for block in (False, True):
        sampled, num_sampled = dv.rejection_sample_mrv2(**inp, use_block_verification=block)
        assert sampled.shape == (2, 4) and num_sampled.shape == (2,)


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_and_no_sync():
    dev = "cuda"
    spec = [[1, 2, 3], [4], [0, 0]]
    metadata = vllm_spec_decode_metadata(spec, device=dev)
    logits = torch.randn(9, 32, device=dev)
    sm = vllm_sampling_metadata(temperature=torch.full((3,), 0.7, device=dev), top_p=torch.full((3,), 0.9, device=dev))
    sampler = dv.RejectionSampler()
    inp = mrv2_inputs([2, 3], [1, 0], 2, 3, 32, seed=3)
    inp = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    seed = torch.tensor([1, 2, 3], device=dev)
    pos = torch.tensor([10, 20, 30], device=dev)

    def step():
        a = sampler(metadata, None, logits, sm, positions=pos).sampled_token_ids
        b, c = dv.rejection_sample_mrv2(**inp)
        return a, b, c

    step()  # warm up (compiles / loads kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    # the MRV2 call is fully seeded: the replay equals the eager result
    assert torch.equal(captured[1], eager[1]) and torch.equal(captured[2], eager[2])
    assert captured[0].shape == eager[0].shape
    del seed


def _vllm_rejection_sample():
    try:
        from vllm.v1.sample.rejection_sampler import rejection_sample  # type: ignore
    except Exception:  # noqa: BLE001
        return None
    return rejection_sample


@pytest.mark.cuda
@pytest.mark.skipif(_vllm_rejection_sample() is None or not torch.cuda.is_available(),
                    reason="needs vLLM and a GPU")
def test_same_as_vllm_greedy():
    vllm_fn = _vllm_rejection_sample()
    g = torch.Generator().manual_seed(0)
    n = [3, 1, 0, 2]
    spec = [torch.randint(0, 20, (k,), generator=g).tolist() for k in n]
    metadata = vllm_spec_decode_metadata(spec, device="cuda")
    probs = torch.softmax(torch.randn(sum(n), 20, generator=g) * 4, -1).cuda()
    bonus = torch.randint(0, 20, (4, 1), generator=g).cuda()
    sm = vllm_sampling_metadata()
    want = vllm_fn(metadata.draft_token_ids, n, 3, metadata.cu_num_draft_tokens, None, probs, bonus, sm)
    got = dv.rejection_sample(metadata.draft_token_ids, n, 3, metadata.cu_num_draft_tokens, None, probs, bonus, sm)
    assert torch.equal(got, want)


@pytest.mark.cuda
@needs_cpu_kernels
@pytest.mark.skipif(_vllm_rejection_sample() is None or not torch.cuda.is_available(),
                    reason="needs vLLM and a GPU")
def test_same_law_as_vllm_sampled():
    """vLLM's own sampled outputs follow the oracle's chain law too (so the oracle that
    ours passes describes vLLM)."""
    vllm_fn = _vllm_rejection_sample()
    vocab, drafts, copies = 5, [1, 3], 12000
    g = torch.Generator().manual_seed(11)
    p_one = torch.softmax(torch.randn(len(drafts), vocab, generator=g), -1)
    q_one = torch.softmax(torch.randn(len(drafts), vocab, generator=g), -1)
    metadata = vllm_spec_decode_metadata(_repeat(drafts, copies), device="cuda")
    sm = vllm_sampling_metadata(temperature=torch.ones(copies, device="cuda"))
    want = vllm_fn(metadata.draft_token_ids, [2] * copies, 2, metadata.cu_num_draft_tokens,
                   q_one.repeat(copies, 1).cuda(), p_one.repeat(copies, 1).cuda(),
                   torch.full((copies, 1), 4, device="cuda"), sm)
    law = chain_law(softmax_rows(p_one.log()) + [None], softmax_rows(q_one.log()), drafts, bonus=4)
    chi2_outcomes([chain_outcome(r, 2) for r in want.cpu().tolist()], law, "vLLM's rejection_sample")


def _vllm_mrv2_rejection_sample():
    try:
        from vllm.v1.worker.gpu.spec_decode.rejection_sampler_utils import rejection_sample  # type: ignore
    except Exception:  # noqa: BLE001
        return None
    return rejection_sample


@pytest.mark.cuda
@pytest.mark.skipif(_vllm_mrv2_rejection_sample() is None or not torch.cuda.is_available(),
                    reason="needs vLLM (Model Runner V2) and a GPU")
def test_same_as_vllm_mrv2_greedy():
    vllm_fn = _vllm_mrv2_rejection_sample()
    inp = mrv2_inputs([3, 1, 2], [2, 0, 1], 3, 3, 40, seed=5, greedy=(0, 1, 2))
    inp = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    want, want_n = vllm_fn(**inp)
    got, got_n = dv.rejection_sample_mrv2(**inp)
    assert torch.equal(got_n, want_n)
    for r in range(3):
        k = int(want_n[r])
        assert got[r, :k].tolist() == want[r, :k].tolist()
