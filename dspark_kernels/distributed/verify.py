"""``distributed.verify_block``: verify_block on vocabulary-sharded logits (docs/distributed.md)."""

from __future__ import annotations

import os

import torch

from .._validation import (_INT_DTYPES, _check_offsets, _check_tensor, _default_seed_offset, _fail,
                           _per_request_sampling)
from ..reference import philox
from ..reference.sampling import residual_log_weights
from ..triton._filters import min_p_log_tensor
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


def _owned_values(x: torch.Tensor, rows: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """``rows[i, x_i - vocab_start]`` as int64 bit patterns where this shard owns ``x_i``
    (``0 <= x_i < vocab_size``), 0 elsewhere: summed over ranks, the owner's bits."""
    width = rows.shape[1]
    owned = (x >= vocab_start) & (x < vocab_start + width) & (x >= 0) & (x < vocab_size)
    if width == 0 or x.numel() == 0:
        return torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    col = torch.clamp(x - vocab_start, 0, width - 1).unsqueeze(1)
    value = rows.gather(1, col).squeeze(1)
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
    from .._validation import _check_draft_index_data

    n = _check_offsets(OP, "cu_num_draft", cu_num_draft, draft_tokens.shape[0], "draft_tokens.size(0)")
    if n.numel() and int(n.max()) > max_num_draft:
        b = int(torch.argmax(n))
        _fail(OP, f"request {b} has {int(n[b])} drafts, more than max_num_draft = {max_num_draft}")
    d = draft_tokens.cpu().to(torch.int64)
    bad = (d < -1) | (d >= vocab_size)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        _fail(OP, f"draft_tokens[{i}] = {int(d[i])} is outside [-1, vocab_size) with vocab_size = {vocab_size}")
    _check_draft_index_data(OP, draft_index, draft_logits, draft_probs)


def _verify(comm, target_logits, drafts, cu, draft_logits, draft_probs, temperature, top_k, top_p, min_p, seed,
            offset, width, draft_index, vocab_start, vocab_size):
    device = target_logits.device
    T, C = target_logits.shape
    N = drafts.shape[0]
    B = cu.shape[0] - 1
    cols, valid = _shard_columns(vocab_start, C, vocab_size, device)
    n_b = cu[1:] - cu[:-1]
    first_row = cu[:-1] + torch.arange(B, device=device)  # target row of position 0 of each request
    req_of_row = torch.searchsorted(first_row, torch.arange(T, device=device), right=True) - 1
    draft_ids = torch.arange(N, device=device)
    req_of_draft = torch.searchsorted(cu, draft_ids, right=True) - 1
    pos_of_draft = draft_ids - cu[req_of_draft]
    greedy = torch.ones(B, dtype=torch.bool, device=device) if temperature is None else ~(temperature > 0)
    temp = torch.ones(B, device=device) if temperature is None else torch.where(greedy, 1.0, temperature)
    qrow = draft_index.to(torch.int64) if draft_index is not None else draft_ids

    # Rows whose statistics are needed: the target rows, then q's rows (draft_logits).
    row_req = req_of_row
    s_rows = target_logits
    if draft_logits is not None:
        row_req = torch.cat([req_of_row, req_of_draft])
        s_rows = torch.cat([target_logits.to(torch.float32), draft_logits[qrow].to(torch.float32)])
    s = _rows.scale_rows(s_rows, temp[row_req], valid)

    # 1: the global max of every row, and the greedy argmax of the target rows (one all-gather).
    local_max = s.amax(1) if C > 0 else torch.full((s.shape[0],), NEG_INF, device=device)
    am_value, am_index = _rows.local_argmax(_rows.raw_rows(target_logits, valid), vocab_start)
    packed = comm.all_gather(torch.cat([_rows.float_bits(local_max), _rows.float_bits(am_value), am_index]))
    R = s.shape[0]
    m = _rows.bits_float(packed[:, :R]).amax(0)
    _, argmax = _rows.merge_argmax(_rows.bits_float(packed[:, R:R + T]), packed[:, R + T:])
    argmax = torch.clamp(argmax, min=0)  # a row with no value above -inf: token 0

    # 2: thresholds and fixed-point masses; the draft token's values ride along.
    x_row = torch.full((R,), -1, dtype=torch.int64, device=device)
    draft_row = draft_ids + req_of_draft  # target row of draft i
    x_row[draft_row] = drafts
    if draft_logits is not None:
        x_row[T:] = drafts
    extra = [_owned_values(x_row, s, vocab_start, vocab_size)]
    if draft_probs is not None:
        q_bits = torch.zeros(R, dtype=torch.int64, device=device)
        q_bits[draft_row] = _owned_values(drafts, draft_probs[qrow].to(torch.float32), vocab_start, vocab_size)
        extra.append(q_bits)
    lmp = min_p_log_tensor(min_p)[row_req] if min_p is not None else None
    dist, owned = _rows.row_distribution(comm, s, valid, m, vocab_size,
                                         top_k[row_req] if top_k is not None else None,
                                         top_p[row_req] if top_p is not None else None, lmp,
                                         extra=torch.stack(extra, 1))

    # 3: accept decisions of every draft, identical on every rank (no shard data needed).
    x = drafts
    x_valid = (x >= 0) & (x < vocab_size)
    s_x = _rows.bits_float(owned[draft_row, 0])
    lp = dist.log_prob(s_x, dist.threshold[draft_row], dist.lse[draft_row])
    if draft_logits is not None:
        lq = dist.log_prob(_rows.bits_float(owned[T + draft_ids, 0]), dist.threshold[T:], dist.lse[T:])
    elif draft_probs is not None:
        lq = torch.log(_rows.bits_float(owned[draft_row, 1]))
    else:
        lq = torch.zeros(N, device=device)
    q_ok = x_valid & (lq > NEG_INF) & (lq < float("inf"))
    b_of = req_of_draft
    log_u = torch.log(philox.uniforms(seed[b_of], offset[b_of] + pos_of_draft, philox.SALT_ACCEPT, 0))
    sample_ok = x_valid & (lp > NEG_INF) & q_ok & (log_u.to(torch.float64) < lp.to(torch.float64) - lq.to(torch.float64))
    greedy_ok = x_valid & (x == argmax[draft_row])
    ok = torch.where(greedy[b_of], greedy_ok, sample_ok)
    first_fail = torch.where(ok, n_b[b_of], pos_of_draft)
    accepted = n_b.clone().scatter_reduce_(0, b_of, first_fail, reduce="amin", include_self=True)

    # 4: the emitted token: a race at the first rejection (or the bonus row) per request.
    r_emit = first_row + accepted
    rejected = accepted < n_b
    i_emit = torch.clamp(cu[:-1] + accepted, max=max(N - 1, 0))  # the rejected draft (if any)
    log_p = dist.row_log_probs(r_emit)
    if N > 0:
        x_emit = x[i_emit]
        if draft_logits is not None:
            log_q = dist.row_log_probs(T + i_emit)
        elif draft_probs is not None:
            log_q = torch.log(draft_probs[qrow[i_emit]].to(torch.float32))
        else:
            log_q = torch.where(cols.unsqueeze(0) == x_emit.unsqueeze(1), 0.0, NEG_INF).expand(B, C)
        use_residual = rejected & q_ok[i_emit]
        weights = torch.where(use_residual.unsqueeze(1), residual_log_weights(log_p, log_q), log_p)
    else:
        weights = log_p
    noise = _rows.gumbel_noise(seed, offset + accepted, philox.SALT_RESAMPLE, cols)
    idx_w, idx_p = _rows.gather_winners(comm, [_rows.race_scores(weights, noise), _rows.race_scores(log_p, noise)],
                                        vocab_start)
    sampled = torch.where(idx_w >= 0, idx_w, torch.clamp(idx_p, min=0))
    emitted = torch.where(greedy, argmax[r_emit], sampled)

    j = torch.arange(width + 1, device=device).unsqueeze(0)
    at = torch.clamp(cu[:-1].unsqueeze(1) + j, max=max(N - 1, 0))
    kept = x[at] if N > 0 else torch.zeros(B, width + 1, dtype=torch.int64, device=device)
    acc = accepted.unsqueeze(1)
    out = torch.where(j < acc, kept, torch.where(j == acc, emitted.unsqueeze(1), -1))
    return out.to(torch.int32), accepted.to(torch.int32)
