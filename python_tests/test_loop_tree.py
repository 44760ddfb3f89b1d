"""The loop's tree mode (loop/tree.py) and block-verified chains, on tiny untrained models.

What is checked:
* the tree layout (parents, depths, ancestor mask) and its drafting rule;
* the tree attention mask: every node's target logits / hidden states from the one
  flattened tree pass equal a sequential forward along the node's root path;
* greedy output of tree mode, and of chains verified with ``method="block"``, equals
  autoregressive decoding (recomputed from scratch without a cache);
* after every step the paged KV cache (kv_commit of non-prefix paths) equals a
  cache rebuilt from scratch, the drafter's window holds the right rows, pages are
  accounted for;
* sampling: χ² (false alarm 1e-6) of the first two tokens against the exact target
  law; a request's tokens do not depend on its batch neighbours; reference and
  fused ops give identical tokens.
"""

from __future__ import annotations

import pytest
import torch

from dspark_kernels.loop import Request, SpecDecoder
from dspark_kernels.loop.tree import TreeLayout, draft_tree, parse_branches, sample_tree

from helpers import chi2_check
from test_loop import _first_two_token_probs, decode_checking_caches, dense_greedy, make_prompts, tiny_models


def tree_engine(target, drafter, depth=4, branches=(2, 2), max_batch=3, page_size=4, max_len=128, **kw):
    return SpecDecoder(target, drafter, gamma=depth, tree=branches, max_batch=max_batch, page_size=page_size,
                       max_len=max_len, **kw)


# ---------------------------------------------------------------------------------------------- layout


def test_tree_layout_shape_and_ancestors():
    t = TreeLayout.build(4, (2, 2))
    assert t.num_nodes == 14 and t.level_sizes == (2, 4, 4, 4) and t.depth == 4
    assert t.parents == (-1, -1, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert [t.nodes_within(d) for d in range(6)] == [0, 2, 6, 10, 14, 14]
    mask = t.ancestor_mask()
    for j, p in enumerate(t.parents):          # row 1 + j: itself, the root, and its parent's ancestors
        want = mask[1 + p].clone() if p >= 0 else torch.eye(15, dtype=torch.bool)[0]
        want[1 + j] = True
        assert torch.equal(mask[1 + j], want)
        assert int(mask[1 + j].sum()) == t.depths[j] + 1
    chain = TreeLayout.build(3, (1,))
    assert chain.parents == (-1, 0, 1) and torch.equal(chain.ancestor_mask(), torch.ones(4, 4, dtype=torch.bool).tril())
    assert TreeLayout.build(2, (3, 1, 5)).level_sizes == (3, 3)
    assert parse_branches("3") == (3, 3) and parse_branches("4,2,1") == (4, 2, 1)
    for bad in ("0", "x", ""):
        with pytest.raises(ValueError, match="tree-branch"):
            parse_branches(bad)
    with pytest.raises(ValueError, match="depth"):
        TreeLayout.build(0)
    with pytest.raises(ValueError, match="branches"):
        TreeLayout.build(2, (2, 0))


def test_draft_tree_takes_the_markov_corrected_top_k():
    g = torch.Generator().manual_seed(0)
    nb, depth, vocab = 3, 3, 11
    base = torch.randn(nb, depth, vocab, generator=g)
    w1, w2 = torch.randn(vocab, 4, generator=g), torch.randn(4, vocab, generator=g)
    anchor = torch.tensor([1, 5, 10])
    t = TreeLayout.build(depth, (3, 2))
    tokens = draft_tree(t, base, anchor, w1, w2)
    assert tokens.shape == (nb, t.num_nodes)
    for b in range(nb):
        for j, (p, d) in enumerate(zip(t.parents, t.depths)):
            prev = anchor[b] if p < 0 else tokens[b, p]
            logits = base[b, d - 1] + w1[prev] @ w2
            siblings = [i for i, q in enumerate(t.parents) if q == p]
            assert tokens[b, j] == logits.topk(len(siblings)).indices[siblings.index(j)]


def test_sample_tree_draws_each_child_from_its_parent_law():
    """Every child is draft_sample_block of its level's logits with its parent as the anchor and
    a seed of its own (so siblings are independent draws); the logits are the sampled-from ones."""
    import dspark_kernels

    g = torch.Generator().manual_seed(1)
    nb, depth, vocab = 2, 3, 9
    base = torch.randn(nb, depth, vocab, generator=g)
    w1, w2 = torch.randn(vocab, 3, generator=g), torch.randn(3, vocab, generator=g)
    t = TreeLayout.build(depth, (3, 2))
    kw = dict(temperature=torch.tensor([1.0, 0.5]), top_k=torch.tensor([0, 4], dtype=torch.int32),
              top_p=torch.tensor([1.0, 0.9]), seed=torch.tensor([5, 6]), offset=torch.tensor([10, 3]))
    tokens, logits = sample_tree(t, base, torch.tensor([2, 7]), w1, w2, **kw)
    assert tokens.shape == (nb, t.num_nodes) and logits.shape == (nb, t.num_nodes, vocab)
    for b in range(nb):
        for j, (p, d) in enumerate(zip(t.parents, t.depths)):
            parent = torch.tensor([2, 7])[b] if p < 0 else tokens[b, p]
            one = {k: v[b:b + 1] for k, v in kw.items()}
            one["seed"] = one["seed"] ^ ((j + 1) << 47)
            one["offset"] = one["offset"] + d - 1
            tok, lg = dspark_kernels.draft_sample_block(base[b:b + 1, d - 1:d], parent.reshape(1), markov_w1=w1,
                                                        markov_w2=w2, backend="reference", **one)
            assert tokens[b, j] == tok[0, 0]
            torch.testing.assert_close(logits[b, j], lg[0, 0])


# ---------------------------------------------------------------------------------------------- tree mask


def test_tree_pass_equals_sequential_forward_along_each_path():
    """The flattened tree pass (ancestor mask, RoPE at anchor + depth, cached context) gives each
    node the logits and hidden state of a plain causal forward over context + its root path."""
    target, drafter = tiny_models(seed=11)
    prompts = make_prompts(16, [9, 2, 14], seed=5)
    eng = tree_engine(target, drafter, depth=3, branches=(3, 2), page_size=4)
    for p in prompts:
        eng.add_request(Request(p, max_new_tokens=4))
    eng._admit()
    reqs = sorted(eng.active, key=lambda r: r.slot)
    layout = eng.tree
    anchor = torch.tensor([r.anchor for r in reqs])
    slot = torch.tensor([r.slot for r in reqs])
    offset = torch.tensor([r.committed for r in reqs])
    base, _ = drafter.forward_block(anchor, offset, layout.depth, eng.windows, slot, eng.max_batch)
    nodes = draft_tree(layout, base, anchor, drafter.markov_w1, drafter.markov_w2).tolist()
    n = layout.num_nodes
    row_idx = torch.arange(n + 1).repeat(len(reqs))
    row_req = torch.arange(len(reqs)).repeat_interleave(n + 1)
    depth = torch.tensor(layout.window_depths())
    rope = offset[row_req] + depth[row_idx]
    _, _, _, _, logits, hidden = eng._target_pass(reqs, [[r.anchor] + t for r, t in zip(reqs, nodes)],
                                                  tree_mask=layout.ancestor_mask()[row_idx], rope_positions=rope)
    for b, r in enumerate(reqs):
        for w in range(n + 1):
            path, j = [], w - 1
            while j >= 0:
                path.insert(0, nodes[b][j])
                j = layout.parents[j]
            seq = r.prompt + path            # the prompt ends with the anchor (the root)
            with torch.no_grad():
                lg, hd = target.forward_dense(torch.tensor([seq]))
            row = b * (n + 1) + w
            torch.testing.assert_close(logits[row], lg[0, -1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(hidden[row], hd[0, -1], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("depth,branches", [(4, (2, 2)), (3, (3, 1, 2)), (2, (1,))])
def test_tree_greedy_equals_autoregressive(depth, branches):
    target, drafter = tiny_models()
    lengths, max_new = [1, 3, 17, 40, 6], [12, 30, 7, 25, 1]
    prompts = make_prompts(16, lengths)
    reqs = [Request(p, max_new_tokens=m) for p, m in zip(prompts, max_new)]
    tree_engine(target, drafter, depth, branches).generate(reqs)     # 5 requests, 3 slots
    for r, p, m in zip(reqs, prompts, max_new):
        assert r.output == dense_greedy(target, p, m), f"prompt length {len(p)}"
        assert r.finished and len(r.output) == m
    assert sum(r.accepted for r in reqs) > 0, "no node was ever accepted: the test is not exercising the tree"


def random_siblings(monkeypatch) -> list[torch.Tensor]:
    """Replace the drafter's logits in ``draft_tree`` by seeded noise, so that the target's
    choice is often a later sibling (the tiny untrained drafter's top-1 almost always
    wins): accepted paths are then not prefixes of the window, the case kv_commit
    compacts. Returns the list that collects every step's ``accept_path``."""
    import dspark_kernels.loop.tree as tree_mod

    paths, real_draft, real_verify = [], tree_mod.draft_tree, tree_mod.verify_tree
    gen = torch.Generator().manual_seed(123)

    def noisy_draft(layout, base_logits, anchor, w1, w2):
        noise = torch.randn(base_logits.shape, generator=gen).to(base_logits.device)
        return real_draft(layout, noise, anchor, w1 * 0, w2)

    def recording_verify(*args, **kwargs):
        out = real_verify(*args, **kwargs)
        paths.append(out[0].clone())
        return out

    monkeypatch.setattr(tree_mod, "draft_tree", noisy_draft)
    monkeypatch.setattr(tree_mod, "verify_tree", recording_verify)
    return paths


def test_tree_greedy_with_later_siblings_accepted_and_eos(monkeypatch):
    target, drafter = tiny_models(seed=2)
    prompts = make_prompts(16, [5, 9, 2, 12], seed=3)
    expect = [dense_greedy(target, p, 30) for p in prompts]
    eos = expect[0][5]
    paths = random_siblings(monkeypatch)
    reqs = tree_engine(target, drafter, 3, (4, 4), max_batch=2).generate(
        [Request(p, max_new_tokens=30, eos_id=eos) for p in prompts])
    for r, full in zip(reqs, expect):
        assert r.output == (full[: full.index(eos) + 1] if eos in full else full)
    # Window indices 2 .. 4 are later children of the root: a path that is not a prefix of the window.
    assert any(bool((p[:, 1] >= 2).any()) for p in paths), "no step took a later sibling"
    assert any(bool((p[:, 2] >= 0).any()) for p in paths), "no step accepted two nodes"


@pytest.mark.parametrize("gamma,schedule", [(4, "static"), (5, "dspark")])
def test_block_method_greedy_equals_autoregressive(gamma, schedule):
    target, drafter = tiny_models()
    prompts = make_prompts(16, [1, 3, 17, 40, 6])
    max_new = [12, 30, 7, 25, 1]
    reqs = [Request(p, max_new_tokens=m) for p, m in zip(prompts, max_new)]
    sps = 1.0 / (1.0 + 0.15 * torch.arange(3 * (gamma + 1) + 1).clamp(min=3).float())
    SpecDecoder(target, drafter, gamma=gamma, schedule=schedule, sps=sps, method="block", max_batch=3,
                page_size=4, max_len=96).generate(reqs)
    for r, p, m in zip(reqs, prompts, max_new):
        assert r.output == dense_greedy(target, p, m)
    assert sum(r.accepted for r in reqs) > 0


# ---------------------------------------------------------------------------------------------- caches


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("mode,temperature", [("tree", 0.0), ("tree-random", 0.0), ("tree-random", 1.0),
                                              ("tree-sample", 1.0), ("block", 1.0)])
def test_kv_cache_equals_rebuilt_cache_after_every_step(mode, temperature, backend, monkeypatch):
    target, drafter = tiny_models(seed=4)
    paths = random_siblings(monkeypatch) if mode == "tree-random" else None
    prompts = make_prompts(16, [3, 13, 1, 20], seed=8)
    if mode.startswith("tree"):
        siblings = "sample" if mode == "tree-sample" else "top-k"
        eng = tree_engine(target, drafter, 4, (3, 2), backend=backend, tree_siblings=siblings)
    else:
        eng = SpecDecoder(target, drafter, gamma=5, method="block", backend=backend, max_batch=3, page_size=4,
                          max_len=96)
    decode_checking_caches(eng, target, drafter, prompts, temperature)
    if paths is not None:
        assert any(bool((p[:, 1] >= 2).any()) for p in paths), "no non-prefix path was committed"


# ---------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("siblings,temperature,top_k", [("top-k", 1.0, 0), ("sample", 1.0, 0), ("sample", 0.7, 3)])
def test_tree_sampling_follows_target_distribution(siblings, temperature, top_k):
    """χ² (false alarm 1e-6) of the first two generated tokens over 20 000 seeds:
    deterministic top-k siblings verified as point masses, and siblings drawn i.i.d.
    from q verified against q, are both lossless."""
    vocab, n = 4, 20_000
    target, drafter = tiny_models(vocab=vocab, seed=5, sharp=1.5)
    prompt = [1, 3, 0, 2, 2]
    reqs = [Request(prompt, max_new_tokens=3, temperature=temperature, top_k=top_k, seed=s) for s in range(n)]
    tree_engine(target, drafter, 2, (2, 2), max_batch=5000, max_len=16, tree_siblings=siblings).generate(reqs)
    pairs = torch.tensor([r.output[0] * vocab + r.output[1] for r in reqs])
    chi2_check(pairs, _first_two_token_probs(target, prompt, temperature, top_k), f"tree {siblings} T={temperature}")
    assert sum(r.accepted for r in reqs) > n // 4, "the tree is not in the loop"


@pytest.mark.parametrize("siblings,temperature", [("top-k", 0.0), ("top-k", 1.0), ("sample", 1.0)])
def test_tree_request_output_independent_of_batch_neighbours(siblings, temperature):
    target, drafter = tiny_models(seed=3)
    prompts = make_prompts(16, [7, 2, 15, 30, 5], seed=6)
    alone = []
    for i, p in enumerate(prompts):
        r = Request(p, max_new_tokens=16, temperature=temperature, seed=7 + i)
        tree_engine(target, drafter, 3, (2, 2), max_batch=1, tree_siblings=siblings).generate([r])
        alone.append(r.output)
    order = [4, 2, 0, 3, 1]
    reqs = [Request(prompts[i], max_new_tokens=16, temperature=temperature, seed=7 + i) for i in order]
    tree_engine(target, drafter, 3, (2, 2), max_batch=3, tree_siblings=siblings).generate(reqs)
    assert [r.output for r in reqs] == [alone[i] for i in order]


@pytest.mark.parametrize("siblings", ["top-k", "sample"])
def test_tree_reference_and_fused_backends_give_identical_tokens(siblings):
    target, drafter = tiny_models(seed=2)
    prompts = make_prompts(16, [4, 11, 2, 23], seed=4)
    params = [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.8, top_k=5),
              dict(temperature=1.3, top_p=0.8)]

    def run(backend):
        reqs = [Request(p, max_new_tokens=14, seed=100 + i, **kw) for i, (p, kw) in enumerate(zip(prompts, params))]
        tree_engine(target, drafter, 3, (2, 2), backend=backend, tree_siblings=siblings).generate(reqs)
        return [r.output for r in reqs], [r.accepted for r in reqs]

    assert run("reference") == run(None)


# ---------------------------------------------------------------------------------------------- misc


def test_tree_and_method_errors_name_the_argument():
    target, drafter = tiny_models()
    with pytest.raises(ValueError, match="schedule"):
        SpecDecoder(target, drafter, gamma=3, tree=(2, 2), schedule="dspark", sps=torch.ones(20))
    with pytest.raises(ValueError, match="drafter"):
        SpecDecoder(target, None, gamma=3, tree=(2, 2))
    with pytest.raises(ValueError, match="depth"):
        SpecDecoder(target, drafter, gamma=3, tree=TreeLayout.build(2))
    with pytest.raises(ValueError, match="method"):
        SpecDecoder(target, drafter, gamma=3, method="tree")
    with pytest.raises(ValueError, match="tree_siblings"):
        SpecDecoder(target, drafter, gamma=3, tree=(2, 2), tree_siblings="iid")
    eng = tree_engine(target, drafter, 4, (2, 2), max_len=40)      # window: 14 nodes + 1
    with pytest.raises(ValueError, match="max_len"):
        eng.add_request(Request([1] * 10, max_new_tokens=20))


def test_main_job_tree_and_block_flags(monkeypatch, capsys):
    import dspark_kernels.loop.__main__ as job

    target, drafter = tiny_models(vocab=256, sharp=1.0)
    held_out = torch.tensor(list(b"import os\n\ndef main(argv):\n    return 0\n" * 20), dtype=torch.uint8)
    info = {"target_loss": 5.5, "drafter_loss": 6.0, "cached": "tiny", "held_out": held_out}
    monkeypatch.setattr(job, "load_or_train", lambda retrain=False: (target, drafter, info))
    args = ["--prompts", "2", "--batch", "2", "--max-new-tokens", "10", "--gamma", "3"]
    assert job.main(args + ["--tree", "--tree-branch", "2"]) == 0
    out = capsys.readouterr().out
    assert "tree (2, 2) (10 nodes, top-k siblings)" in out and "verify_tree" in out
    assert "greedy output identical to autoregressive decoding: yes (2/2 prompts)" in out
    assert "reference ops vs fused ops on prompt 0 (32 tokens): identical" in out
    assert job.main(args + ["--method", "block", "--schedule", "static", "--no-reference-check"]) == 0
    assert "method block" in capsys.readouterr().out
    assert job.main(args + ["--tree", "--tree-siblings", "sample", "--temperature", "1", "--no-reference-check"]) == 0
    assert "tree (2, 2) (10 nodes, sample siblings)" in capsys.readouterr().out


def test_tree_module_examples_run():
    import doctest

    import dspark_kernels.loop.tree as tree_mod

    result = doctest.testmod(tree_mod, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result
