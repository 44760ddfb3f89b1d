"""``distributed.verify_block``: verify_block on vocabulary-sharded logits (docs/distributed.md)."""

from __future__ import annotations

import os

import torch

from .._validation import (_INT_DTYPES, _check_offsets, _check_tensor, _default_seed_offset, _fail,
                           _per_request_sampling)
from ..reference import philox
from ..reference.sampling import residual_log_weights
from ..reference.sampling import min_p_log_tensor
from . import _rows
from ._checks import agree
from ._comm import Comm
from ._rows import NEG_INF

OP = "distributed.verify_block"


def _shard_columns(vocab_start: int, width: int, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    cols = torch.arange(vocab_start, vocab_start + width, device=device, dtype=torch.int64)
    return cols, (cols < vocab_size).unsqueeze(0)


def _python_int(op, name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(op, f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        _fail(op, f"{name} must be >= {lo}, got {value}")
    return value


def _owned_values(x: torch.Tensor, rows: torch.Tensor, row_index: torch.Tensor, vocab_start: int,
                  vocab_size: int) -> torch.Tensor:
    """``rows[row_index[i], x_i - vocab_start]`` as int64 bit patterns where this shard owns
    ``x_i`` (``0 <= x_i < vocab_size``), 0 elsewhere: summed over ranks, the owner's bits."""
    width = rows.shape[1]
    owned = (x >= vocab_start) & (x < vocab_start + width) & (x >= 0) & (x < vocab_size)
    if width == 0 or x.numel() == 0:
        return torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    value = rows[row_index, torch.clamp(x - vocab_start, 0, width - 1)]
    return torch.where(owned, _rows.float_bits(value), 0)


def verify_block(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
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
    max_num_draft: int | None = None,
    draft_index: torch.Tensor | None = None,
    method: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""verify_block on logits split by vocabulary over the ranks of ``group``.

    Each rank passes its shard: columns ``[vocab_start, vocab_start + V_local)`` of the
    target rows (``target_logits [N + B, V_local]``) and, if given, of the draft rows
    (``draft_logits`` / ``draft_probs [*, V_local]``); every other argument is global and
    the same on every rank (draft ids, ``cu_num_draft``, sampling parameters, seeds,
    offsets). Shards tile the vocabulary in rank order and may be uneven; columns at
    or past ``vocab_size`` (a padded LM head) are not part of the vocabulary.

    Returns ``(output_tokens [B, max_num_draft + 1] int32, num_accepted [B] int32)``,
    identical on every rank and bit-identical to ``dspark_kernels.verify_block`` on
    the gathered logits ``cat(shards, 1)[:, :vocab_size]`` with the same seeds and
    offsets (``backend="reference"``; the other single-device backends agree with it
    as documented in docs/correctness.md). The row statistics combine exactly (global
    max, int64 fixed-point masses, radix-selected top-k / top-p thresholds, per-shard
    race winners at global indices), with 2 to 11 collectives of ``O(rows)`` or
    ``O(rows * 256)`` values and no host read (docs/distributed.md).

    ``seed=None`` draws rank 0's seeds and shares them (one more all-gather). Only
    ``method="token"`` is supported on shards; ``return_logprobs`` is not offered here.

    >>> import torch, dspark_kernels as dk
    >>> from dspark_kernels import distributed
    >>> logits = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])  # one request, one draft
    >>> out, n = distributed.verify_block(logits, torch.tensor([1]), torch.tensor([0, 1]),
    ...                                   vocab_start=0, vocab_size=3)   # world size 1
    >>> out.tolist(), n.tolist()
    ([[1, 0]], [1])
    """
    comm = Comm(group)
    device = target_logits.device if isinstance(target_logits, torch.Tensor) else torch.device("cpu")
    local_error = None
    draw_seed = seed is None
    try:
        if not isinstance(method, str) or method != "token":
            _fail(OP, f"method must be 'token' on vocabulary shards (block verification needs whole rows), "
                      f"got {method!r}")
        _python_int(OP, "vocab_start", vocab_start, 0)
        _python_int(OP, "vocab_size", vocab_size, 1)
        _check_tensor(OP, "target_logits", target_logits, dim=2)
        _check_tensor(OP, "cu_num_draft", cu_num_draft, dim=1, dtypes=_INT_DTYPES, device=device)
        _check_tensor(OP, "draft_tokens", draft_tokens, dim=1, dtypes=_INT_DTYPES, device=device)
        batch = max(cu_num_draft.shape[0] - 1, 0)
        temperature, top_k, top_p, min_p = _per_request_sampling(OP, temperature, top_k, top_p, min_p, batch,
                                                                 device)
        seed, offset = _default_seed_offset(OP, seed, offset, batch, device)
        if max_num_draft is None:
            n = _check_offsets(OP, "cu_num_draft", cu_num_draft, draft_tokens.shape[0], "draft_tokens.size(0)")
            max_num_draft = int(n.max()) if batch > 0 else 0
        from ..verification import _check_verify_layout

        _check_verify_layout(OP, target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, temperature,
                             top_k, top_p, seed, offset, max_num_draft, "max_num_draft", min_p, draft_index)
        if device.type == "cpu" or os.environ.get("DSPARK_DEBUG") == "1":
            _check_data(target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, max_num_draft,
                        draft_index, vocab_size)
    except ValueError as e:
        local_error = e
    agree(comm, OP, local_error, _layout(vocab_start, vocab_size, target_logits, draft_tokens, cu_num_draft,
                                         draft_logits, draft_probs, temperature, top_k, top_p, min_p,
                                         draft_index, max_num_draft), device)
    if draw_seed and comm.world > 1:
        seed = comm.all_gather(seed)[0]
    return _verify(comm, target_logits, draft_tokens.to(torch.int64), cu_num_draft.to(torch.int64), draft_logits,
                   draft_probs, temperature, top_k, top_p, min_p, seed, offset, max_num_draft, draft_index,
                   vocab_start, vocab_size)


def _layout(vocab_start, vocab_size, target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs,
            temperature, top_k, top_p, min_p, draft_index, max_num_draft) -> dict[str, int]:
    def size(t, d):
        return int(t.shape[d]) if isinstance(t, torch.Tensor) and t.dim() > d else -1

    flags = sum(1 << j for j, t in enumerate((draft_logits, draft_probs, temperature, top_k, top_p, min_p,
                                              draft_index)) if t is not None)
    q = draft_logits if draft_logits is not None else draft_probs
    return {"vocab_start": vocab_start if isinstance(vocab_start, int) else -1,
            "V_local": size(target_logits, 1),
            "vocab_size": vocab_size if isinstance(vocab_size, int) else -1,
            "target_logits.size(0)": size(target_logits, 0), "draft_tokens.size(0)": size(draft_tokens, 0),
            "cu_num_draft.size(0)": size(cu_num_draft, 0), "draft rows": size(q, 0),
            "max_num_draft": max_num_draft if isinstance(max_num_draft, int) else -1,
            "the optional arguments given": flags}


def _check_data(target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, max_num_draft, draft_index,
                vocab_size):
    from .._validation import _check_draft_ids, _check_draft_index_data

    n = _check_offsets(OP, "cu_num_draft", cu_num_draft, draft_tokens.shape[0], "draft_tokens.size(0)")
    if n.numel() and int(n.max()) > max_num_draft:
        b = int(torch.argmax(n))
        _fail(OP, f"request {b} has {int(n[b])} drafts, more than max_num_draft = {max_num_draft}")
    _check_draft_ids(OP, draft_tokens, vocab_size, "vocab_size")
    _check_draft_index_data(OP, draft_index, draft_logits, draft_probs)


class Prepared:
    """What verify_block and verify_tree share (``prepare``)."""


def prepare(comm, target_logits, drafts, cu, parent_row, draft_logits, draft_probs, draft_index, temperature,
            top_k, top_p, min_p, vocab_start, vocab_size) -> Prepared:
    """The shard's columns; every row's filtered distribution (the target rows, then q's
    rows from draft_logits); the greedy argmax of the target rows; and per draft ``i``
    the values of its accept test: ``lp`` = log p of its token under target row
    ``parent_row[i]``, ``lq`` = log q of it, ``q_ok`` = q(x) is a finite positive number.
    Two collectives, and four more for each of top_k / top_p when given (docs/distributed.md)."""
    device = target_logits.device
    T, C = target_logits.shape
    N = drafts.shape[0]
    B = cu.shape[0] - 1
    pr = Prepared()
    pr.T, pr.C, pr.N, pr.B = T, C, N, B
    pr.cols, pr.valid = _shard_columns(vocab_start, C, vocab_size, device)
    pr.first_row = cu[:-1] + torch.arange(B, device=device)  # each request's first target row
    req_of_row = torch.searchsorted(pr.first_row, torch.arange(T, device=device), right=True) - 1
    draft_ids = torch.arange(N, device=device)
    pr.req_of_draft = torch.searchsorted(cu, draft_ids, right=True) - 1
    pr.greedy = torch.ones(B, dtype=torch.bool, device=device) if temperature is None else ~(temperature > 0)
    temp = torch.ones(B, device=device) if temperature is None else torch.where(pr.greedy, 1.0, temperature)
    pr.qrow = draft_index.to(torch.int64) if draft_index is not None else draft_ids
    pr.draft_logits, pr.draft_probs = draft_logits, draft_probs

    # Greedy batches need only the argmax (a host read of the temperatures on CPU tensors
    # finds them; on a GPU only temperature=None does, without reading anything back).
    pr.sampling = temperature is not None and (device.type != "cpu" or bool((temperature > 0).any()))
    if not pr.sampling:
        am_value, am_index = _rows.local_argmax(_rows.raw_rows(target_logits, pr.valid), vocab_start)
        packed = comm.all_gather(torch.cat([_rows.float_bits(am_value), am_index]))
        _, argmax = _rows.merge_argmax(_rows.bits_float(packed[:, :T]), packed[:, T:])
        pr.argmax = torch.clamp(argmax, min=0)
        pr.x_valid = (drafts >= 0) & (drafts < vocab_size)
        pr.dist = None
        return pr

    row_req = req_of_row
    s_rows = target_logits
    if draft_logits is not None:
        row_req = torch.cat([req_of_row, pr.req_of_draft])
        s_rows = torch.cat([target_logits.to(torch.float32), draft_logits[pr.qrow].to(torch.float32)])
    s = _rows.scale_rows(s_rows, temp[row_req], pr.valid)
    R = s.shape[0]

    # 1: the global max of every row and the greedy argmax of the target rows (one all-gather).
    local_max = s.amax(1) if C > 0 else torch.full((R,), NEG_INF, device=device)
    am_value, am_index = _rows.local_argmax(_rows.raw_rows(target_logits, pr.valid), vocab_start)
    packed = comm.all_gather(torch.cat([_rows.float_bits(local_max), _rows.float_bits(am_value), am_index]))
    m = _rows.bits_float(packed[:, :R]).amax(0)
    _, argmax = _rows.merge_argmax(_rows.bits_float(packed[:, R:R + T]), packed[:, R + T:])
    pr.argmax = torch.clamp(argmax, min=0)  # a row with no value above -inf: token 0

    # 2: thresholds and fixed-point masses; the owners' values of the draft tokens ride along.
    x = drafts
    extra = [_owned_values(x, s, parent_row, vocab_start, vocab_size)]
    if draft_logits is not None:
        extra.append(_owned_values(x, s, T + draft_ids, vocab_start, vocab_size))
    elif draft_probs is not None:
        extra.append(_owned_values(x, draft_probs.to(torch.float32), pr.qrow, vocab_start, vocab_size))
    lmp = min_p_log_tensor(min_p)[row_req] if min_p is not None else None
    pr.dist, owned = _rows.row_distribution(comm, s, pr.valid, m, vocab_size,
                                            top_k[row_req] if top_k is not None else None,
                                            top_p[row_req] if top_p is not None else None, lmp,
                                            extra=torch.cat(extra))
    d = pr.dist
    pr.x_valid = (x >= 0) & (x < vocab_size)
    pr.lp = d.log_prob(_rows.bits_float(owned[:N]), d.threshold[parent_row], d.lse[parent_row])
    if draft_logits is not None:
        pr.lq = d.log_prob(_rows.bits_float(owned[N:]), d.threshold[T:], d.lse[T:])
    elif draft_probs is not None:
        pr.lq = torch.log(_rows.bits_float(owned[N:]))
    else:
        pr.lq = torch.zeros(N, device=device)
    pr.q_ok = pr.x_valid & (pr.lq > NEG_INF) & (pr.lq < float("inf"))
    return pr


def q_log_rows(pr: Prepared, drafts: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """``[len(i), C]`` log q of drafts ``i`` on this shard (filtered draft_logits rows,
    log draft_probs, or the point mass at the draft token)."""
    if pr.draft_logits is not None:
        return pr.dist.row_log_probs(pr.T + i)
    if pr.draft_probs is not None:
        return torch.log(pr.draft_probs[pr.qrow[i]].to(torch.float32))
    return torch.where(pr.cols.unsqueeze(0) == drafts[i].unsqueeze(1), 0.0, NEG_INF)


def _verify(comm, target_logits, drafts, cu, draft_logits, draft_probs, temperature, top_k, top_p, min_p, seed,
            offset, width, draft_index, vocab_start, vocab_size):
    device = target_logits.device
    N = drafts.shape[0]
    draft_ids = torch.arange(N, device=device)
    req_of_draft = torch.searchsorted(cu, draft_ids, right=True) - 1
    pr = prepare(comm, target_logits, drafts, cu, draft_ids + req_of_draft, draft_logits, draft_probs, draft_index,
                 temperature, top_k, top_p, min_p, vocab_start, vocab_size)
    n_b = cu[1:] - cu[:-1]
    pos_of_draft = draft_ids - cu[req_of_draft]
    x = drafts

    # 3: accept decisions of every draft, identical on every rank (no shard data needed).
    b_of = req_of_draft
    greedy_ok = pr.x_valid & (x == pr.argmax[draft_ids + b_of])
    if not pr.sampling:
        first_fail = torch.where(greedy_ok, n_b[b_of], pos_of_draft)
        accepted = n_b.clone().scatter_reduce_(0, b_of, first_fail, reduce="amin", include_self=True)
        return _output(x, cu, accepted, pr.argmax[pr.first_row + accepted], width)
    log_u = torch.log(philox.uniforms(seed[b_of], offset[b_of] + pos_of_draft, philox.SALT_ACCEPT, 0))
    sample_ok = (pr.x_valid & (pr.lp > NEG_INF) & pr.q_ok
                 & (log_u.to(torch.float64) < pr.lp.to(torch.float64) - pr.lq.to(torch.float64)))
    ok = torch.where(pr.greedy[b_of], greedy_ok, sample_ok)
    first_fail = torch.where(ok, n_b[b_of], pos_of_draft)
    accepted = n_b.clone().scatter_reduce_(0, b_of, first_fail, reduce="amin", include_self=True)

    # 4: the emitted token: a race at the first rejection (or the bonus row) per request.
    r_emit = pr.first_row + accepted
    rejected = accepted < n_b
    log_p = pr.dist.row_log_probs(r_emit)
    weights = log_p
    if N > 0:
        i_emit = torch.clamp(cu[:-1] + accepted, max=N - 1)  # the rejected draft (if any)
        use_residual = rejected & pr.q_ok[i_emit]
        weights = torch.where(use_residual.unsqueeze(1), residual_log_weights(log_p, q_log_rows(pr, x, i_emit)),
                              log_p)
    noise = _rows.gumbel_noise(seed, offset + accepted, philox.SALT_RESAMPLE, pr.cols)
    idx_w, idx_p = _rows.gather_winners(comm, [_rows.race_scores(weights, noise), _rows.race_scores(log_p, noise)],
                                        vocab_start)
    sampled = torch.where(idx_w >= 0, idx_w, torch.clamp(idx_p, min=0))
    emitted = torch.where(pr.greedy, pr.argmax[r_emit], sampled)
    return _output(x, cu, accepted, emitted, width)


def _output(x, cu, accepted, emitted, width):
    """``output_tokens``: the accepted drafts, the emitted token, then -1."""
    device = x.device
    N, B = x.shape[0], cu.shape[0] - 1
    j = torch.arange(width + 1, device=device).unsqueeze(0)
    kept = x[torch.clamp(cu[:-1].unsqueeze(1) + j, max=N - 1)] if N > 0 else torch.zeros(B, width + 1,
                                                                                        dtype=torch.int64,
                                                                                        device=device)
    acc = accepted.unsqueeze(1)
    out = torch.where(j < acc, kept, torch.where(j == acc, emitted.unsqueeze(1), -1))
    return out.to(torch.int32), accepted.to(torch.int32)
