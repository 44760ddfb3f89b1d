"""``distributed.draft_sample_block``: block drafting on vocabulary-sharded logits (docs/distributed.md)."""

from __future__ import annotations

import os

import torch

from .._validation import (_FLOAT_DTYPES, _INT_DTYPES, _check_min_p, _check_sampling_tensors, _check_tensor,
                           _default_seed_offset, _fail, _per_request_sampling)
from ..reference import philox
from ..reference.sampling import min_p_log_tensor
from . import _rows
from ._checks import agree
from ._comm import Comm
from ._rows import NEG_INF, POS_INF
from .verify import _python_int, _shard_columns

OP = "distributed.draft_sample_block"


def draft_sample_block(
    base_logits: torch.Tensor,
    anchor: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group=None,
    markov_w1: torch.Tensor | None = None,
    markov_w2: torch.Tensor | None = None,
    temperature: torch.Tensor | float | None = None,
    top_k: torch.Tensor | int | None = None,
    top_p: torch.Tensor | float | None = None,
    min_p: torch.Tensor | float | None = None,
    seed: torch.Tensor | int | None = None,
    offset: torch.Tensor | int | None = None,
    return_logits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""draft_sample_block on logits split by vocabulary over the ranks of ``group``.

    Each rank passes its shard ``base_logits [B, gamma, V_local]`` (columns
    ``[vocab_start, vocab_start + V_local)``) and, with the Markov head, the whole
    ``markov_w1 [vocab_size, r]`` (replicated: it is indexed by the previous token) and
    its column shard ``markov_w2 [r, V_local]``: ``W1[x_{k-1}] @ W2_local`` is this
    rank's shard of the corrected logits, summed over ``r`` in order as on one device.

    Returns ``draft_tokens [B, gamma]`` int32, identical on every rank (each step's
    token is a race combined from every shard, so the next step's ``W1`` row is the
    same everywhere by construction), and ``draft_logits [B, gamma, V_local]`` fp32,
    this rank's shard of the logits each token was drawn from (``[0]`` when
    ``return_logits`` is False). Bit-identical to ``dspark_kernels.draft_sample_block``
    on the gathered logits with the same seeds (``backend="reference"``). Per step:
    one all-gather without filters; with min-p / top-k / top-p, the row statistics of
    ``distributed.verify_block`` first.

    >>> import torch
    >>> from dspark_kernels import distributed
    >>> base = torch.tensor([[[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]]])   # B = 1, gamma = 2
    >>> tokens, _ = distributed.draft_sample_block(base, torch.tensor([0]), vocab_start=0, vocab_size=3)
    >>> tokens.tolist()
    [[1, 0]]
    """
    comm = Comm(group)
    device = base_logits.device if isinstance(base_logits, torch.Tensor) else torch.device("cpu")
    local_error = None
    draw_seed = seed is None
    try:
        _python_int(OP, "vocab_start", vocab_start, 0)
        _python_int(OP, "vocab_size", vocab_size, 1)
        _check_tensor(OP, "base_logits", base_logits, dim=3, dtypes=_FLOAT_DTYPES)
        batch, gamma, width = base_logits.shape
        _check_tensor(OP, "anchor", anchor, dim=1, shape=(batch,), dtypes=_INT_DTYPES, device=device)
        if (markov_w1 is None) != (markov_w2 is None):
            _fail(OP, "give both markov_w1 and markov_w2 or neither")
        if markov_w1 is not None:
            _check_tensor(OP, "markov_w1", markov_w1, dim=2, dtypes=_FLOAT_DTYPES, device=device)
            rank = markov_w1.shape[1]
            if markov_w1.shape[0] != vocab_size or rank < 1:
                _fail(OP, f"markov_w1 must have shape [vocab_size, r] = [{vocab_size}, r >= 1] (replicated), "
                          f"got {tuple(markov_w1.shape)}")
            _check_tensor(OP, "markov_w2", markov_w2, dim=2, shape=(rank, width), dtypes=_FLOAT_DTYPES,
                          device=device)
        temperature, top_k, top_p, min_p = _per_request_sampling(OP, temperature, top_k, top_p, min_p, batch,
                                                                 device)
        seed, offset = _default_seed_offset(OP, seed, offset, batch, device)
        _check_sampling_tensors(OP, batch, device, temperature, top_k, top_p, seed, offset)
        _check_min_p(OP, min_p, batch, device)
        if not isinstance(return_logits, bool):
            _fail(OP, f"return_logits must be a bool, got {type(return_logits).__name__}")
        if markov_w1 is not None and (device.type == "cpu" or os.environ.get("DSPARK_DEBUG") == "1"):
            a = anchor.cpu()
            bad = (a < 0) | (a >= vocab_size)
            if bad.any():
                b = int(torch.nonzero(bad)[0])
                _fail(OP, f"anchor[{b}] = {int(a[b])} is outside [0, vocab_size) = [0, {vocab_size})")
    except ValueError as e:
        local_error = e

    def size(t, d):
        return int(t.shape[d]) if isinstance(t, torch.Tensor) and t.dim() > d else -1

    flags = sum(1 << j for j, t in enumerate((markov_w1, temperature, top_k, top_p, min_p)) if t is not None)
    agree(comm, OP, local_error, {
        "vocab_start": vocab_start if isinstance(vocab_start, int) else -1, "V_local": size(base_logits, 2),
        "vocab_size": vocab_size if isinstance(vocab_size, int) else -1, "B": size(base_logits, 0),
        "gamma": size(base_logits, 1), "markov rank": size(markov_w1, 1), "the optional arguments given": flags,
    }, device)
    if draw_seed and comm.world > 1:
        seed = comm.all_gather(seed)[0]
    return _draft(comm, base_logits, anchor.to(torch.int64), markov_w1, markov_w2, temperature, top_k, top_p, min_p,
                  seed, offset, return_logits, vocab_start, vocab_size)


def _draft(comm, base, anchor, w1, w2, temperature, top_k, top_p, min_p, seed, offset, return_logits, vocab_start,
           vocab_size):
    device = base.device
    B, gamma, C = base.shape
    cols, valid = _shard_columns(vocab_start, C, vocab_size, device)
    greedy = torch.ones(B, dtype=torch.bool, device=device) if temperature is None else ~(temperature > 0)
    temp = torch.ones(B, device=device) if temperature is None else torch.where(greedy, 1.0, temperature)
    filtered = top_k is not None or top_p is not None or min_p is not None
    lmp = min_p_log_tensor(min_p) if min_p is not None else None
    w2f = w2.to(torch.float32) if w2 is not None else None
    tokens = torch.zeros(B, gamma, dtype=torch.int64, device=device)
    out = torch.empty((B, gamma, C) if return_logits else (0,), dtype=torch.float32, device=device)
    prev = anchor
    for k in range(gamma):
        logits = base[:, k].to(torch.float32)
        if w1 is not None:
            h = w1[prev].to(torch.float32)
            acc = torch.zeros(B, C, dtype=torch.float32, device=device)
            for i in range(h.shape[1]):  # summed over the rank in order, as reference.markov_correction
                acc = acc + h[:, i:i + 1] * w2f[i]
            logits = logits + acc
        if return_logits:
            out[:, k] = logits
        s = _rows.scale_rows(logits, temp, valid)
        am_value, am_index = _rows.local_argmax(_rows.raw_rows(logits, valid), vocab_start)
        threshold = torch.full((B,), NEG_INF, device=device)
        candidates = []
        if filtered:
            local_max = s.amax(1) if C > 0 else torch.full((B,), NEG_INF, device=device)
            packed = comm.all_gather(torch.stack([_rows.float_bits(local_max), _rows.float_bits(am_value),
                                                  am_index]))
            m = _rows.bits_float(packed[:, 0]).amax(0)
            _, argmax = _rows.merge_argmax(_rows.bits_float(packed[:, 1]), packed[:, 2])
            dist, _ = _rows.row_distribution(comm, s, valid, m, vocab_size, top_k, top_p, lmp)
            threshold = dist.threshold
        else:
            candidates.append(torch.where(cols.unsqueeze(0) == am_index.unsqueeze(1), am_value.unsqueeze(1), NEG_INF)
                              if C > 0 else s)
        noise = _rows.gumbel_noise(seed, offset + k, philox.SALT_DRAFT, cols)
        kept = torch.where(s >= threshold.unsqueeze(1), s, NEG_INF)
        finite_w = torch.where(kept == POS_INF, NEG_INF, kept)
        inf_w = torch.where(kept == POS_INF, 0.0, NEG_INF)
        candidates += [_rows.race_scores(finite_w, noise), _rows.race_scores(inf_w, noise)]
        winners = _rows.gather_winners(comm, candidates, vocab_start)
        if not filtered:
            argmax = winners.pop(0)
        race_w, race_inf = winners
        # A row with +inf kept entries races them alone with weight 0 (sampling.inf_rule).
        sampled = torch.where(race_inf >= 0, race_inf, torch.clamp(race_w, min=0))
        token = torch.where(greedy, torch.clamp(argmax, min=0), sampled)
        tokens[:, k] = token
        prev = token
    return tokens.to(torch.int32), out
