"""dspark_kernels.distributed: vocabulary-parallel verify_block / draft_sample_block.

Every case runs on P gloo processes (P = 2, 3, 4) with uneven shards and a padded LM
head (columns past vocab_size hold NaN / huge values that must never matter), and
must give exactly the integers of the single-device reference op on the gathered
logits, on every rank. Bad input must raise a named ValueError on every rank, not hang
(bounded: the launcher kills the processes after TIMEOUT_S).
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels import distributed
from dspark_kernels.distributed.launch import spawn

TIMEOUT_S = 150

VERIFY_MODES = [
    {"greedy": True},
    {},
    {"draft_logits": True},
    {"draft_probs": True},
    {"top_k": True},
    {"top_p": True},
    {"min_p": True},
    {"draft_logits": True, "top_k": True, "top_p": True, "min_p": True},
    {"draft_probs": True, "top_p": True, "draft_index": True},
    {"draft_logits": True, "draft_index": True, "min_p": True},
]
DRAFT_MODES = [{"greedy": True}, {}, {"markov": True}, {"top_k": True, "top_p": True}, {"min_p": True, "markov": True},
               {"markov": True, "top_k": True, "top_p": True, "min_p": True}]


def _shards(rng: random.Random, vocab: int, world: int, pad: int) -> list[tuple[int, int]]:
    """Uneven (start, width >= 1) per rank tiling [0, vocab + pad)."""
    total = vocab + pad
    cuts = sorted(rng.sample(range(1, total), world - 1))
    bounds = [0] + cuts + [total]
    return [(bounds[r], bounds[r + 1] - bounds[r]) for r in range(world)]


def verify_case(case_seed: int, world: int) -> dict:
    rng = random.Random(case_seed)
    mode = VERIFY_MODES[case_seed % len(VERIFY_MODES)]
    pad = rng.choice([0, 0, 5])
    vocab = rng.choice([v for v in (1, 7, 37, 129, 300) if v + pad >= world])
    batch = rng.randint(1, 4)
    n = [rng.choice([0, 1, 2, 3, 5]) for _ in range(batch)]
    num_draft = sum(n)
    g = torch.Generator().manual_seed(case_seed)
    scale = rng.choice([0.3, 2.0, 6.0])
    target = torch.randn(num_draft + batch, vocab + pad, generator=g) * scale
    target[:, vocab:] = float("nan") if rng.random() < 0.5 else 1e30  # padding: must be ignored
    if rng.random() < 0.2 and vocab > 3:  # non-finite input inside the vocabulary
        target[0, 1] = float("nan")
        target[-1, 2] = float("inf") if rng.random() < 0.5 else float("-inf")
    cu = torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32)
    rows = torch.arange(num_draft) + torch.repeat_interleave(torch.arange(batch), torch.tensor(n))
    drafts = torch.argmax(torch.nan_to_num(target[rows, :vocab], nan=-1e9) + torch.randn(num_draft, vocab,
                                                                                    generator=g) * scale, 1)
    if num_draft and rng.random() < 0.3:
        drafts[rng.randrange(num_draft)] = -1  # padding id
    kw = {"seed": torch.randint(-2**62, 2**62, (batch,), generator=g),
          "offset": torch.randint(0, 2**40, (batch,), generator=g)}
    if not mode.get("greedy"):
        kw["temperature"] = torch.tensor([rng.choice([0.0, 0.6, 1.0, 1.0, 2.0]) for _ in range(batch)])
    q_rows = num_draft
    if mode.get("draft_index"):
        q_rows = max(num_draft + 2, 1)
        kw["draft_index"] = torch.randint(0, q_rows, (num_draft,), generator=g)
    if mode.get("draft_logits"):
        kw["draft_logits"] = torch.randn(q_rows, vocab + pad, generator=g) * scale
    if mode.get("draft_probs"):
        kw["draft_probs"] = torch.cat([torch.softmax(torch.randn(q_rows, vocab, generator=g) * scale, 1),
                                       torch.full((q_rows, pad), float("nan"))], 1)
    if mode.get("top_k"):
        kw["top_k"] = torch.tensor([rng.choice([0, 1, 2, 5, vocab - 1, vocab]) for _ in range(batch)],
                                   dtype=torch.int32)
    if mode.get("top_p"):
        kw["top_p"] = torch.tensor([rng.choice([1.0, 0.3, 0.8, 0.95]) for _ in range(batch)])
    if mode.get("min_p"):
        kw["min_p"] = torch.tensor([rng.choice([0.0, 0.02, 0.2, 1.0]) for _ in range(batch)])
    return {"target": target, "drafts": drafts, "cu": cu, "kw": kw, "vocab": vocab,
            "shards": _shards(rng, vocab, world, pad), "mode": mode}


def draft_case(case_seed: int, world: int) -> dict:
    rng = random.Random(case_seed)
    mode = DRAFT_MODES[case_seed % len(DRAFT_MODES)]
    pad = rng.choice([0, 3])
    vocab = rng.choice([v for v in (1, 7, 37, 129) if v + pad >= world])
    batch, gamma = rng.randint(1, 3), rng.randint(1, 4)
    g = torch.Generator().manual_seed(case_seed)
    base = torch.randn(batch, gamma, vocab + pad, generator=g) * rng.choice([0.5, 3.0])
    kw = {"seed": torch.randint(0, 2**62, (batch,), generator=g), "offset": torch.randint(0, 100, (batch,), generator=g)}
    if not mode.get("greedy"):
        kw["temperature"] = torch.tensor([rng.choice([0.0, 0.7, 1.0]) for _ in range(batch)])
    if mode.get("markov"):
        kw["markov_w1"] = torch.randn(vocab, 6, generator=g)
        kw["markov_w2"] = torch.randn(6, vocab + pad, generator=g)
    if mode.get("top_k"):
        kw["top_k"] = torch.tensor([rng.choice([0, 1, 3, vocab]) for _ in range(batch)], dtype=torch.int32)
    if mode.get("top_p"):
        kw["top_p"] = torch.tensor([rng.choice([1.0, 0.5, 0.9]) for _ in range(batch)])
    if mode.get("min_p"):
        kw["min_p"] = torch.tensor([rng.choice([0.0, 0.1, 0.5]) for _ in range(batch)])
    return {"base": base, "anchor": torch.randint(0, vocab, (batch,), generator=g), "kw": kw, "vocab": vocab,
            "shards": _shards(rng, vocab, world, pad), "mode": mode}


TREE_MODES = [{"greedy": True}, {}, {"draft_logits": True}, {"draft_probs": True}, {"top_k": True, "top_p": True},
              {"min_p": True, "draft_logits": True}, {"draft_probs": True, "draft_index": True}]


def tree_case(case_seed: int, world: int) -> dict:
    rng = random.Random(case_seed)
    mode = TREE_MODES[case_seed % len(TREE_MODES)]
    pad = rng.choice([0, 4])
    vocab = rng.choice([v for v in (1, 7, 37, 129) if v + pad >= world])
    batch = rng.randint(1, 3)
    n = [rng.randint(0, 6) for _ in range(batch)]
    parents = []
    for nb in n:
        parents += [rng.randint(-1, j - 1) for j in range(nb)]
    num_draft = sum(n)
    g = torch.Generator().manual_seed(case_seed)
    target = torch.randn(num_draft + batch, vocab + pad, generator=g) * rng.choice([0.3, 2.0, 5.0])
    target[:, vocab:] = float("nan")
    cu = torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32)
    drafts = torch.randint(0, vocab, (num_draft,), generator=g)
    for b in range(batch):  # most drafts are their parent row's argmax: deep walks
        for j in range(n[b]):
            i = int(cu[b]) + j
            parent_row = int(cu[b]) + b + (1 + parents[i] if parents[i] >= 0 else 0)
            if rng.random() < 0.6:
                drafts[i] = int(torch.argmax(target[parent_row, :vocab]))
    kw = {"seed": torch.randint(0, 2**62, (batch,), generator=g), "offset": torch.randint(0, 100, (batch,), generator=g)}
    if not mode.get("greedy"):
        kw["temperature"] = torch.tensor([rng.choice([0.0, 0.8, 1.0]) for _ in range(batch)])
    q_rows = num_draft
    if mode.get("draft_index"):
        q_rows = num_draft + 2
        kw["draft_index"] = torch.randint(0, q_rows, (num_draft,), generator=g)
    if mode.get("draft_logits"):
        kw["draft_logits"] = torch.randn(q_rows, vocab + pad, generator=g)
    if mode.get("draft_probs"):
        kw["draft_probs"] = torch.cat([torch.softmax(torch.randn(q_rows, vocab, generator=g), 1),
                                       torch.zeros(q_rows, pad)], 1)
    if mode.get("top_k"):
        kw["top_k"] = torch.tensor([rng.choice([0, 2, vocab]) for _ in range(batch)], dtype=torch.int32)
    if mode.get("top_p"):
        kw["top_p"] = torch.tensor([rng.choice([1.0, 0.7]) for _ in range(batch)])
    if mode.get("min_p"):
        kw["min_p"] = torch.tensor([rng.choice([0.0, 0.1]) for _ in range(batch)])
    return {"target": target, "drafts": drafts, "parents": torch.tensor(parents, dtype=torch.int64), "cu": cu,
            "kw": kw, "vocab": vocab, "shards": _shards(rng, vocab, world, pad), "mode": mode}


def _local(t: torch.Tensor | None, start: int, width: int) -> torch.Tensor | None:
    return None if t is None else t[..., start:start + width].contiguous()


def run_verify_cases(rank: int, world: int, seeds: list[int]) -> list:
    out = []
    for case_seed in seeds:
        c = verify_case(case_seed, world)
        start, width = c["shards"][rank]
        kw = dict(c["kw"])
        for name in ("draft_logits", "draft_probs"):
            if name in kw:
                kw[name] = _local(kw[name], start, width)
        tokens, accepted = distributed.verify_block(_local(c["target"], start, width), c["drafts"], c["cu"],
                                                    vocab_start=start, vocab_size=c["vocab"], **kw)
        out.append((tokens, accepted))
    return out


def run_draft_cases(rank: int, world: int, seeds: list[int]) -> list:
    out = []
    for case_seed in seeds:
        c = draft_case(case_seed, world)
        start, width = c["shards"][rank]
        kw = dict(c["kw"])
        if "markov_w2" in kw:
            kw["markov_w2"] = _local(kw["markov_w2"], start, width)
        tokens, logits = distributed.draft_sample_block(_local(c["base"], start, width), c["anchor"],
                                                        vocab_start=start, vocab_size=c["vocab"], **kw)
        out.append((tokens, logits))
    return out


def run_tree_cases(rank: int, world: int, seeds: list[int]) -> list:
    out = []
    for case_seed in seeds:
        c = tree_case(case_seed, world)
        start, width = c["shards"][rank]
        kw = dict(c["kw"])
        for name in ("draft_logits", "draft_probs"):
            if name in kw:
                kw[name] = _local(kw[name], start, width)
        out.append(distributed.verify_tree(_local(c["target"], start, width), c["drafts"], c["parents"], c["cu"],
                                           vocab_start=start, vocab_size=c["vocab"], **kw))
    return out


VERIFY_SEEDS = range(30)
TREE_SEEDS = range(18)
DRAFT_SEEDS = range(18)


def run_all_cases(rank: int, world: int) -> dict:
    """One process group per world size for every family (spawning costs more than the cases)."""
    return {"verify": run_verify_cases(rank, world, [1000 * world + i for i in VERIFY_SEEDS]),
            "tree": run_tree_cases(rank, world, [4000 * world + i for i in TREE_SEEDS]),
            "draft": run_draft_cases(rank, world, [7000 * world + i for i in DRAFT_SEEDS]),
            "bad": run_bad_inputs(rank, world)}


@functools.lru_cache(maxsize=None)
def _results(world: int) -> list[dict]:
    return spawn(run_all_cases, world, timeout_s=TIMEOUT_S)


def _expected_verify(c: dict):
    v = c["vocab"]
    kw = dict(c["kw"])
    for name in ("draft_logits", "draft_probs"):
        if name in kw:
            kw[name] = kw[name][:, :v]
    return dk.verify_block(c["target"][:, :v], c["drafts"], c["cu"], backend="reference", **kw)


def _expected_draft(c: dict):
    v = c["vocab"]
    kw = dict(c["kw"])
    if "markov_w2" in kw:
        kw["markov_w2"] = kw["markov_w2"][:, :v]
    return dk.draft_sample_block(c["base"][:, :, :v], c["anchor"], backend="reference", **kw)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_verify_tree_bit_identical_to_one_device(world):
    seeds = [4000 * world + i for i in TREE_SEEDS]
    results = [r["tree"] for r in _results(world)]
    accepted_total = 0
    for i, case_seed in enumerate(seeds):
        c = tree_case(case_seed, world)
        v = c["vocab"]
        kw = dict(c["kw"])
        for name in ("draft_logits", "draft_probs"):
            if name in kw:
                kw[name] = kw[name][:, :v]
        expected = dk.verify_tree(c["target"][:, :v], c["drafts"], c["parents"], c["cu"], backend="reference", **kw)
        accepted_total += int(expected[1].sum())
        for rank in range(world):
            for got, want in zip(results[rank][i], expected):
                assert torch.equal(got, want), (case_seed, c["mode"], rank, results[rank][i], expected)
    assert accepted_total > 0


@pytest.mark.parametrize("world", [2, 3, 4])
def test_verify_block_bit_identical_to_one_device(world):
    seeds = [1000 * world + i for i in VERIFY_SEEDS]
    results = [r["verify"] for r in _results(world)]
    accepted_total = 0
    for i, case_seed in enumerate(seeds):
        c = verify_case(case_seed, world)
        ref_tokens, ref_accepted = _expected_verify(c)
        for rank in range(world):
            tokens, accepted = results[rank][i]
            assert torch.equal(tokens, ref_tokens), (case_seed, c["mode"], rank, tokens, ref_tokens)
            assert torch.equal(accepted, ref_accepted), (case_seed, c["mode"], rank)
        accepted_total += int(ref_accepted.sum())
    assert accepted_total > 0  # the cases exercise acceptance, not only first-row rejections


@pytest.mark.parametrize("world", [2, 3, 4])
def test_draft_sample_block_bit_identical_to_one_device(world):
    seeds = [7000 * world + i for i in DRAFT_SEEDS]
    results = [r["draft"] for r in _results(world)]
    for i, case_seed in enumerate(seeds):
        c = draft_case(case_seed, world)
        ref_tokens, ref_logits = _expected_draft(c)
        gathered = torch.cat([results[r][i][1] for r in range(world)], 2)[:, :, :c["vocab"]]
        assert torch.equal(gathered, ref_logits), (case_seed, c["mode"])
        for rank in range(world):
            assert torch.equal(results[rank][i][0], ref_tokens), (case_seed, c["mode"], rank)


def run_bad_inputs(rank: int, world: int) -> list[str]:
    """Each scenario: every rank must raise a ValueError (its message returned)."""
    vocab = 10
    shards = [(r * 3, 3 if r < world - 1 else vocab - 3 * (world - 1)) for r in range(world)]
    start, width = shards[rank]
    target = torch.randn(3, width)
    drafts = torch.tensor([1, 2])
    cu = torch.tensor([0, 2])
    scenarios = {
        "gap": dict(vocab_start=start + (1 if rank == world - 1 else 0), vocab_size=vocab),
        "vocab_size": dict(vocab_start=start, vocab_size=vocab + (1 if rank == 0 else 0)),
        "draft_id_all": dict(vocab_start=start, vocab_size=vocab, drafts=torch.tensor([1, vocab])),
        "draft_id_one": dict(vocab_start=start, vocab_size=vocab,
                             drafts=torch.tensor([1, vocab + 5]) if rank == 0 else drafts),
        "shape_one": dict(vocab_start=start, vocab_size=vocab, target=torch.randn(4, width) if rank == 1 else target),
    }
    messages = []
    for name, s in scenarios.items():
        try:
            distributed.verify_block(s.get("target", target), s.get("drafts", drafts), cu, vocab_start=s["vocab_start"],
                                     vocab_size=s["vocab_size"], temperature=torch.tensor([1.0]), seed=1, offset=0)
            messages.append(f"{name}: no error")
        except ValueError as e:
            messages.append(f"{name}: {e}")
    # The group still works after the errors: a good call on every rank.
    tokens, _ = distributed.verify_block(torch.full((3, width), 0.0), drafts, cu, vocab_start=start, vocab_size=vocab)
    messages.append(f"good: {tokens.tolist()}")
    return messages


@pytest.mark.parametrize("world", [2, 3, 4])
def test_bad_input_raises_on_every_rank(world):
    results = [r["bad"] for r in _results(world)]
    expected = {"gap": "tile", "vocab_size": "vocab_size must be the same", "draft_id_all": "draft_tokens[1] = 10",
                "shape_one": "rank 1 rejected its inputs"}
    for rank, messages in enumerate(results):
        got = dict(m.split(": ", 1) for m in messages)
        for name, fragment in expected.items():
            if name == "shape_one" and rank == 1:
                fragment = "target_logits must have N + B"
            assert fragment in got[name], (rank, name, got[name])
        one = "draft_tokens[1] = 15" if rank == 0 else "rank 0 rejected its inputs"
        assert one in got["draft_id_one"], (rank, got["draft_id_one"])
        assert got["good"] == "[[0, -1, -1]]"  # greedy: argmax 0 rejects draft 1


def test_world_size_one_without_a_process_group():
    """No torch.distributed at all: the ops are the single-device ops (the docstring cases)."""
    for case_seed in range(20):
        c = verify_case(case_seed, 1)
        kw = dict(c["kw"])
        tokens, accepted = distributed.verify_block(c["target"], c["drafts"], c["cu"], vocab_start=0,
                                                    vocab_size=c["vocab"], **kw)
        ref_tokens, ref_accepted = _expected_verify(c)
        assert torch.equal(tokens, ref_tokens) and torch.equal(accepted, ref_accepted), (case_seed, c["mode"])


def test_bench_verify_tp_counts_bytes_and_checks(tmp_path):
    """`dspark-bench verify --tp 2`: both implementations on the same shards agree, and the
    shards' bytes per call are the counted collectives (a tiny fraction of the all-gather's)."""
    import json

    from dspark_kernels.bench.__main__ import main

    js = tmp_path / "tp.json"
    rc = main(["verify", "--tp", "2", "--quick", "--batch", "1", "4", "--mode", "greedy", "sample-draft-logits",
               "--device", "cpu", "--quiet", "--repeat", "2", "--json", str(js)])
    assert rc == 0
    cases = json.loads(js.read_text())["cases"]
    assert {c["backend"] for c in cases} == {"tp-shards", "tp-gather"}
    for c in cases:
        assert c["correct"] is True and c["status"] == "ok" and c["tp"] == 2
    for shards in (c for c in cases if c["backend"] == "tp-shards"):
        gather = next(c for c in cases if c["backend"] == "tp-gather" and c["group"] == shards["group"]
                      and c["batch"] == shards["batch"])
        rows = shards["batch"] * (shards["gamma"] + 1)
        # the all-gather sends this rank's [rows, V / 2] fp32 target shard (and the draft shard)
        assert gather["bytes_per_rank"] >= rows * 500 * 4
        assert 0 < shards["bytes_per_rank"] < gather["bytes_per_rank"] / 10


def test_loop_tp2_gives_the_tokens_of_tp1():
    """`python -m dspark_kernels.loop --tp 2`: the target's LM head on two gloo processes,
    greedy and T = 1, the same tokens on every rank as at world size 1."""
    import argparse

    from dspark_kernels.loop.tp import main_tp

    args = argparse.Namespace(tp=2, gamma=5, batch=[2], temperature=[0.0, 1.0], repeats=1, max_new_tokens=12,
                              prompts=None, retrain=False, method="token", tree=False, tree_branch="2",
                              tree_siblings="top-k", schedule="static")
    assert main_tp(args) == 0
