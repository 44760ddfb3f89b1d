"""Tree mode of the loop: the drafter expands a small token tree, the target verifies
every node in one forward pass, ``verify_tree`` picks the path (docs/loop.md#tree-mode).

Shape (``TreeLayout.build(depth, branches)``): the root is the anchor (the last
committed token); a node at level ``l`` (root = level 0) has ``branches[l]``
children, levels past ``branches`` have one (a chain). ``branches = (2, 2)``, depth
4: 2 + 4 + 4 + 4 = 14 nodes, 4 root-to-leaf paths of 4 tokens each. Nodes are in
breadth-first order, the children of a node consecutive and by rank, so local
indices are topological and siblings are tried best first.

Drafting (``draft_tree``): one DSpark block forward gives the base logits ``U_k``
of block positions ``k = 0 .. depth-1``; a node at level ``l + 1`` whose parent holds
token ``x`` takes its children from the Markov-corrected logits ``U_l + W1[x] @ W2``
(the same correction ``draft_sample_block`` applies along a chain): the top
``branches[l]`` tokens, the argmax on the chain levels.

The siblings are chosen deterministically, so ``verify_tree`` checks them as point
masses (no q): that is SGLang's target-only tree walk, lossless at any temperature
(verify_tree's docstring, docs/verification.md#verification-of-draft-trees-verify_tree).
``siblings="sample"`` (``sample_tree``) instead draws the children of every node of a
sampling request i.i.d. from the drafter's filtered ``q`` given that node
(``draft_sample_block``, one independent Philox stream per child) and passes ``q`` to
verify_tree: SpecInfer's multi-round rule, also lossless, and it accepts with
``min(1, p/q)`` instead of ``p``; greedy requests keep the top-K.

One tree step (``tree_step``): the flattened window ``[root, node 0 … node n−1]`` of
every request goes through ``Target.forward_paged`` with ``tree_mask`` (each node
sees the cached context, its ancestors and itself) and RoPE position ``L + depth``;
its K/V land at cache slots ``L + window index``. ``kv_commit`` then moves the
accepted path (window indices from ``verify_tree``, not a prefix in general) to
``L, L+1, …``, where a sequential decode would have put them, ``kv_release_pages``
drops the pages past the new length, and ``window_commit`` writes the path's hidden
states into the drafter's window at their token positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import draft_sample_block, kv_commit, verify_tree
from .models import op_backend

if TYPE_CHECKING:
    from .engine import SpecDecoder


@dataclass(frozen=True)
class TreeLayout:
    """A static draft tree: ``parents`` (local index, −1 = the root), ``depths`` (1 = a
    child of the root) and ``level_sizes`` (nodes per level), in breadth-first order."""

    branches: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]
    level_sizes: tuple[int, ...]

    @classmethod
    def build(cls, depth: int, branches: tuple[int, ...] = (2, 2)) -> TreeLayout:
        """``branches[l]`` children per node at level ``l`` (root = 0), 1 past them, ``depth`` levels of nodes.

        >>> t = TreeLayout.build(3, (2, 2))
        >>> t.num_nodes, t.parents, t.depths
        (10, (-1, -1, 0, 0, 1, 1, 2, 3, 4, 5), (1, 1, 2, 2, 2, 2, 3, 3, 3, 3))
        """
        branches = tuple(int(k) for k in branches)
        if depth < 1:
            raise ValueError(f"tree depth must be >= 1, got {depth}")
        if not branches or any(k < 1 for k in branches):
            raise ValueError(f"tree branches must be positive, got {branches}")
        parents, depths, level_sizes = [], [], []
        prev_first, prev_count = -1, 1          # the root: one node, "index" −1
        for level in range(depth):
            k = branches[level] if level < len(branches) else 1
            first = len(parents)
            for p in range(prev_count):
                parent = -1 if level == 0 else prev_first + p
                parents += [parent] * k
                depths += [level + 1] * k
            level_sizes.append(prev_count * k)
            prev_first, prev_count = first, prev_count * k
        return cls(branches, tuple(parents), tuple(depths), tuple(level_sizes))

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        return len(self.level_sizes)

    def nodes_within(self, depth: int) -> int:
        """Nodes of depth ``<= depth`` (a prefix in breadth-first order: the tree cut at that depth)."""
        return sum(self.level_sizes[:max(depth, 0)])

    def window_depths(self) -> list[int]:
        """Depth of each window row ``[root, node 0, …]`` (the root is 0): its RoPE offset from the anchor."""
        return [0, *self.depths]

    def ancestor_mask(self) -> torch.Tensor:
        """``[n + 1, n + 1]`` bool over window rows: ``[i, j]`` iff row ``j`` is ``i`` or an ancestor of ``i``.

        >>> TreeLayout.build(2, (2,)).ancestor_mask().int().tolist()
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]]
        """
        n = self.num_nodes
        mask = torch.eye(n + 1, dtype=torch.bool)
        mask[1:, 0] = True
        for j, p in enumerate(self.parents):          # parents come first: their rows are complete
            if p >= 0:
                mask[1 + j] |= mask[1 + p]
        return mask


def parse_branches(text: str) -> tuple[int, ...]:
    """``"K"`` → ``(K, K)`` (K children at each of the first two levels); ``"K1,K2,…"`` → per level."""
    try:
        parts = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        parts = []
    if not parts or any(k < 1 for k in parts):
        raise ValueError(f"--tree-branch: positive integers expected, got {text!r}")
    return (parts[0], parts[0]) if len(parts) == 1 else tuple(parts)


@torch.no_grad()
def draft_tree(layout: TreeLayout, base_logits: torch.Tensor, anchor: torch.Tensor, markov_w1: torch.Tensor,
               markov_w2: torch.Tensor) -> torch.Tensor:
    """Node tokens ``[B, n]`` (int64, breadth-first) from the drafter's base logits ``[B, ≥ depth, V]``.

    Children of a node holding token ``x`` at level ``l``: the top ``branches[l]`` of
    ``U_l + W1[x] @ W2`` (the root holds the anchor), best first.
    """
    nb = base_logits.shape[0]
    prev = anchor.long()[:, None]                               # tokens of the previous level [B, n_l]
    levels = []
    for level, size in enumerate(layout.level_sizes):
        k = size // prev.shape[1]
        logits = base_logits[:, level, None, :] + markov_w1[prev] @ markov_w2   # [B, n_l, V]
        prev = logits.topk(k, dim=-1).indices.reshape(nb, size)
        levels.append(prev)
    return torch.cat(levels, 1) if levels else anchor.new_zeros(nb, 0, dtype=torch.long)


SIBLINGS = ("top-k", "sample")


@torch.no_grad()
def sample_tree(layout: TreeLayout, base_logits: torch.Tensor, anchor: torch.Tensor, markov_w1: torch.Tensor,
                markov_w2: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                seed: torch.Tensor, offset: torch.Tensor, backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Node tokens ``[B, n]`` and their logits ``[B, n, V]``: children drawn i.i.d. given their parent.

    Node ``j`` at level ``l`` (0-based) is ``draft_sample_block`` of ``U_l`` with its
    parent's token as the anchor (so its logits are ``U_l + W1[parent] @ W2``), the
    request's temperature / top-k / top-p, position ``offset + l`` and its own seed
    ``seed ^ ((j + 1) << 47)``: every child has an independent stream, never the
    request's own (chains draft on ``seed``), and a request's draws depend on its own
    seed only. The logits are what verify_tree needs as ``draft_logits``.
    """
    nb, _, vocab = base_logits.shape
    dev = base_logits.device
    prev = anchor.long()[:, None]
    tokens, logits, first = [], [], 0
    for level, size in enumerate(layout.level_sizes):
        k = size // prev.shape[1]
        rows = nb * size
        rep = lambda t: t.repeat_interleave(size)  # noqa: E731 - per request -> per child
        node = first + torch.arange(size, device=dev).repeat(nb)
        tok, lg = draft_sample_block(
            base_logits[:, level, None, :].expand(nb, size, vocab).reshape(rows, 1, vocab),
            prev.repeat_interleave(k, dim=1).reshape(rows), markov_w1=markov_w1, markov_w2=markov_w2,
            temperature=rep(temperature), top_k=rep(top_k), top_p=rep(top_p),
            seed=rep(seed.long()) ^ ((node + 1) << 47), offset=rep(offset.long()) + level,
            backend=op_backend(backend, "draft_sample_block"))
        prev = tok.long().reshape(nb, size)
        tokens.append(prev)
        logits.append(lg.reshape(nb, size, vocab))
        first += size
    return torch.cat(tokens, 1), torch.cat(logits, 1)


def tree_step(eng: SpecDecoder) -> None:
    """One draft-tree → verify (one target pass) → commit step over every active request."""
    eng._admit()
    reqs = sorted(eng.active, key=lambda r: r.slot)
    if not reqs:
        return
    layout, dev, nb = eng.tree, eng.device, len(reqs)
    temperature, top_k, top_p, seed, offset = eng._sampling_tensors(reqs)
    anchor = torch.tensor([r.anchor for r in reqs], dtype=torch.int64, device=dev)
    # The tree is cut at depth remaining − 1: a step emits up to depth + 1 tokens.
    counts = [layout.nodes_within(min(layout.depth, r.max_new_tokens - len(r.output) - 1)) for r in reqs]
    nodes, node_logits = [[] for _ in reqs], None
    if sum(counts) > 0:
        slot = torch.tensor([r.slot for r in reqs], dtype=torch.int64, device=dev)
        with eng.timers("drafter forward", dev):
            base_logits, _ = eng.drafter.forward_block(anchor, offset, layout.depth, eng.windows, slot,
                                                       eng.max_batch, backend=eng.backend)
        w1, w2 = eng.drafter.markov_w1.detach().float(), eng.drafter.markov_w2.detach().float()
        with eng.timers("draft tree", dev):
            tokens = draft_tree(layout, base_logits, anchor, w1, w2)
            if eng.tree_siblings == "sample" and any(r.temperature > 0 for r in reqs):
                sampled, node_logits = sample_tree(layout, base_logits, anchor, w1, w2, temperature=temperature,
                                                   top_k=top_k, top_p=top_p, seed=seed, offset=offset,
                                                   backend=eng.backend)
                # Greedy requests keep their distinct top-K (verify_tree ignores q on greedy rows).
                tokens = torch.where((temperature > 0)[:, None], sampled, tokens)
        nodes = [row[:n] for row, n in zip(tokens.tolist(), counts)]
    new_tokens = [[r.anchor] + toks for r, toks in zip(reqs, nodes)]
    # Rows: cache slot L + window index (positions), RoPE position L + depth, ancestors-only attention.
    window_depth = torch.tensor(layout.window_depths(), dtype=torch.int64, device=dev)
    rows = max(n + 1 for n in counts)
    ancestors = layout.ancestor_mask().to(dev)[:, :rows]
    row_idx = torch.tensor([i for n in counts for i in range(n + 1)], dtype=torch.int64, device=dev)
    committed = torch.tensor([r.committed for r in reqs], dtype=torch.int32, device=dev)
    row_req = torch.tensor([b for b, n in enumerate(counts) for _ in range(n + 1)], dtype=torch.int64, device=dev)
    rope_positions = committed.long()[row_req] + window_depth[row_idx]
    old_len = committed + torch.tensor([n + 1 for n in counts], dtype=torch.int32, device=dev)
    block_table, positions, row_req, row_idx, logits, hidden = eng._target_pass(
        reqs, new_tokens, tree_mask=ancestors[row_idx], rope_positions=rope_positions)

    flat_tokens = torch.tensor([t for toks in nodes for t in toks], dtype=torch.int64, device=dev)
    flat_parents = torch.tensor([p for n in counts for p in layout.parents[:n]], dtype=torch.int64, device=dev)
    cu = torch.tensor([0] + [sum(counts[: b + 1]) for b in range(nb)], dtype=torch.int32, device=dev)
    flat_logits = None
    if node_logits is not None:
        keep = torch.tensor([b * layout.num_nodes + j for b, n in enumerate(counts) for j in range(n)],
                            dtype=torch.int64, device=dev)
        flat_logits = node_logits.reshape(-1, node_logits.shape[-1])[keep]
    with eng.timers("verify_tree", dev):
        if eng.tp is not None:  # a vocabulary-parallel LM head: verify on this rank's columns
            from .. import distributed

            path, num_accepted, out = distributed.verify_tree(
                logits, flat_tokens, flat_parents, cu, vocab_start=eng.tp.start, vocab_size=eng.tp.vocab_size,
                group=eng.tp.group, draft_logits=eng.tp.local(flat_logits), temperature=temperature, top_k=top_k,
                top_p=top_p, seed=seed, offset=offset, max_depth=layout.depth)
        else:
            path, num_accepted, out = verify_tree(logits, flat_tokens, flat_parents, cu, draft_logits=flat_logits,
                                                  temperature=temperature,
                                                  top_k=top_k, top_p=top_p, seed=seed, offset=offset,
                                                  max_depth=layout.depth,
                                                  backend=op_backend(eng.backend, "verify_tree"))
    with eng.timers("kv_commit + release", dev):
        new_len = kv_commit(eng.kv_caches, block_table, eng.page_size, committed, path, num_accepted + 1,
                            backend=op_backend(eng.backend, "kv_commit"))
        eng._release(reqs, block_table, new_len, old_len)
    # The accepted path's rows go into the drafter's window, at their token positions.
    in_path = torch.arange(path.shape[1], device=dev)[None, :] <= num_accepted.long()[:, None]
    path_rows = torch.where(in_path, path.long(), -1)
    on_path = (path_rows[:, :, None] == torch.arange(rows, device=dev)).any(1)          # [B, rows]
    eng._commit_context(reqs, [n + 1 for n in counts], hidden, rope_positions, on_path[row_req, row_idx])
    eng._emit(reqs, out, num_accepted, counts)
