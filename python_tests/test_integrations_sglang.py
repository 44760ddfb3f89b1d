"""dspark_kernels.integrations.sglang: sgl-kernel's tree_speculative_sampling_target_only
and verify_tree_greedy in SGLang's tree encoding (retrive_index / retrive_next_token /
retrive_next_sibling, mutable outputs), and the KV commit of SGLang's accept_index:
sgl-kernel's two hand-built trees exactly, the target-only walk's law by χ²,
greedy walks against an independent walk, the tree encoding's parents, seeds,
errors (docs/integration.md)."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import requires_cuda
from integration_oracles import chi2_outcomes, needs_cpu_kernels, sglang_greedy, sglang_target_only_law, sglang_tree

import dspark_kernels as dk
from dspark_kernels.integrations import sglang as ds

# sgl-kernel/tests/speculative/test_speculative_sampling.py and test_eagle_utils.py (SGLANG_TESTS_COMMIT)
CANDIDATES = [[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]]
RETRIVE_INDEX = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
NEXT_TOKEN = [[1, 2, -1, 4, 5, -1], [4, 2, 3, -1, 5, -1]]
NEXT_SIBLING = [[-1, 3, -1, -1, -1, -1], [-1, -1, -1, -1, 1, -1]]
EXPECTED_PREDICTS = [3, -1, -1, 4, 5, 18, 11, -1, -1, -1, 12, 18]
EXPECTED_ACCEPT_INDEX = [[0, 3, 4, 5], [6, 10, 11, -1]]
EXPECTED_ACCEPT_TOKEN_NUM = [3, 2]


def _sgl_target_logits():
    t = torch.full((2, 6, 20), 1.0)
    t[0, 0, 3] = 10
    t[0, 3, 4] = 10
    t[0, 4, 5] = 10
    t[1, 0, 11] = 10
    t[1, 4, 12] = 10
    for i in range(2):
        for j in range(6):
            if t[i, j].max() < 10:
                t[i, j, 18] = 10
    return t


def _outputs(bs=2, width=4, n_predicts=12):
    return (torch.full((n_predicts,), -1, dtype=torch.int32), torch.full((bs, width), -1, dtype=torch.int32),
            torch.zeros(bs, dtype=torch.int32))


def _tree_tensors():
    return (torch.tensor(CANDIDATES), torch.tensor(RETRIVE_INDEX), torch.tensor(NEXT_TOKEN),
            torch.tensor(NEXT_SIBLING))


def test_importable_without_sgl_kernel():
    assert "sgl_kernel" not in sys.modules or sys.modules["sgl_kernel"] is None


@pytest.mark.parametrize("spelling", ["retrieve", "retrive", "positional_no_draft_probs"])
def test_sgl_kernel_target_only_hand_built_trees(spelling):
    cand, ri, nt, ns = _tree_tensors()
    probs = torch.softmax(_sgl_target_logits() / 0.01, -1)
    predicts, accept_index, accept_num = _outputs()
    coins, final = torch.rand(2, 6), torch.rand(2)
    if spelling == "retrieve":  # sgl-kernel's test spelling, draft_probs given (SGLANG_COMMIT form)
        ds.tree_speculative_sampling_target_only(
            predicts=predicts, accept_index=accept_index, accept_token_num=accept_num, candidates=cand,
            retrieve_index=ri, retrieve_next_token=nt, retrieve_next_sibling=ns, uniform_samples=coins,
            uniform_samples_for_final_sampling=final, target_probs=probs, draft_probs=torch.zeros_like(probs),
            threshold_single=1.0, threshold_acc=1.0, deterministic=True)
    elif spelling == "retrive":
        ds.tree_speculative_sampling_target_only(predicts, accept_index, accept_num, cand, ri, nt, ns, coins, final,
                                                 probs, torch.zeros_like(probs), 1.0, 1.0, True)
    else:  # SGLANG_COMMIT_NO_DRAFT_PROBS: thresholds right after target_probs
        ds.tree_speculative_sampling_target_only(predicts, accept_index, accept_num, cand, ri, nt, ns, coins, final,
                                                 probs, 1.0, 1.0, True)
    assert predicts.tolist() == EXPECTED_PREDICTS
    assert accept_index.tolist() == EXPECTED_ACCEPT_INDEX
    assert accept_num.tolist() == EXPECTED_ACCEPT_TOKEN_NUM


@pytest.mark.parametrize("backend", [b for b, ok in dk.backends("verify_tree").items() if ok and b != "cuda"])
def test_sgl_kernel_target_only_every_backend(backend):
    cand, ri, nt, ns = _tree_tensors()
    probs = torch.softmax(_sgl_target_logits() / 0.01, -1)
    predicts, accept_index, accept_num = _outputs()
    ds.tree_speculative_sampling_target_only(predicts, accept_index, accept_num, cand, ri, nt, ns, None, None, probs,
                                             seed=torch.tensor([1, 2]), backend=backend)
    assert predicts.tolist() == EXPECTED_PREDICTS
    assert accept_index.tolist() == EXPECTED_ACCEPT_INDEX
    assert accept_num.tolist() == EXPECTED_ACCEPT_TOKEN_NUM


def test_sgl_kernel_greedy_hand_built_trees():
    cand, ri, nt, ns = _tree_tensors()
    predicts, accept_index, accept_num = _outputs()
    ds.verify_tree_greedy(predicts=predicts, accept_index=accept_index, accept_token_num=accept_num,
                          candidates=cand, retrieve_index=ri, retrieve_next_token=nt, retrieve_next_sibling=ns,
                          target_predict=_sgl_target_logits().argmax(-1))
    assert predicts.tolist() == EXPECTED_PREDICTS
    assert accept_index.tolist() == EXPECTED_ACCEPT_INDEX
    assert accept_num.tolist() == EXPECTED_ACCEPT_TOKEN_NUM


def test_thresholds_other_than_one_are_an_error():
    cand, ri, nt, ns = _tree_tensors()
    probs = torch.softmax(_sgl_target_logits(), -1)
    for ts, ta in ((0.0, 0.0), (1.0, 0.5), (0.9, 1.0)):
        with pytest.raises(ValueError, match="lossy"):
            ds.tree_speculative_sampling_target_only(*_outputs(), cand, ri, nt, ns, torch.rand(2, 6), torch.rand(2),
                                                     probs, None, ts, ta)
    with pytest.raises(TypeError, match="retrive_next_token"):
        ds.verify_tree_greedy(*_outputs(), cand, ri, None, ns, probs.argmax(-1))


def test_empty_batch_and_root_only_trees():
    empty = torch.zeros(0, 6, dtype=torch.int64)
    outs = (torch.empty(0, dtype=torch.int32), torch.empty(0, 4, dtype=torch.int32), torch.empty(0, dtype=torch.int32))
    ds.tree_speculative_sampling_target_only(*outs, empty, empty, empty, empty, None, None, torch.rand(0, 6, 5))
    ds.verify_tree_greedy(*outs, empty, empty, empty, empty, empty)
    probs = torch.zeros(2, 1, 5)
    probs[0, 0, 2] = probs[1, 0, 4] = 1.0
    none = torch.full((2, 1), -1)
    predicts, accept_index, accept_num = _outputs(2, 1, 2)
    ds.tree_speculative_sampling_target_only(predicts, accept_index, accept_num, torch.tensor([[3], [4]]),
                                             torch.tensor([[0], [1]]), none, none, None, None, probs)
    assert (predicts.tolist(), accept_index.tolist(), accept_num.tolist()) == ([2, 4], [[0], [1]], [0, 0])


# ----------------------------------------------------------------------------------------
# The tree encoding


def _random_tree(g, n, max_children=3):
    """{node: [children in walk order]} over nodes 0..n-1 in topological order (parents
    before children), children in a shuffled walk order."""
    children = {u: [] for u in range(n)}
    for v in range(1, n):
        u = int(torch.randint(0, v, (1,), generator=g))
        while len(children[u]) >= max_children:
            u = int(torch.randint(0, v, (1,), generator=g))
        children[u].append(v)
    for u in children:
        perm = torch.randperm(len(children[u]), generator=g).tolist()
        children[u] = [children[u][i] for i in perm]
    return children


def test_tree_parents_random_trees():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 9, 17, 33):
        trees = [_random_tree(g, n) for _ in range(4)]
        enc = [sglang_tree(t, n) for t in trees]
        nt = torch.tensor([e[0] for e in enc])
        ns = torch.tensor([e[1] for e in enc])
        parent, rank = ds.tree_parents(nt, ns)
        for b, t in enumerate(trees):
            want_parent, want_rank = [-1] * n, [0] * n
            for u, cs in t.items():
                for r, c in enumerate(cs):
                    want_parent[c], want_rank[c] = u, r
            assert parent[b].tolist() == want_parent, (n, b)
            assert rank[b].tolist() == want_rank, (n, b)


def test_verify_tree_greedy_random_trees():
    """Against the independent walk (sibling order = SGLang's; repeated sibling tokens
    included), and: on trees with distinct sibling tokens verify_tree's greedy rule on the
    logits gives the same path."""
    g = torch.Generator().manual_seed(1)
    vocab, n, bs, width = 4, 9, 16, 5
    trees = [_random_tree(g, n) for _ in range(bs)]
    enc = [sglang_tree(t, n) for t in trees]
    cand = torch.randint(0, vocab, (bs, n), generator=g)
    logits = torch.randn(bs, n, vocab, generator=g)
    predict = logits.argmax(-1)
    for b, t in enumerate(trees):  # make the walks go deep: a child often carries its parent's argmax
        for u, cs in t.items():
            for c in cs:
                if torch.rand((), generator=g) < 0.5:
                    cand[b, c] = predict[b, u]
    ri = torch.arange(bs * n).view(bs, n)
    predicts, accept_index, accept_num = _outputs(bs, width, bs * n)
    ds.verify_tree_greedy(predicts, accept_index, accept_num, cand, ri, torch.tensor([e[0] for e in enc]),
                          torch.tensor([e[1] for e in enc]), predict)
    for b, t in enumerate(trees):
        path, writes = sglang_greedy(cand[b].tolist(), t, predict[b].tolist(), width)
        assert accept_num[b] == len(path) - 1
        assert accept_index[b].tolist() == [b * n + u for u in path] + [-1] * (width - len(path))
        for u, tok in writes.items():
            assert predicts[b * n + u] == tok
    assert int(accept_num.max()) >= 2  # the test does reach into the trees


def test_greedy_equals_verify_tree_on_distinct_siblings():
    g = torch.Generator().manual_seed(2)
    vocab, n, bs = 12, 7, 8
    trees = [_random_tree(g, n) for _ in range(bs)]
    enc = [sglang_tree(t, n) for t in trees]
    logits = torch.randn(bs, n, vocab, generator=g)
    predict = logits.argmax(-1)
    cand = torch.zeros(bs, n, dtype=torch.int64)
    for b, t in enumerate(trees):
        for u, cs in t.items():
            toks = torch.randperm(vocab, generator=g)[:len(cs)].tolist()  # distinct sibling tokens
            if cs and int(predict[b, u]) not in toks and torch.rand((), generator=g) < 0.7:
                toks[int(torch.randint(0, len(cs), (1,), generator=g))] = int(predict[b, u])
            for c, tok in zip(cs, toks):
                cand[b, c] = tok
    nt, ns = torch.tensor([e[0] for e in enc]), torch.tensor([e[1] for e in enc])
    predicts, accept_index, accept_num = _outputs(bs, n, bs * n)
    ds.verify_tree_greedy(predicts, accept_index, accept_num, cand, torch.arange(bs * n).view(bs, n), nt, ns,
                          predict)
    parent, _ = ds.tree_parents(nt, ns)
    path, num, out = dk.verify_tree(logits.reshape(bs * n, vocab), cand[:, 1:].reshape(-1),
                                    (parent[:, 1:] - 1).reshape(-1), torch.arange(bs + 1) * (n - 1), max_depth=n - 1)
    assert torch.equal(num, accept_num)
    for b in range(bs):
        k = int(num[b]) + 1
        assert (accept_index[b, :k] - b * n).tolist() == path[b, :k].tolist()


# ----------------------------------------------------------------------------------------
# χ² of the target-only walk, seeds


def _copies_inputs(tree, n, p_rows, tokens, copies):
    nt, ns = sglang_tree(tree, n)
    cand = torch.tensor(tokens).repeat(copies, 1)
    probs = p_rows.repeat(copies, 1, 1)
    return (cand, torch.arange(copies * n).view(copies, n), torch.tensor([nt] * copies), torch.tensor([ns] * copies),
            probs)


@needs_cpu_kernels
def test_target_only_chi2():
    """The walk's law (integration_oracles.sglang_target_only_law): root children tried in
    the order [3, 1] (not index order), distinct sibling tokens."""
    n, vocab, copies = 6, 5, 12000
    tree = {0: [3, 1], 1: [2], 3: [4, 5]}
    tokens = [0, 2, 1, 0, 3, 1]
    g = torch.Generator().manual_seed(4)
    p_rows = torch.softmax(torch.randn(n, vocab, generator=g), -1)
    cand, ri, nt, ns, probs = _copies_inputs(tree, n, p_rows, tokens, copies)
    predicts, accept_index, accept_num = _outputs(copies, 4, copies * n)
    ds.tree_speculative_sampling_target_only(predicts, accept_index, accept_num, cand, ri, nt, ns, None, None, probs)
    law = sglang_target_only_law([r.tolist() for r in p_rows], tokens, tree)
    outcomes = []
    ai, pr = accept_index.tolist(), predicts.tolist()
    for b in range(copies):
        path = tuple(i - b * n for i in ai[b] if i >= 0)
        outcomes.append((path, pr[b * n + path[-1]]))
    chi2_outcomes(outcomes, law, "sglang target-only walk")


def test_target_only_seeded_batch_invariant():
    n, vocab = 6, 7
    tree = {0: [1, 4], 1: [2, 3], 4: [5]}
    g = torch.Generator().manual_seed(5)
    tokens = [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], [0, 6, 5, 4, 3, 2]]
    p = torch.softmax(torch.randn(3, n, vocab, generator=g), -1)
    nt, ns = sglang_tree(tree, n)

    def run(order, seeds, offsets):
        bs = len(order)
        predicts, accept_index, accept_num = _outputs(bs, 3, bs * n)
        ds.tree_speculative_sampling_target_only(
            predicts, accept_index, accept_num, torch.tensor([tokens[r] for r in order]),
            torch.arange(bs * n).view(bs, n), torch.tensor([nt] * bs), torch.tensor([ns] * bs), None, None,
            p[order], seed=torch.tensor([seeds[r] for r in order]), offset=torch.tensor([offsets[r] for r in order]))
        return {r: (accept_num[i].item(), [x - i * n if x >= 0 else -1 for x in accept_index[i].tolist()],
                    predicts[i * n:(i + 1) * n].tolist()) for i, r in enumerate(order)}

    seeds, offsets = {0: 5, 1: 2**40 + 3, 2: -9}, {0: 10, 1: 20, 2: 30}
    a, b = run([0, 1, 2], seeds, offsets), run([2, 0, 1], seeds, offsets)
    single = run([1], seeds, offsets)
    for r in a:
        assert a[r] == b[r], r
    assert a[1] == single[1]




@needs_cpu_kernels
def test_target_only_min_p_chi2():
    n, vocab, copies = 4, 5, 12000
    tree = {0: [1, 2], 2: [3]}
    tokens = [0, 1, 3, 2]
    g = torch.Generator().manual_seed(12)
    p_rows = torch.softmax(torch.randn(n, vocab, generator=g) * 1.5, -1)
    cand, ri, nt, ns, probs = _copies_inputs(tree, n, p_rows, tokens, copies)
    predicts, accept_index, accept_num = _outputs(copies, 3, copies * n)
    ds.tree_speculative_sampling_target_only(predicts, accept_index, accept_num, cand, ri, nt, ns, None, None, probs,
                                             min_p=torch.full((copies,), 0.3))
    filtered = [[x if x >= 0.3 * max(r) else 0.0 for x in r.tolist()] for r in p_rows.double()]
    law = sglang_target_only_law(filtered, tokens, tree)
    ai, pr = accept_index.tolist(), predicts.tolist()
    outcomes = []
    for b in range(copies):
        path = tuple(i - b * n for i in ai[b] if i >= 0)
        outcomes.append((path, pr[b * n + path[-1]]))
    chi2_outcomes(outcomes, law, "sglang target-only min_p")



# ----------------------------------------------------------------------------------------
# KV


@pytest.mark.parametrize("page_size", [1, 4])
def test_commit_kv_moves_the_accepted_path(page_size):
    g = torch.Generator().manual_seed(6)
    bs, n, heads, dim, layers = 3, 6, 2, 4, 2
    num_pages = 3 * 24 // page_size + 4
    num_slots = num_pages * page_size
    k_buffers = [torch.randn(num_slots, heads, dim, generator=g) for _ in range(layers)]
    v_buffers = [torch.randn(num_slots, heads, dim, generator=g) for _ in range(layers)]
    seq_lens = torch.tensor([5, 0, 9])
    max_context = 24
    pool = 5
    req_pool_indices = torch.tensor([3, 0, 4])
    req_to_token = torch.zeros(pool, max_context, dtype=torch.int32)
    pages = torch.randperm(num_pages, generator=g).tolist()
    for r in req_pool_indices.tolist():  # a page-aligned allocation, pages in any order
        for p in range(max_context // page_size):
            page = pages.pop()
            req_to_token[r, p * page_size:(p + 1) * page_size] = torch.arange(page_size) + page * page_size
    paths = [[0, 3, 4], [0], [0, 1, 2, 5]]
    accept_length = torch.tensor([len(p) - 1 for p in paths], dtype=torch.int32)
    accept_index = torch.full((bs, 4), -1, dtype=torch.int32)
    for b, p in enumerate(paths):
        accept_index[b, :len(p)] = torch.tensor(p) + b * n
    before_k = [k.clone() for k in k_buffers]
    before_v = [v.clone() for v in v_buffers]
    new_len = ds.commit_kv(k_buffers, v_buffers, req_to_token, req_pool_indices, seq_lens, accept_index,
                           accept_length, n, page_size)
    assert new_len.tolist() == (seq_lens + accept_length + 1).tolist()
    for b, p in enumerate(paths):
        r = int(req_pool_indices[b])
        for j, w in enumerate(p):
            dst = int(req_to_token[r, int(seq_lens[b]) + j])
            src = int(req_to_token[r, int(seq_lens[b]) + w])
            for before, after in ((before_k, k_buffers), (before_v, v_buffers)):
                for layer in range(layers):
                    assert torch.equal(after[layer][dst], before[layer][src]), (b, j, layer)


# ----------------------------------------------------------------------------------------
# GPU; sgl-kernel itself when installed


def test_no_host_reads_meta_tensors():
    """On meta tensors every read of a value fails: the adapters never read the device back."""
    meta = "meta"
    cand, ri, nt, ns = (t.to(meta) for t in _tree_tensors())
    outs = tuple(t.to(meta) for t in _outputs())
    ds.tree_speculative_sampling_target_only(*outs, cand, ri, nt, ns, None, None, torch.rand(2, 6, 20, device=meta))
    ds.verify_tree_greedy(*outs, cand, ri, nt, ns, torch.zeros(2, 6, dtype=torch.int64, device=meta))
    new_len = ds.commit_kv([torch.empty(64, 2, 4, device=meta)], [torch.empty(64, 2, 4, device=meta)],
                           torch.zeros(4, 32, dtype=torch.int32, device=meta), torch.tensor([1, 2], device=meta),
                           torch.tensor([3, 4], device=meta), torch.zeros(2, 4, dtype=torch.int32, device=meta),
                           torch.zeros(2, dtype=torch.int32, device=meta), 6, 4)
    assert new_len.shape == (2,)


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_and_no_sync():
    dev = "cuda"
    cand, ri, nt, ns = (t.to(dev) for t in _tree_tensors())
    probs = torch.softmax(_sgl_target_logits().to(dev), -1)
    predict = probs.argmax(-1)
    outs = [tuple(t.to(dev) for t in _outputs()) for _ in range(2)]
    seed = torch.tensor([3, 4], device=dev)
    offset = torch.tensor([100, 200], device=dev)

    def step():
        ds.tree_speculative_sampling_target_only(*outs[0], cand, ri, nt, ns, None, None, probs, seed=seed,
                                                 offset=offset)
        ds.verify_tree_greedy(*outs[1], cand, ri, nt, ns, predict)

    step()
    torch.cuda.synchronize()
    eager = [tuple(t.clone() for t in o) for o in outs]
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    for o, e in zip(outs, eager):
        for a, b in zip(o, e):
            assert torch.equal(a, b)


def _sgl_kernel():
    try:
        import sgl_kernel  # type: ignore
    except Exception:  # noqa: BLE001
        return None
    return sgl_kernel


@pytest.mark.cuda
@pytest.mark.skipif(_sgl_kernel() is None or not torch.cuda.is_available(), reason="needs sgl-kernel and a GPU")
def test_same_as_sgl_kernel_greedy():
    sk = _sgl_kernel()
    g = torch.Generator().manual_seed(7)
    vocab, n, bs, width = 5, 9, 32, 5
    trees = [_random_tree(g, n) for _ in range(bs)]
    enc = [sglang_tree(t, n) for t in trees]
    cand = torch.randint(0, vocab, (bs, n), generator=g).cuda()
    predict = torch.randint(0, vocab, (bs, n), generator=g).cuda()
    args = (cand, torch.arange(bs * n).view(bs, n).cuda(), torch.tensor([e[0] for e in enc]).cuda(),
            torch.tensor([e[1] for e in enc]).cuda(), predict)
    theirs = tuple(t.cuda() for t in _outputs(bs, width, bs * n))
    ours = tuple(t.cuda() for t in _outputs(bs, width, bs * n))
    sk.verify_tree_greedy(*theirs, *args)
    ds.verify_tree_greedy(*ours, *args)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.cuda
@needs_cpu_kernels
@pytest.mark.skipif(_sgl_kernel() is None or not torch.cuda.is_available(), reason="needs sgl-kernel and a GPU")
def test_same_law_as_sgl_kernel_target_only():
    """sgl-kernel's own target-only walk follows the oracle's law (so the oracle that ours
    passes describes sgl-kernel), on the χ² test's tree."""
    sk = _sgl_kernel()
    n, vocab, copies = 6, 5, 12000
    tree = {0: [3, 1], 1: [2], 3: [4, 5]}
    tokens = [0, 2, 1, 0, 3, 1]
    g = torch.Generator().manual_seed(4)
    p_rows = torch.softmax(torch.randn(n, vocab, generator=g), -1)
    cand, ri, nt, ns, probs = (t.cuda() for t in _copies_inputs(tree, n, p_rows, tokens, copies))
    predicts, accept_index, accept_num = (t.cuda() for t in _outputs(copies, 4, copies * n))
    kwargs = dict(predicts=predicts, accept_index=accept_index, accept_token_num=accept_num, candidates=cand,
                  retrive_index=ri, retrive_next_token=nt, retrive_next_sibling=ns,
                  uniform_samples=torch.rand(copies, n, device="cuda"),
                  uniform_samples_for_final_sampling=torch.rand(copies, device="cuda"), target_probs=probs)
    try:
        sk.tree_speculative_sampling_target_only(**kwargs)
    except TypeError:  # the SGLANG_COMMIT form takes draft_probs
        sk.tree_speculative_sampling_target_only(**kwargs, draft_probs=torch.zeros_like(probs))
    law = sglang_target_only_law([r.tolist() for r in p_rows], tokens, tree)
    ai, pr = accept_index.cpu().tolist(), predicts.cpu().tolist()
    outcomes = []
    for b in range(copies):
        path = tuple(i - b * n for i in ai[b] if i >= 0)
        outcomes.append((path, pr[b * n + path[-1]]))
    chi2_outcomes(outcomes, law, "sgl-kernel's target-only walk")
