"""The reference draft/verify loop (dspark_kernels.loop): every op working together.

Tiny untrained models (the trained ones are the main job's); what is checked:
* greedy output equals the target's own greedy decoding, recomputed from scratch
  without any cache, for prompts of different lengths joining a small batch, with
  static γ and with the DSpark scheduler;
* sampled output follows the target's sampling distribution (χ² on the first two
  tokens, drafter and scheduler in the loop);
* the fused ops and the references give identical tokens; a request's tokens do
  not depend on its batch neighbours;
* after every step the paged KV cache equals a cache rebuilt from scratch for the
  committed tokens, the drafter's window holds the right rows, and pages are
  accounted for (refcounts, free list).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import dspark_kernels

from dspark_kernels.loop import Drafter, DrafterConfig, OpTimers, Request, SpecDecoder, Target, TargetConfig
from dspark_kernels.loop.train import TrainConfig, distill_losses, train_drafter, train_target

from conftest import requires_cuda
from helpers import chi2_check

DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]


def tiny_models(vocab=16, seed=0, device="cpu", sharp=3.0):
    """Untrained models; ``sharp`` scales the tied embedding so distributions are not flat."""
    torch.manual_seed(seed)
    tc = TargetConfig(vocab_size=vocab, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                      moe_layers=(1,), n_experts=4, top_k=2, d_expert=24, hidden_layers=(0, 2))
    dc = DrafterConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=48, window=8, max_gamma=8,
                       markov_rank=4)
    target = Target(tc)
    with torch.no_grad():
        target.embed.weight.mul_(sharp)
    drafter = Drafter(dc, target)
    with torch.no_grad():
        drafter.markov_w1.normal_(0, 0.5)       # exercise the Markov head (zero at init)
    return target.to(device).eval(), drafter.to(device).eval()


def dense_greedy(target, prompt, n, eos_id=None):
    """Greedy decoding by recomputing the whole sequence each token (no cache at all)."""
    seq = list(prompt)
    dev = target.embed.weight.device
    with torch.no_grad():
        for _ in range(n):
            logits, _ = target.forward_dense(torch.tensor([seq], device=dev))
            seq.append(int(logits[0, -1].argmax()))
            if seq[-1] == eos_id:
                break
    return seq[len(prompt):]


def make_prompts(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def engine(target, drafter, gamma, schedule="static", backend=None, max_batch=3, page_size=4, max_len=96,
           sps=None):
    if schedule == "dspark" and sps is None:
        # A made-up steps-per-second table: flat, then falling, so the scheduler
        # admits some drafts and rejects others.
        bmax = max_batch * (gamma + 1)
        sps = 1.0 / (1.0 + 0.15 * torch.arange(bmax + 1).clamp(min=max_batch).float())
    return SpecDecoder(target, drafter, gamma=gamma, schedule=schedule, sps=sps, backend=backend,
                       max_batch=max_batch, page_size=page_size, max_len=max_len)


# ---------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule,gamma", [("static", 1), ("static", 4), ("dspark", 5)])
def test_greedy_equals_target_greedy(device, schedule, gamma):
    target, drafter = tiny_models(device=device)
    lengths = [1, 3, 17, 40, 6]
    max_new = [12, 30, 7, 25, 1]
    prompts = make_prompts(16, lengths)
    reqs = [Request(p, max_new_tokens=m) for p, m in zip(prompts, max_new)]
    eng = engine(target, drafter, gamma, schedule)
    eng.generate(reqs)          # 5 requests, 3 slots: two join later
    for r, p, m in zip(reqs, prompts, max_new):
        assert r.output == dense_greedy(target, p, m), f"prompt length {len(p)}"
        assert r.finished and len(r.output) == m
    assert sum(r.accepted for r in reqs) > 0, "the drafter never had a draft accepted: the test is not exercising it"
    if schedule == "dspark":
        assert 0 < sum(r.drafted for r in reqs) < sum(r.steps for r in reqs) * gamma, "scheduler did not trim"
    # Autoregressive decoding through the same engine agrees too.
    ar = [Request(p, max_new_tokens=m) for p, m in zip(prompts, max_new)]
    engine(target, None, 0).generate(ar)
    assert [r.output for r in ar] == [r.output for r in reqs]
    assert all(r.steps == len(r.output) for r in ar)


def test_greedy_stops_at_eos():
    target, drafter = tiny_models()
    prompts = make_prompts(16, [5, 9, 2], seed=3)
    expect = [dense_greedy(target, p, 40) for p in prompts]
    eos = expect[0][6]          # a token the first request emits mid-way
    reqs = [Request(p, max_new_tokens=40, eos_id=eos) for p in prompts]
    engine(target, drafter, 4).generate(reqs)
    for r, full in zip(reqs, expect):
        want = full[: full.index(eos) + 1] if eos in full else full
        assert r.output == want
    assert reqs[0].output[-1] == eos and len(reqs[0].output) <= 7


# ---------------------------------------------------------------------------------------------- sampling


def _first_two_token_probs(target, prompt, temperature, top_k):
    """Exact joint law of the first two sampled tokens: p(x1 | prompt) · p(x2 | prompt, x1)."""
    vocab = target.cfg.vocab_size

    def dist(seq):
        logits, _ = target.forward_dense(torch.tensor([seq], device=target.embed.weight.device))
        s = logits[0, -1].double() / temperature
        if top_k:
            s = s.masked_fill(s < s.topk(top_k).values[-1], -torch.inf)
        return torch.softmax(s, -1)

    with torch.no_grad():
        p1 = dist(prompt)
        return torch.stack([p1[a] * dist(prompt + [a]) for a in range(vocab)]).reshape(-1).cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule,temperature,top_k", [("dspark", 1.0, 0), ("static", 0.7, 3)])
def test_sampling_follows_target_distribution(schedule, temperature, top_k, device):
    """χ² (false alarm 1e-6) of the first two generated tokens over 20 000 seeds."""
    vocab, n = 4, 20_000
    target, drafter = tiny_models(vocab=vocab, seed=5, sharp=1.5, device=device)
    prompt = [1, 3, 0, 2, 2]
    reqs = [Request(prompt, max_new_tokens=3, temperature=temperature, top_k=top_k, seed=s) for s in range(n)]
    # Steps per second falling slowly with the batch: at R = 5000 requests a draft is
    # worth verifying when its survival is above about 0.15, so the untrained
    # drafter's first positions (~0.25) are verified and its second (~0.09) trimmed.
    sps = 1.0 / (1.0 + 3.5e-5 * torch.arange(5000 * 4 + 1).float())
    eng = engine(target, drafter, 3, schedule, max_batch=5000, max_len=16, sps=sps)
    eng.generate(reqs)
    pairs = torch.tensor([r.output[0] * vocab + r.output[1] for r in reqs])
    chi2_check(pairs, _first_two_token_probs(target, prompt, temperature, top_k), f"{schedule} T={temperature}")
    accepted, drafted = sum(r.accepted for r in reqs), sum(r.drafted for r in reqs)
    assert accepted > n // 10, f"only {accepted} drafts accepted: the drafter is not in the loop"
    if schedule == "dspark":
        assert drafted < 0.9 * sum(r.steps for r in reqs) * 2, "the scheduler trimmed nothing"


# ---------------------------------------------------------------------------------------------- backends, batch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["static", "dspark"])
def test_reference_and_fused_backends_give_identical_tokens(schedule, device):
    target, drafter = tiny_models(seed=2, device=device)
    prompts = make_prompts(16, [4, 11, 2, 23], seed=4)
    params = [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.8, top_k=5),
              dict(temperature=1.3, top_p=0.8)]

    def run(backend):
        reqs = [Request(p, max_new_tokens=14, seed=100 + i, **kw) for i, (p, kw) in enumerate(zip(prompts, params))]
        engine(target, drafter, 4, schedule, backend=backend).generate(reqs)
        return [r.output for r in reqs], [r.drafted for r in reqs]

    assert run("reference") == run(None)


TRITON_LOOP_OPS = {"verify_block": "triton", "draft_sample_block": "triton", "schedule_verify_lens": "triton",
                   "draft_block_attention": "triton", "fused_moe": "triton"}


@pytest.mark.skipif(not dspark_kernels.backends("verify_block")["triton"], reason="Triton not importable")
@pytest.mark.parametrize("schedule", ["static", "dspark"])
def test_triton_kernels_in_the_loop_give_the_reference_tokens(schedule):
    """Every op with a Triton kernel runs it (the GPU backend; the interpreter here) inside
    the loop: same tokens as the references. On a GPU machine it runs there (CUDA
    tensors); without one, under the interpreter on the CPU."""
    target, drafter = tiny_models(seed=6, device="cuda" if torch.cuda.is_available() else "cpu")
    prompts = make_prompts(16, [5, 12], seed=9)

    def run(backend):
        reqs = [Request(p, max_new_tokens=8, seed=40 + i, temperature=[1.0, 0.0][i], top_k=[4, 0][i])
                for i, p in enumerate(prompts)]
        engine(target, drafter, 3, schedule, backend=backend, max_batch=2).generate(reqs)
        return [r.output for r in reqs], [r.drafted for r in reqs]

    assert run(TRITON_LOOP_OPS) == run("reference")
    with pytest.raises(ValueError, match="backend"):
        engine(target, drafter, 3, backend={"verify": "triton"})


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_request_output_independent_of_batch_neighbours(temperature):
    """With static γ a request's tokens are a function of its own seed and prompt only.

    (With the scheduler and sampling, ``ℓ_r`` depends on the neighbours' confidences
    by design, which changes which random draws a request uses, not its distribution;
    greedy output stays the target's greedy output, tested above.)
    """
    target, drafter = tiny_models(seed=3)
    prompts = make_prompts(16, [7, 2, 15, 30, 5], seed=6)
    alone = []
    for i, p in enumerate(prompts):
        r = Request(p, max_new_tokens=16, temperature=temperature, seed=7 + i)
        engine(target, drafter, 3, max_batch=1).generate([r])
        alone.append(r.output)
    for order in (range(5), reversed(range(5))):
        order = list(order)
        reqs = [Request(prompts[i], max_new_tokens=16, temperature=temperature, seed=7 + i) for i in order]
        engine(target, drafter, 3, max_batch=3).generate(reqs)
        assert [r.output for r in reqs] == [alone[i] for i in order]


# ---------------------------------------------------------------------------------------------- caches


def _check_caches(eng: SpecDecoder, target: Target, drafter: Drafter):
    dev = eng.device
    in_use = set()
    for r in eng.active:
        seq = (r.prompt + r.output)[: r.committed]
        assert (r.prompt + r.output)[r.committed] == r.anchor
        assert len(r.pages) == -(-r.committed // eng.page_size), "pages past the committed length were kept"
        assert not in_use & set(r.pages)
        in_use |= set(r.pages)
        if not seq:
            continue
        with torch.no_grad():
            _, hidden, kv = target.forward_dense(torch.tensor([seq], device=dev), return_kv=True)
        pos = torch.arange(len(seq), device=dev)
        pages = torch.tensor(r.pages, device=dev)[pos // eng.page_size]
        for cache, rebuilt in zip(eng.kv_caches, kv):
            torch.testing.assert_close(cache[pages, pos % eng.page_size], rebuilt[0], atol=2e-5, rtol=1e-5)
        # Drafter window: slot t % W holds the projected hidden state of position t, last W positions.
        w = drafter.cfg.window
        with torch.no_grad():
            ctx = drafter.context_kv(hidden[0], pos)
        keep = pos[-w:]
        for (k_win, v_win), (k, v) in zip(eng.windows, ctx):
            torch.testing.assert_close(k_win[r.slot, keep % w], k[keep], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(v_win[r.slot, keep % w], v[keep], atol=2e-5, rtol=1e-5)
    assert len(in_use) + len(eng.free_pages) == eng.num_pages
    assert len(set(eng.free_pages)) == len(eng.free_pages)
    rc = eng.refcount.tolist()
    assert all(rc[p] == 1 for p in in_use) and all(rc[p] == 0 for p in eng.free_pages)


def decode_checking_caches(eng: SpecDecoder, target: Target, drafter: Drafter, prompts, temperature: float):
    """Decodes ``prompts`` (lengths 9, 20, 14, 6 tokens) to the end, checking the KV caches
    against a rebuild after every step; then no page may be left allocated."""
    for i, p in enumerate(prompts):
        eng.add_request(Request(p, max_new_tokens=[9, 20, 14, 6][i], temperature=temperature, seed=i))
    steps = 0
    while eng.has_work():
        eng.step()
        _check_caches(eng, target, drafter)
        steps += 1
    assert steps > 3
    assert len(eng.free_pages) == eng.num_pages and int(eng.refcount.sum()) == 0, "finished requests leaked pages"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("schedule,temperature", [("static", 1.0), ("dspark", 0.0)])
def test_kv_cache_equals_rebuilt_cache_after_every_step(backend, schedule, temperature, device):
    target, drafter = tiny_models(seed=4, device=device)
    prompts = make_prompts(16, [3, 13, 1, 20], seed=8)
    eng = engine(target, drafter, 5, schedule, backend=backend, max_batch=3, page_size=4)
    decode_checking_caches(eng, target, drafter, prompts, temperature)


# ---------------------------------------------------------------------------------------------- misc


def test_request_and_engine_errors_name_the_argument():
    target, drafter = tiny_models()
    with pytest.raises(ValueError, match="prompt"):
        Request([])
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request([1], max_new_tokens=0)
    eng = engine(target, drafter, 3, max_len=32)
    with pytest.raises(ValueError, match="max_len"):
        eng.add_request(Request([1] * 20, max_new_tokens=20))
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request(Request([99], max_new_tokens=2))
    with pytest.raises(ValueError, match="sps"):
        SpecDecoder(target, drafter, gamma=3, schedule="dspark")
    with pytest.raises(ValueError, match="gamma"):
        SpecDecoder(target, drafter, gamma=9)


def test_timers_and_sps_profile():
    target, drafter = tiny_models()
    eng = SpecDecoder(target, drafter, gamma=3, max_batch=2, page_size=4, max_len=64, timers=OpTimers())
    sps = eng.profile_sps(points=3, repeats=1)
    assert sps.shape == (2 * 4 + 1,) and bool((sps[1:] > 0).all()) and bool((sps[1:].diff() <= 0).all())
    eng.generate([Request([1, 2, 3], max_new_tokens=8)])
    for name in ("drafter forward", "draft_sample_block", "target forward", "verify_block", "kv_commit + release",
                 "window_commit"):
        assert eng.timers.calls[name] > 0, name


def test_fused_moe_layer_matches_training_path():
    target, _ = tiny_models()
    moe = target.layers[1].ffn
    x = torch.randn(37, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(x, fused=True), moe(x, fused=False), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe(x, fused=True, backend="reference"), moe(x, fused=False), atol=1e-5,
                                   rtol=1e-5)


def test_drafter_inference_path_matches_training_path():
    """Speculative decoding is lossless whatever the drafter does, so the tests above
    cannot see a drafter bug; this one can: at every step of a real run (windows that
    wrap, slots reused by later requests) the drafter's block logits and confidences
    from the engine's windows equal its training forward on the full sequence."""
    target, drafter = tiny_models(seed=4)
    gamma = 5
    prompts = make_prompts(16, [3, 13, 1, 20, 5, 2], seed=8)
    eng = engine(target, drafter, gamma, max_batch=3, page_size=4)
    for i, p in enumerate(prompts):
        eng.add_request(Request(p, max_new_tokens=[9, 20, 14, 6, 12, 10][i], temperature=1.0, seed=i))
    checked, wrapped = 0, False
    while eng.has_work():
        eng._admit()
        reqs = sorted(eng.active, key=lambda r: r.slot)
        wrapped |= any(r.committed > drafter.cfg.window for r in reqs)
        base, conf = drafter.forward_block(torch.tensor([r.anchor for r in reqs]),
                                           torch.tensor([r.committed for r in reqs]), gamma, eng.windows,
                                           torch.tensor([r.slot for r in reqs]), eng.max_batch)
        for b, r in enumerate(reqs):
            x = torch.tensor([(r.prompt + r.output)[: r.committed + 1] + [0] * gamma])
            with torch.no_grad():
                _, hidden = target.forward_dense(x)
                logits, c = drafter.forward_train(x, hidden, torch.tensor([[r.committed]]), gamma)
                prev = x[0, r.committed:r.committed + gamma]
                want = logits[0, 0] - drafter.markov_w1[prev] @ drafter.markov_w2   # forward_block is pre-Markov
            torch.testing.assert_close(base[b], want, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(conf[b], c[0, 0], atol=2e-5, rtol=1e-5)
            checked += 1
        eng.step()
    assert checked > 20 and wrapped, "the run never wrapped a drafter window"


def test_paged_forward_matches_dense_forward():
    target, _ = tiny_models(seed=9)
    eng = engine(target, None, 0, max_batch=2, page_size=4)
    prompts = make_prompts(16, [9, 14], seed=2)
    reqs = [Request(p, max_new_tokens=1) for p in prompts]
    for r in reqs:
        eng.add_request(r)
    eng._admit()
    toks = [[r.anchor] for r in reqs]
    _, _, _, _, logits, hidden = eng._target_pass(reqs, toks)
    for b, p in enumerate(prompts):
        with torch.no_grad():
            lg, hd = target.forward_dense(torch.tensor([p]))
        torch.testing.assert_close(logits[b], lg[0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hidden[b], hd[0, -1], atol=1e-4, rtol=1e-4)


def test_training_reduces_the_losses():
    """A few optimizer steps on a repetitive corpus: both training loops learn."""
    target, drafter = tiny_models(vocab=256, sharp=1.0)
    text = torch.tensor(list(itertools.islice(itertools.cycle(b"def f(x):\n    return x + 1\n\n"), 8000)),
                        dtype=torch.uint8)
    tc = TrainConfig(seq_len=32, batch=4, target_steps=40, target_lr=1e-2, drafter_steps=40, drafter_lr=1e-2,
                     drafter_anchors=4, drafter_gamma=4)
    t_losses = train_target(target, text, tc, log=None)
    assert sum(t_losses[-5:]) / 5 < 0.5 * sum(t_losses[:5]) / 5
    d_losses = train_drafter(drafter, target, text, tc, log=None)
    assert sum(d_losses[-5:]) / 5 < 0.7 * sum(d_losses[:5]) / 5
    x = text[:33].long()[None]
    ce, tv, bce = distill_losses(drafter, target, x, torch.tensor([[0, 10, 28]]), 4)
    assert 0 <= tv.item() <= 1 and ce.item() > 0 and bce.item() > 0


def test_main_job_runs_on_tiny_models(monkeypatch, capsys):
    """The main job's whole path (AR and speculative runs, per-op table, reference check)."""
    import dspark_kernels.loop.__main__ as job

    target, drafter = tiny_models(vocab=256, sharp=1.0)
    held_out = torch.tensor(list(b"import os\n\ndef main(argv):\n    return 0\n" * 20), dtype=torch.uint8)
    info = {"target_loss": 5.5, "drafter_loss": 6.0, "cached": "tiny", "held_out": held_out}
    monkeypatch.setattr(job, "load_or_train", lambda retrain=False: (target, drafter, info))
    assert job.main(["--prompts", "3", "--batch", "2", "1", "--temperature", "0", "1", "--max-new-tokens", "12",
                     "--gamma", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "greedy output identical to autoregressive decoding: yes (6/6 prompts over 2 runs)" in out
    assert "reference ops vs fused ops on prompt 0 (32 tokens): identical" in out
    assert "verify_block" in out and "tok/s" in out and "drafter/target" in out


def test_shipped_weights_load_and_match_their_hashes():
    """The weights in the package load into the configs their settings.json records, with the
    recorded sha256; the held-out number recorded there is a real cross-entropy."""
    import json

    from dspark_kernels.loop.train import WEIGHT_FILES, WEIGHTS_DIR, load_shipped

    settings = json.loads((WEIGHTS_DIR / "settings.json").read_text())
    total = sum((WEIGHTS_DIR / f).stat().st_size for f in WEIGHT_FILES.values())
    assert total <= 32 * 2**20
    target, drafter, loaded = load_shipped()
    assert loaded == settings
    assert target.cfg.n_layers >= 6 * drafter.cfg.n_layers
    assert 0.5 < settings["held_out_bits_per_byte"] < 8
    for name in ("target_config", "drafter_config", "train_config", "seed", "corpus", "sha256"):
        assert name in settings
    # the drafter's weights are its own (the tied embedding / LM head stay the target's)
    assert not any(k.startswith("target") for k in drafter.state_dict())


def test_train_and_save_round_trip_and_hash_check(tmp_path, monkeypatch):
    """The training path on a tiny config writes weights + settings that load back
    equal, and a changed weight file is refused."""
    import dspark_kernels.loop.train as train

    text = torch.tensor(list(itertools.islice(itertools.cycle(b"def f(x):\n    return x + 1\n\n"), 6000)),
                        dtype=torch.uint8)
    monkeypatch.setattr(train, "stdlib_corpus", lambda n, root=None: (text[:n], ["f.py"]))
    tcfg = TargetConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=48, moe_layers=(1,), n_experts=2,
                        top_k=1, d_expert=16, hidden_layers=(0, 1))
    dcfg = DrafterConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=48, window=16, max_gamma=4,
                         markov_rank=4)
    tc = TrainConfig(corpus_bytes=6000, seq_len=32, batch=2, target_steps=3, drafter_steps=3, drafter_anchors=2,
                     drafter_gamma=4)
    settings = train.train_and_save(tmp_path, tcfg, dcfg, tc, log=lambda *_: None)
    target, drafter, loaded = train.load_shipped(tmp_path)
    assert loaded["held_out_bits_per_byte"] == settings["held_out_bits_per_byte"]
    held_out = train.split_corpus(text)[1]
    assert train.held_out_bits_per_byte(target, held_out, 32) == pytest.approx(settings["held_out_bits_per_byte"])
    state = torch.load(tmp_path / "target.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values())
    again = train.train_and_save(tmp_path / "again", tcfg, dcfg, tc, log=lambda *_: None, reuse_target=tmp_path)
    assert again["held_out_bits_per_byte"] == settings["held_out_bits_per_byte"]
    state["embed.weight"][0, 0] += 1
    torch.save(state, tmp_path / "target.pt")
    with pytest.raises(RuntimeError, match="sha256"):
        train.load_shipped(tmp_path)
