"""``distributed.verify_tree``: verify_tree on vocabulary-sharded logits (docs/distributed.md)."""

from __future__ import annotations

import os

import torch

from .._validation import _INT_DTYPES, _check_tensor, _default_seed_offset, _fail, _per_request_sampling
from ..reference import philox
from ..reference.sampling import fixed_mass, lse_from_mass, mass_fraction_bits, residual_log_weights
from . import _rows
from ._checks import agree
from ._comm import Comm
from ._rows import NEG_INF
from .verify import _check_data, _layout, _python_int, prepare, q_log_rows

OP = "distributed.verify_tree"


def verify_tree(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    cu_num_draft: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group=None,
    draft_logits: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature: torch.Tensor | float | None = None,
    top_k: torch.Tensor | int | None = None,
    top_p: torch.Tensor | float | None = None,
    min_p: torch.Tensor | float | None = None,
    seed: torch.Tensor | int | None = None,
    offset: torch.Tensor | int | None = None,
    max_depth: int | None = None,
    draft_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""verify_tree on logits split by vocabulary over the ranks of ``group``.

    Shards as in ``distributed.verify_block``; ``draft_tokens``, ``parents``,
    ``cu_num_draft`` and the sampling arguments are global and replicated. Returns
    ``(accept_path, num_accepted, output_tokens)``, identical on every rank and
    bit-identical to ``dspark_kernels.verify_tree`` on the gathered logits
    (``backend="reference"``). The walk is sequential where the rule is: every
    rejection renormalises ``p' <- norm(max(p' - q_c, 0))`` over the whole vocabulary
    before the next sibling's test, so sampling requests take, per tree step (one
    child tried), one all-gather (the owner's ``log p'`` of the child's token and the
    races of requests that finish) and two all-reduces (the residual's max and
    fixed-point mass), for ``max_nodes + 1`` steps with ``max_nodes`` the largest
    tree of the batch (one host read of ``cu_num_draft``). Greedy batches need only
    the row statistics' two collectives.

    >>> import torch
    >>> from dspark_kernels import distributed
    >>> logits = torch.full((4, 5), -10.0)
    >>> logits[0, 2] = logits[1, 4] = logits[2, 1] = logits[3, 3] = 10.0
    >>> path, n, out = distributed.verify_tree(logits, torch.tensor([3, 2, 1]), torch.tensor([-1, -1, 1]),
    ...                                        torch.tensor([0, 3]), vocab_start=0, vocab_size=5, max_depth=2)
    >>> path.tolist(), n.tolist(), out.tolist()
    ([[0, 2, 3]], [2], [[2, 1, 3]])
    """
    from ..verification import _check_verify_layout, _tree_max_depth

    comm = Comm(group)
    device = target_logits.device if isinstance(target_logits, torch.Tensor) else torch.device("cpu")
    local_error = None
    draw_seed = seed is None
    max_nodes = -1
    try:
        _python_int(OP, "vocab_start", vocab_start, 0)
        _python_int(OP, "vocab_size", vocab_size, 1)
        _check_tensor(OP, "target_logits", target_logits, dim=2)
        _check_tensor(OP, "cu_num_draft", cu_num_draft, dim=1, dtypes=_INT_DTYPES, device=device)
        _check_tensor(OP, "draft_tokens", draft_tokens, dim=1, dtypes=_INT_DTYPES, device=device)
        _check_tensor(OP, "parents", parents, dim=1, shape=tuple(draft_tokens.shape), dtypes=_INT_DTYPES,
                      device=device)
        batch = max(cu_num_draft.shape[0] - 1, 0)
        temperature, top_k, top_p, min_p = _per_request_sampling(OP, temperature, top_k, top_p, min_p, batch,
                                                                 device)
        seed, offset = _default_seed_offset(OP, seed, offset, batch, device)
        deepest, where = _tree_max_depth(OP, parents, cu_num_draft, draft_tokens.shape[0])  # host reads
        if max_depth is None:
            max_depth = deepest
        _check_verify_layout(OP, target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, temperature,
                             top_k, top_p, seed, offset, max_depth, "max_depth", min_p, draft_index)
        if device.type == "cpu" or os.environ.get("DSPARK_DEBUG") == "1":
            if deepest > max_depth:
                _fail(OP, f"request {where}'s tree has depth {deepest}, more than max_depth = {max_depth}")
            _check_data(target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs,
                        draft_tokens.shape[0], draft_index, vocab_size)
        c = cu_num_draft.detach().cpu().to(torch.int64)
        max_nodes = int((c[1:] - c[:-1]).max()) if batch > 0 else 0
    except ValueError as e:
        local_error = e
    layout = _layout(vocab_start, vocab_size, target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs,
                     temperature, top_k, top_p, min_p, draft_index, max_depth)
    layout["max_nodes"] = max_nodes
    agree(comm, OP, local_error, layout, device)
    if draw_seed and comm.world > 1:
        seed = comm.all_gather(seed)[0]
    return _walk(comm, target_logits, draft_tokens.to(torch.int64), parents.to(torch.int64),
                 cu_num_draft.to(torch.int64), draft_logits, draft_probs, temperature, top_k, top_p, min_p, seed,
                 offset, max_depth, max_nodes, draft_index, vocab_start, vocab_size)


def _tree_tables(parents, cu, req_of_draft, max_depth):
    """Per node: global parent (-1: root), depth, rank among its siblings, next sibling
    (-1: none); per slot (node j -> j, root of b -> N + b): first child (-1: none)."""
    N = parents.shape[0]
    B = cu.shape[0] - 1
    device = parents.device
    ids = torch.arange(N, device=device)
    parent = torch.where(parents >= 0, cu[req_of_draft] + parents, -1)
    depth = torch.ones(N, dtype=torch.int64, device=device)
    for _ in range(max(max_depth, 1)):  # depth[j] = depth[parent] + 1, settled after max_depth rounds
        depth = torch.where(parent >= 0, depth[torch.clamp(parent, min=0)] + 1, 1)
    slot = torch.where(parent >= 0, parent, N + req_of_draft)  # the slot of each node's parent
    order = torch.sort(slot * (N + 1) + ids, stable=True).indices  # siblings together, by index
    sorted_slot = slot[order]
    pos = torch.arange(N, device=device)
    group_start = torch.full((N + B,), N, dtype=torch.int64, device=device).scatter_reduce_(
        0, sorted_slot, pos, reduce="amin", include_self=True)
    rank = torch.empty(N, dtype=torch.int64, device=device)
    rank[order] = pos - group_start[sorted_slot]
    same_next = torch.zeros(N, dtype=torch.bool, device=device)  # the next sorted node is a sibling
    following = torch.full((N,), -1, dtype=torch.int64, device=device)
    if N > 1:
        same_next[:-1] = sorted_slot[1:] == sorted_slot[:-1]
        following[:-1] = order[1:]
    nxt_sorted = torch.where(same_next, following, -1)
    next_sibling = torch.empty(N, dtype=torch.int64, device=device)
    next_sibling[order] = nxt_sorted
    first_child = torch.full((N + B,), N, dtype=torch.int64, device=device).scatter_reduce_(
        0, slot, ids, reduce="amin", include_self=True)
    first_child = torch.where(first_child == N, -1, first_child)
    return parent, depth, rank, next_sibling, first_child


def _walk(comm, target_logits, drafts, parents, cu, draft_logits, draft_probs, temperature, top_k, top_p, min_p,
          seed, offset, max_depth, max_nodes, draft_index, vocab_start, vocab_size):
    device = target_logits.device
    N = drafts.shape[0]
    B = cu.shape[0] - 1
    draft_ids = torch.arange(N, device=device)
    req_of_draft = torch.searchsorted(cu, draft_ids, right=True) - 1
    parent, depth, rank, next_sibling, first_child = _tree_tables(parents, cu, req_of_draft, max_depth)
    first_row = cu[:-1] + torch.arange(B, device=device)
    node_row = first_row[req_of_draft] + 1 + (draft_ids - cu[req_of_draft])  # target row after node j
    parent_row = torch.where(parent >= 0, node_row[torch.clamp(parent, min=0)], first_row[req_of_draft])
    pr = prepare(comm, target_logits, drafts, cu, parent_row, draft_logits, draft_probs, draft_index, temperature,
                 top_k, top_p, min_p, vocab_start, vocab_size)
    bits = mass_fraction_bits(vocab_size)
    width = max_depth + 1
    b_ids = torch.arange(B, device=device)

    cur_row = first_row.clone()           # target row of the current node
    d = torch.zeros(B, dtype=torch.int64, device=device)
    child = first_child[N + b_ids] if B > 0 else first_child[:0]  # the child to try next (-1: none)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    accepted = torch.zeros(B, dtype=torch.int64, device=device)
    path = torch.full((B, width), -1, dtype=torch.int64, device=device)
    path[:, 0] = 0
    tokens = torch.full((B, width), -1, dtype=torch.int64, device=device)
    emitted = torch.zeros(B, dtype=torch.int64, device=device)
    sampling = pr.sampling
    log_p = pr.dist.row_log_probs(cur_row) if sampling else None  # p' per request (this shard)
    raced = log_p

    for _ in range(max_nodes + 1):
        c = torch.where(d < max_depth, child, -1)
        live = ~done
        finish = live & (c < 0)
        cc = torch.clamp(c, min=0)
        x = drafts[cc] if N > 0 else torch.zeros(B, dtype=torch.int64, device=device)
        greedy_row = pr.greedy & live & (c >= 0)
        g_accept = greedy_row & pr.x_valid[cc] & (x == pr.argmax[cur_row]) if N > 0 else greedy_row
        if sampling:
            # One all-gather: the owner's log p'(x) of each request's child, and the race
            # winners of the requests that emit now (the last residual taken, else p').
            lookup = _owner_bits(log_p, x, vocab_start, vocab_size)
            noise = _rows.gumbel_noise(seed, offset + d, philox.SALT_RESAMPLE, pr.cols)
            value, index = _rows.local_argmax(_rows.race_scores(raced, noise), vocab_start)
            gathered = comm.all_gather(torch.stack([lookup, _rows.float_bits(value), index]))
            lp = _rows.bits_float(gathered[:, 0].sum(0))
            _, winner = _rows.merge_argmax(_rows.bits_float(gathered[:, 1]), gathered[:, 2])
            s_try = ~pr.greedy & live & (c >= 0) & pr.q_ok[cc] if N > 0 else ~pr.greedy & live & (c >= 0)
            lq = pr.lq[cc] if N > 0 else torch.zeros(B, device=device)
            log_u = torch.log(philox.uniforms(seed, offset + d, philox.SALT_ACCEPT, rank[cc] if N > 0 else 0))
            s_accept = s_try & (lp > NEG_INF) & (log_u.to(torch.float64) < lp.to(torch.float64) - lq.to(torch.float64))
            s_reject = s_try & ~s_accept
            # p' <- norm(max(p' - q_c, 0)) for the rejected, if the residual has mass.
            if N > 0:
                w = residual_log_weights(log_p, q_log_rows(pr, drafts, cc))
            else:
                w = log_p
            w_max = comm.all_reduce(w.amax(1) if w.shape[1] > 0 else torch.full((B,), NEG_INF, device=device), "max")
            take = s_reject & (w_max > NEG_INF)
            finite = w > NEG_INF
            safe = torch.where(take, w_max, 0.0).unsqueeze(1)
            e = fixed_mass(torch.exp(torch.where(finite & take.unsqueeze(1), w - safe, NEG_INF)), bits)
            total = comm.all_reduce(e.sum(1), "sum")
            lse = lse_from_mass(torch.where(take, w_max, 0.0), total, bits).unsqueeze(1)
            normalised = torch.where(finite, w - lse, NEG_INF)
            log_p = torch.where(take.unsqueeze(1), normalised, log_p)
            raced = torch.where(take.unsqueeze(1), w, raced)
            sample_emit = torch.clamp(winner, min=0)
        else:
            s_accept = torch.zeros(B, dtype=torch.bool, device=device)
            sample_emit = emitted
        acc = g_accept | s_accept
        emit_now = finish
        emitted = torch.where(emit_now, torch.where(pr.greedy, pr.argmax[cur_row], sample_emit), emitted)
        done = done | emit_now
        # Descend into the accepted child; move to the next sibling otherwise.
        step_on = live & (c >= 0) & ~acc
        if N > 0:
            tokens.scatter_(1, accepted.clamp(max=width - 1).unsqueeze(1),
                            torch.where(acc, x, tokens.gather(1, accepted.clamp(max=width - 1).unsqueeze(1))
                                        .squeeze(1)).unsqueeze(1))
            local = cc - cu[:-1]
            nxt_col = (accepted + 1).clamp(max=width - 1).unsqueeze(1)
            path.scatter_(1, nxt_col, torch.where(acc, 1 + local, path.gather(1, nxt_col).squeeze(1)).unsqueeze(1))
            cur_row = torch.where(acc, node_row[cc], cur_row)
            d = torch.where(acc, depth[cc], d)
            child = torch.where(acc, first_child[cc], torch.where(step_on, next_sibling[cc], child))
        accepted = accepted + acc.to(torch.int64)
        if sampling:
            fresh = pr.dist.row_log_probs(cur_row)
            log_p = torch.where(acc.unsqueeze(1), fresh, log_p)
            raced = torch.where(acc.unsqueeze(1), fresh, raced)
    out = tokens.clone()
    out.scatter_(1, accepted.clamp(max=width - 1).unsqueeze(1), emitted.unsqueeze(1))
    return path.to(torch.int32), accepted.to(torch.int32), out.to(torch.int32)


def _owner_bits(log_p: torch.Tensor, x: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Bits of ``log_p[b, x_b - vocab_start]`` where this shard owns ``x_b``, else 0."""
    from .verify import _owned_values

    return _owned_values(x, log_p, torch.arange(x.shape[0], device=x.device), vocab_start, vocab_size)
