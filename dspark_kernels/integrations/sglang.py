"""SGLang adapters: sgl-kernel's ``tree_speculative_sampling_target_only`` and
``verify_tree_greedy`` on ``verify_tree``, and the KV commit of the accepted path.

Checked against sgl-project/sglang ``sgl-kernel/python/sgl_kernel/speculative.py`` at
``6bfad8f1`` (``SGLANG_COMMIT``: ``draft_probs`` after ``target_probs``) and
``01fe7c22`` (``SGLANG_COMMIT_NO_DRAFT_PROBS``: the same without ``draft_probs``);
both call forms work here. The hand-built trees of
``sgl-kernel/tests/speculative/test_speculative_sampling.py`` /
``test_eagle_utils.py`` (``120affb9``) are in python_tests/test_integrations_sglang.py.

SGLang's tree encoding, per request ``b`` with ``N = draft_token_num`` nodes (node 0
= the root, the last verified token; ``candidates[b, i]`` = node i's token):
``retrive_next_token[b, i]`` = i's first child (-1: none), ``retrive_next_sibling[b, i]``
= i's next sibling, ``retrive_index[b, i]`` = i's flat index into ``predicts``
(normally ``b * N + i``). Target row ``b * N + i`` is the distribution after node i,
which is verify_tree's layout with ``cu_num_draft = arange(B + 1) * (N - 1)``, node i
= our node ``i - 1``. SGLang numbers the nodes parents first (its tree builders do),
which is the topological order verify_tree needs. The parent of every node is found on the device by pointer
jumping over the child / sibling links (``ceil(log2 N)`` rounds of gathers on
``[B, N]`` integers), so nothing is read back to the host.

sgl-kernel is not imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import kv as _kv
from .. import verification as _verification
from . import _common

SGLANG_COMMIT = "6bfad8f187aa80f7c9a2a06f7861409c4e3a4ad2"
SGLANG_COMMIT_NO_DRAFT_PROBS = "01fe7c22269dc027da4b77a9ca807073225f7c24"
SGLANG_TESTS_COMMIT = "120affb9613cc3f5bcd055ec09c7621d3ced0ebc"

__all__ = ["tree_speculative_sampling_target_only", "verify_tree_greedy", "tree_parents", "commit_kv"]

_ALIASES = {"retrieve_index": "retrive_index", "retrieve_next_token": "retrive_next_token",
            "retrieve_next_sibling": "retrive_next_sibling"}


def _aliases(where, kwargs, given):
    """sgl-kernel's older keyword spelling (``retrieve_*``, used by its tests) -> ``retrive_*``."""
    for old, new in _ALIASES.items():
        if old in kwargs:
            if given.get(new) is not None:
                raise TypeError(f"{where}: got both {old} and {new}")
            given[new] = kwargs.pop(old)
    if kwargs:
        raise TypeError(f"{where}: unexpected arguments {sorted(kwargs)}")
    for name in _ALIASES.values():
        if given.get(name) is None:
            raise TypeError(f"{where}: missing argument {name}")
    return given


def _list_rank(prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """List ranking by pointer jumping over ``prev [B, N]`` (-1 = the head of a list):
    the head of every node's list and the node's distance to it."""
    batch, n = prev.shape
    node = torch.arange(n, device=prev.device, dtype=torch.int64).expand(batch, n)
    up = torch.where(prev >= 0, prev, node)
    dist = (prev >= 0).to(torch.int64)
    for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):
        dist = dist + dist.gather(1, up)  # a head has distance 0, so converged entries stay
        up = up.gather(1, up)
    return up, dist


def _inverse_links(links: torch.Tensor) -> torch.Tensor:
    """``inv[b, j] = i`` where ``links[b, i] = j`` (-1 where no link points at j)."""
    batch, n = links.shape
    node = torch.arange(n, device=links.device, dtype=torch.int64).expand(batch, n)
    links = links.to(torch.int64)
    ok = (links >= 0) & (links < n)
    inv = torch.full((batch, n + 1), -1, dtype=torch.int64, device=links.device)
    inv.scatter_(1, torch.where(ok, links, n), node)  # entries without a link land in the dump column n
    return inv[:, :n]


def tree_parents(retrive_next_token: torch.Tensor, retrive_next_sibling: torch.Tensor):
    """SGLang's first-child / next-sibling links ``[B, N]`` -> ``(parent, rank)``, both
    ``[B, N]`` int64: node i's parent (-1 for the root and for nodes no link reaches)
    and its rank among its siblings in SGLang's walk order (0 = the first child).

    Every node points at the node that links to it: its previous sibling through a
    sibling link, else its parent through a first-child link. Ranking the sibling lists
    (pointer jumping) gives each node its first sibling, whose parent is the node's."""
    via_parent = _inverse_links(retrive_next_token)
    prev_sibling = _inverse_links(retrive_next_sibling)
    first, rank = _list_rank(prev_sibling)
    return via_parent.gather(1, first), rank


def _as_tree(where, candidates, retrive_next_token, retrive_next_sibling):
    """verify_tree's (draft_tokens [B(N-1)], parents [B(N-1)], cu [B+1]) and SGLang's
    (parent, rank): node i of request b is our node ``b(N-1) + i - 1``."""
    if candidates.dim() != 2:
        raise ValueError(f"{where}: candidates must be [bs, draft_token_num], got {tuple(candidates.shape)}")
    batch, n = candidates.shape
    for name, t in (("retrive_next_token", retrive_next_token), ("retrive_next_sibling", retrive_next_sibling)):
        if tuple(t.shape) != (batch, n):
            raise ValueError(f"{where}: {name} must have shape {[batch, n]}, got {tuple(t.shape)}")
    parent, rank = tree_parents(retrive_next_token, retrive_next_sibling)
    reachable = parent[:, 1:] >= 0
    tokens = torch.where(reachable, candidates[:, 1:].to(torch.int64), -1)  # unreachable nodes: padding
    parents = torch.where(reachable, parent[:, 1:] - 1, -1)
    cu = torch.arange(batch + 1, device=candidates.device, dtype=torch.int64) * (n - 1)
    return tokens.reshape(-1), parents.reshape(-1), cu, parent, rank


def _write_outputs(predicts, accept_index, accept_token_num, retrive_index, path, num_accepted, tokens):
    """SGLang's mutable outputs from the accepted path ``path [B, >=1]`` (node indices,
    0 = the root) and ``tokens [B, >=1]`` (``tokens[b, k]`` is written at the flat index
    of path node k): ``accept_index[b, k] = retrive_index[b, path[b, k]]`` for
    ``k <= num_accepted[b]`` (-1 after), ``predicts[accept_index[b, k]] = tokens[b, k]``,
    ``accept_token_num = num_accepted``. Other entries of ``predicts`` are left as they
    are, as sgl-kernel does."""
    width = accept_index.shape[1]
    num = num_accepted.to(torch.int64).unsqueeze(1)
    k = torch.arange(width, device=path.device, dtype=torch.int64).unsqueeze(0)
    kk = torch.minimum(k, num)  # past the end: repeat the last entry (the same value is written twice)
    nodes = path.to(torch.int64).gather(1, kk)
    flat = retrive_index.to(torch.int64).gather(1, nodes)
    values = tokens.to(torch.int64).gather(1, kk)
    predicts.scatter_(0, flat.reshape(-1), values.reshape(-1).to(predicts.dtype))
    accept_index.copy_(torch.where(k <= num, flat, -1).to(accept_index.dtype))
    accept_token_num.copy_(num_accepted.to(accept_token_num.dtype))


def tree_speculative_sampling_target_only(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor | None = None,
    retrive_next_token: torch.Tensor | None = None,
    retrive_next_sibling: torch.Tensor | None = None,
    uniform_samples: torch.Tensor | None = None,
    uniform_samples_for_final_sampling: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
    draft_probs=None,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
    deterministic: bool = True,
    *,
    seed: torch.Tensor | int | None = None,
    offset: torch.Tensor | int | None = None,
    min_p: torch.Tensor | None = None,
    backend: str | None = None,
    **aliases,
) -> None:
    """sgl-kernel's ``tree_speculative_sampling_target_only`` (SGLANG_COMMIT): the same
    arguments, the same mutable outputs, verified by ``verify_tree`` with point-mass
    drafts (EAGLE's top-k siblings are deterministic, so the target-only walk --
    rejecting a child zeroes its probability and renormalises -- is the lossless rule).

    Args (SGLang's):
        predicts: ``[bs * N]`` int32, written at the accepted path's flat indices: the
            accepted child's token, and at the last node the token sampled from the
            residual (or the bonus).
        accept_index: ``[bs, W]`` int32, the path's flat indices (root first), -1 after.
            ``W - 1`` must be at least the depth of every tree (EAGLE: the number of steps).
        accept_token_num: ``[bs]`` int32, accepted drafts (without the root and the
            emitted token).
        candidates: ``[bs, N]`` tokens, column 0 the root.
        retrive_index, retrive_next_token, retrive_next_sibling: ``[bs, N]`` the tree.
        uniform_samples, uniform_samples_for_final_sampling: SGLang's coins; not read:
            the coins come from our stream keyed by (``seed``, ``offset``).
        target_probs: ``[bs, N, V]`` (or ``[bs * N, V]``) after SGLang's temperature and
            top-k / top-p renormalisation.
        draft_probs: accepted and ignored, as sgl-kernel does (target-only); in the form
            without it (SGLANG_COMMIT_NO_DRAFT_PROBS), a float here is threshold_single.
        threshold_single, threshold_acc: must be 1.0; other values are SGLang's lossy
            relaxation, an error here.
        deterministic: accepted (we are deterministic).
        seed, offset (ours): ``[bs]`` or int; None = seeds from torch's default generator
            of the device (as reproducible as SGLang's ``torch.rand`` coins), offset 0.
            Pass ``sampling_seed`` and the root's position for position-keyed streams.
        min_p (ours): ``[bs]`` SGLang's ``sampling_info.min_ps`` when
            ``need_min_p_sampling``: keeps tokens with ``p >= min_p * max p`` of the
            (already tempered) target rows, inside the kernel.
        backend (ours): verify_tree's backend.
        retrieve_index / retrieve_next_token / retrieve_next_sibling: the older spelling.

    Example (the same tree as verify_tree_greedy's, one-hot target rows):

    >>> import torch
    >>> from dspark_kernels.integrations.sglang import tree_speculative_sampling_target_only
    >>> probs = torch.zeros(1, 3, 10)
    >>> probs[0, 0, 6] = probs[0, 1, 0] = probs[0, 2, 9] = 1.0
    >>> predicts = torch.full((3,), -1, dtype=torch.int32)
    >>> accept_index, accept_num = torch.full((1, 2), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    >>> tree_speculative_sampling_target_only(
    ...     predicts, accept_index, accept_num, torch.tensor([[4, 5, 6]]), torch.tensor([[0, 1, 2]]),
    ...     torch.tensor([[1, -1, -1]]), torch.tensor([[-1, 2, -1]]), None, None, probs)
    >>> predicts.tolist(), accept_index.tolist(), accept_num.tolist()
    ([6, -1, 9], [[0, 2]], [1])

    Cost: SGLang hands over probabilities; our op reads logits: one ``[bs * N, V]`` log.
    """
    where = "tree_speculative_sampling_target_only"
    if draft_probs is not None and not isinstance(draft_probs, torch.Tensor):  # the no-draft_probs positional form
        draft_probs, threshold_single, threshold_acc, deterministic = None, draft_probs, threshold_single, \
            threshold_acc
    given = _aliases(where, aliases, {"retrive_index": retrive_index, "retrive_next_token": retrive_next_token,
                                      "retrive_next_sibling": retrive_next_sibling})
    if float(threshold_single) != 1.0 or float(threshold_acc) != 1.0:
        raise ValueError(f"{where}: threshold_single = {threshold_single}, threshold_acc = {threshold_acc}: "
                         f"thresholds other than 1.0 are SGLang's lossy relaxation (they accept drafts the "
                         f"target distribution would not); dspark_kernels verifies losslessly only")
    if target_probs is None:
        raise TypeError(f"{where}: missing argument target_probs")
    tokens, parents, cu, _, _ = _as_tree(where, candidates, given["retrive_next_token"],
                                         given["retrive_next_sibling"])
    batch, n = candidates.shape
    logits = _common.log_of_probs(target_probs.reshape(batch * n, target_probs.shape[-1]))
    if isinstance(seed, torch.Tensor):
        seed = _common.per_request(seed, batch, logits.device, torch.int64)
    if isinstance(offset, torch.Tensor):
        offset = _common.per_request(offset, batch, logits.device, torch.int64)
    filters = _common.min_p_kwargs(min_p, min_p is not None)
    path, num_accepted, out = _verification.verify_tree(
        logits, tokens, parents, cu, temperature=1.0, seed=seed, offset=offset, max_depth=n - 1, backend=backend,
        **filters)
    _write_outputs(predicts, accept_index, accept_token_num, given["retrive_index"], path, num_accepted, out)


def verify_tree_greedy(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor | None = None,
    retrive_next_token: torch.Tensor | None = None,
    retrive_next_sibling: torch.Tensor | None = None,
    target_predict: torch.Tensor | None = None,
    **aliases,
) -> None:
    """sgl-kernel's ``verify_tree_greedy`` (SGLANG_COMMIT): the same arguments and mutable
    outputs. From the root, follow the first child in SGLang's sibling order whose token
    is ``target_predict`` of the current node, for at most ``W - 1`` steps
    (``W = accept_index.shape[1]``); ``predicts`` at each path node's flat index gets
    that node's ``target_predict`` (the accepted child's token, and at the end the
    emitted one).

    Example (root -> children 1 (token 5), 2 (token 6); the root's argmax is 6):

    >>> import torch
    >>> from dspark_kernels.integrations.sglang import verify_tree_greedy
    >>> predicts = torch.full((3,), -1, dtype=torch.int32)
    >>> accept_index, accept_num = torch.full((1, 2), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    >>> verify_tree_greedy(predicts, accept_index, accept_num, torch.tensor([[4, 5, 6]]), torch.tensor([[0, 1, 2]]),
    ...                    torch.tensor([[1, -1, -1]]), torch.tensor([[-1, 2, -1]]), torch.tensor([[6, 0, 9]]))
    >>> predicts.tolist(), accept_index.tolist(), accept_num.tolist()
    ([6, -1, 9], [[0, 2]], [1])

    sgl-kernel's greedy verify takes the target argmax ids, not logits, so this is
    integer work only (``[bs, N]`` gathers, no ``[N, V]`` tensor): verify_tree's greedy
    rule on the same tree would give the same path from the logits
    (python_tests/test_integrations_sglang.py checks that)."""
    where = "verify_tree_greedy"
    given = _aliases(where, aliases, {"retrive_index": retrive_index, "retrive_next_token": retrive_next_token,
                                      "retrive_next_sibling": retrive_next_sibling})
    if target_predict is None:
        raise TypeError(f"{where}: missing argument target_predict")
    _, _, _, parent, rank = _as_tree(where, candidates, given["retrive_next_token"], given["retrive_next_sibling"])
    batch, n = candidates.shape
    device = candidates.device
    predict = target_predict.reshape(batch, n).to(torch.int64)
    node = torch.arange(n, device=device, dtype=torch.int64).expand(batch, n)
    match = (parent >= 0) & (candidates.to(torch.int64) == predict.gather(1, parent.clamp(min=0)))
    big = n * n + n
    key = torch.where(match, rank * n + node, big)
    best = torch.full((batch, n + 1), big, dtype=torch.int64, device=device)
    best.scatter_reduce_(1, torch.where(match, parent, n), key, reduce="amin", include_self=True)
    chosen = torch.where(best[:, :n] < big, best[:, :n] % n, -1)  # the child each node's walk follows
    width = accept_index.shape[1]
    cur = torch.zeros(batch, dtype=torch.int64, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    path = [cur]
    num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    for _ in range(width - 1):
        nxt = chosen.gather(1, cur.unsqueeze(1)).squeeze(1)
        alive = alive & (nxt >= 0)
        cur = torch.where(alive, nxt, cur)
        num_accepted = num_accepted + alive.to(torch.int64)
        path.append(cur)
    path = torch.stack(path, 1)
    _write_outputs(predicts, accept_index, accept_token_num, given["retrive_index"], path, num_accepted,
                   predict.gather(1, path))


def commit_kv(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    accept_index: torch.Tensor,
    accept_length: torch.Tensor,
    draft_token_num: int,
    page_size: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Move the KV of SGLang's accepted paths into place with one ``kv_commit`` call
    (instead of ``get_src_tgt_cache_loc`` + ``get_target_cache_loc`` + ``move_kv_cache``).

    The verify pass wrote request b's window (node i = window index i, node 0 the root)
    at logical positions ``seq_lens[b] + i``; after the call positions
    ``seq_lens[b] .. seq_lens[b] + accept_length[b]`` hold the accepted path's KV.

    Args (SGLang's):
        k_buffers, v_buffers: per layer ``[num_slots, H, D]`` token-slot buffers
            (``MHATokenToKVPool.k_buffer`` / ``v_buffer``), viewed as
            ``[num_slots / page_size, page_size, H, D]`` pages (``num_slots`` a multiple
            of ``page_size``).
        req_to_token: ``[pool_size, max_context]`` slot of every logical position;
            pages are ``req_to_token[r, p * page_size] // page_size``.
        req_pool_indices: ``[bs]`` rows of ``req_to_token``.
        seq_lens: ``[bs]`` the committed length before this window.
        accept_index: ``[bs, W]`` flat indices ``b * draft_token_num + i``, -1 padded
            (from tree_speculative_sampling_target_only / verify_tree_greedy).
        accept_length: ``[bs]`` accepted drafts (``accept_token_num``).
        draft_token_num: N. page_size: SGLang's page size.

    Returns:
        the new lengths ``seq_lens + accept_length + 1`` (int32). Freeing the slots
        past the new length stays with SGLang's allocator."""
    caches = [t.view(-1, page_size, *t.shape[1:]) for t in (*k_buffers, *v_buffers)]
    block_table = req_to_token[:, ::page_size].index_select(0, req_pool_indices.to(torch.int64)) // page_size
    batch = accept_index.shape[0]
    base = torch.arange(batch, device=accept_index.device, dtype=accept_index.dtype).unsqueeze(1) * draft_token_num
    path = torch.where(accept_index >= 0, accept_index - base, -1)
    return _kv.kv_commit(caches, block_table, page_size, seq_lens, path, accept_length + 1, backend=backend)
