"""vLLM adapters: V1's ``rejection_sample`` / ``RejectionSampler`` and Model Runner
V2's ``rejection_sample``, on ``verify_block``.

Checked against vllm-project/vllm:

* V1: ``vllm/v1/sample/rejection_sampler.py`` at ``7f6fc1c5`` (``VLLM_V1_COMMIT``),
  ``SpecDecodeMetadata`` (``vllm/v1/spec_decode/metadata.py``) and
  ``SamplingMetadata`` (``vllm/v1/sample/metadata.py``) read by field name.
* MRV2: ``vllm/v1/worker/gpu/spec_decode/rejection_sampler_utils.py::rejection_sample``
  at ``98c77cf0`` (``VLLM_MRV2_COMMIT``); the ``use_block_verification`` flag its
  caller passes (``spec_config.rejection_sample_method == "block"``) as in
  ``.../spec_decode/rejection_sampler.py`` at ``01b21056`` (``VLLM_MRV2_BLOCK_COMMIT``).

vLLM is not imported (except, when it is installed, its ``SamplerOutput`` class for
the return value). Same law as vLLM's sampler, not the same random bits: the coins
and races come from our Philox stream keyed by (seed, position), see
docs/integration.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import verification as _verification
from . import _common

VLLM_V1_COMMIT = "7f6fc1c5ce8d02f473b1b923debbfef3fa0b7a6a"
VLLM_MRV2_COMMIT = "98c77cf00c793409c9a52b2a280108e0d47b7f09"
VLLM_MRV2_BLOCK_COMMIT = "01b21056d9ef95ac8c60654181bd868446ffbace"

PLACEHOLDER_TOKEN_ID = -1
GREEDY_TEMPERATURE = 0  # vLLM V1 at VLLM_V1_COMMIT (older versions used -1)
MAX_SPEC_LEN = 128

__all__ = ["rejection_sample", "RejectionSampler", "rejection_sample_mrv2", "SamplerOutput", "LogprobsTensors",
           "PLACEHOLDER_TOKEN_ID", "GREEDY_TEMPERATURE", "MAX_SPEC_LEN"]


def _verify_block(*args, **kwargs):
    # Looked up at call time so that the capability checks below see the current op.
    return _verification.verify_block(*args, **kwargs)


try:  # the engine's own output class when vLLM is installed, a stand-in with its fields otherwise
    from vllm.v1.outputs import SamplerOutput  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not installed"
    @dataclass
    class SamplerOutput:  # type: ignore[no-redef]
        """vLLM V1's ``SamplerOutput`` fields: ``sampled_token_ids [B, max_spec_len + 1]``
        int32, -1 padded; ``logprobs_tensors`` (None: log-probs stay in the engine)."""

        sampled_token_ids: torch.Tensor
        logprobs_tensors: object = None


try:
    from vllm.v1.outputs import LogprobsTensors  # type: ignore
except Exception:  # noqa: BLE001
    class LogprobsTensors(NamedTuple):  # type: ignore[no-redef]
        """vLLM V1's ``LogprobsTensors`` fields: per output token, ``logprob_token_ids [n, 1 + k]``
        int32 (the token, then the top-k ids), ``logprobs [n, 1 + k]`` fp32 and
        ``selected_token_ranks [n]`` (1 + the number of ids with a larger log-prob)."""

        logprob_token_ids: torch.Tensor
        logprobs: torch.Tensor
        selected_token_ranks: torch.Tensor


LOGPROBS_MODES = ("raw_logprobs", "raw_logits")


def _v1_logprobs_tensors(logits: torch.Tensor, out: torch.Tensor, cu: torch.Tensor, num_logprobs: int,
                         mode: str, where: str) -> "LogprobsTensors":
    """vLLM V1's sampled-token log-probs (``RejectionSampler._get_logprobs_tensors`` then
    ``Sampler.gather_logprobs`` at VLLM_V1_COMMIT) for the ``N + B`` row layout: output
    column ``j`` of request ``b`` (every non-placeholder one, in row-major order) comes
    from row ``cu[b] + b + j``; its raw log-softmax (``raw_logprobs``) or raw logits
    (``raw_logits``), the token's value, the top ``num_logprobs`` values and ids, and the
    token's rank ``#{v : lp_v >= lp_token}``. One host sync (the count of outputs), as vLLM's."""
    if mode not in LOGPROBS_MODES:
        raise NotImplementedError(f"{where}: logprobs_mode {mode!r} is not supported (supported: {LOGPROBS_MODES}; "
                                  f"processed modes need the engine's processed logits: compute them in the engine)")
    if isinstance(num_logprobs, bool) or not isinstance(num_logprobs, int) or num_logprobs < 0:
        raise ValueError(f"{where}: sampling_metadata.max_num_logprobs must be an int >= 0, got {num_logprobs!r}")
    batch, width = out.shape
    if num_logprobs > logits.shape[1]:
        raise ValueError(f"{where}: max_num_logprobs = {num_logprobs} exceeds the vocabulary ({logits.shape[1]})")
    first = cu[:-1].to(torch.int64) + torch.arange(batch, device=out.device)
    mask = out != PLACEHOLDER_TOKEN_ID
    rows = (first.unsqueeze(1) + torch.arange(width, device=out.device).unsqueeze(0))[mask]
    tokens = out[mask].to(torch.int64).unsqueeze(1)
    x = logits[rows].to(torch.float32)
    lp = x if mode == "raw_logits" else x.log_softmax(dim=-1)
    top_values, top_ids = torch.topk(lp, num_logprobs, dim=-1)
    token_lp = lp.gather(-1, tokens)
    ranks = (lp >= token_lp).sum(-1)
    return LogprobsTensors(torch.cat([tokens, top_ids], 1).to(torch.int32), torch.cat([token_lp, top_values], 1),
                           ranks)


# ----------------------------------------------------------------------------------------
# V1


def _v1_seed_offset(sampling_metadata, batch: int, device, positions):
    """Per-request (seed, offset) for V1.

    Unseeded requests: a seed drawn on the device (torch's default generator), offset
    ``positions[b]`` or 0. A request with its own ``torch.Generator`` in
    ``sampling_metadata.generators``: seed = ``generator.initial_seed()`` and offset =
    ``positions[b]`` when the caller passes positions (the anchor's absolute position),
    else one int64 drawn from that generator on its device (it advances once per
    call, so a seeded request replays exactly and independently of its batch). Host
    work is a loop over the seeded requests only, with no device read."""
    seed = _common.random_seeds(batch, device)
    if positions is not None:
        offset = positions.reshape(-1).to(device=device, dtype=torch.int64)
    else:
        offset = torch.zeros(batch, dtype=torch.int64, device=device)
    generators = getattr(sampling_metadata, "generators", None) or {}
    if generators:
        idx = sorted(i for i in generators if 0 <= i < batch)
        if idx:
            index = _common.host_to_device(idx, device)
            values = _common.host_to_device([_common.as_int64_bits(generators[i].initial_seed()) for i in idx],
                                            device)
            seed = seed.index_copy(0, index, values)
            if positions is None:
                draws = [torch.randint(0, _common.SEED_HIGH, (1,), dtype=torch.int64, generator=generators[i],
                                       device=generators[i].device).to(device) for i in idx]
                offset = offset.index_copy(0, index, torch.cat(draws))
    return seed, offset


def _v1_min_p(sampling_metadata, batch: int):
    """(min_p [B], needed) from vLLM V1's built-in ``MinPLogitsProcessor`` (found by its
    fields ``min_p_count`` / ``min_p`` in ``sampling_metadata.logitsprocs.all``)."""
    procs = getattr(sampling_metadata, "logitsprocs", None)
    for proc in (getattr(procs, "all", None) or ()) if procs is not None else ():
        if hasattr(proc, "min_p_count") and hasattr(proc, "min_p"):
            if proc.min_p_count:
                return proc.min_p.reshape(-1)[:batch], True
    return None, False


def _v1_check_engine_processing(sampling_metadata, logits_processor, where: str):
    """Penalties, bad words and allowed-token masks are the engine's (they need its
    token histories); without a ``logits_processor`` hook a batch that uses them is an
    error rather than a silently different distribution."""
    if logits_processor is not None:
        return
    uses = []
    if not getattr(sampling_metadata, "no_penalties", True):
        uses.append("penalties (no_penalties=False)")
    if getattr(sampling_metadata, "bad_words_token_ids", None):
        uses.append("bad_words_token_ids")
    if getattr(sampling_metadata, "allowed_token_ids_mask", None) is not None:
        uses.append("allowed_token_ids_mask")
    procs = getattr(sampling_metadata, "logitsprocs", None)
    for proc in (getattr(procs, "all", None) or ()) if procs is not None else ():
        # vLLM's built-in LogitBiasLogitsProcessor / MinTokensLogitsProcessor, by their state fields
        if getattr(proc, "biases", None):
            uses.append("logit_bias")
        if getattr(proc, "min_toks", None):
            uses.append("min_tokens")
    if uses:
        raise NotImplementedError(
            f"{where}: the batch uses {', '.join(uses)}; apply them to the logits in the engine first "
            f"(pass RejectionSampler(logits_processor=...)), dspark_kernels does not reimplement them")


def _v1_sampling_temperature(sampling_metadata, batch, device, probabilities: bool):
    """verify_block's temperature: None when all greedy; for probabilities (already
    tempered) 0 for greedy rows and 1 otherwise; for logits vLLM's temperature as is.
    A greedy row is one with temperature <= 0: GREEDY_TEMPERATURE = 0 at VLLM_V1_COMMIT,
    -1 in older vLLM; both are greedy for verify_block too."""
    if getattr(sampling_metadata, "all_greedy", False) or sampling_metadata.temperature is None:
        return None
    t = sampling_metadata.temperature.reshape(-1)[:batch].to(device=device, dtype=torch.float32)
    if probabilities:
        return (t > 0).to(torch.float32)
    return t


def _put_bonus(out, num_accepted, cu, bonus_token_ids):
    """Where every draft was accepted, the emitted token is vLLM's bonus token."""
    n = (cu[1:] - cu[:-1]).to(torch.int64)
    col = n.unsqueeze(1)
    bonus = bonus_token_ids.reshape(-1).to(out.dtype)
    current = out.gather(1, col).squeeze(1)
    out.scatter_(1, col, torch.where(num_accepted.to(torch.int64) == n, bonus, current).unsqueeze(1))
    return out


def _v1_verify_rows(target_rows, probabilities, draft_token_ids, cu, max_spec_len, draft_probs, bonus_token_ids,
                    sampling_metadata, positions, backend, filters):
    """Verify ``[N, V]`` draft rows (vLLM's layout without bonus rows) with the bonus
    tokens given: the rows go into the ``[N + B, V]`` verify layout (one gather), the
    emitted token of a fully accepted request is replaced by its bonus token."""
    batch = cu.shape[0] - 1
    device = target_rows.device
    rows = _common.rows_with_bonus(target_rows, cu, batch)
    if probabilities:
        rows = _common.log_of_probs(rows, inplace=True)
    seed, offset = _v1_seed_offset(sampling_metadata, batch, device, positions)
    out, num_accepted = _verify_block(
        rows, draft_token_ids, cu, draft_probs=draft_probs,
        temperature=_v1_sampling_temperature(sampling_metadata, batch, device, probabilities),
        seed=seed, offset=offset, max_num_draft=int(max_spec_len), backend=backend, **filters)
    return _put_bonus(out, num_accepted, cu, bonus_token_ids)


def rejection_sample(
    draft_token_ids: torch.Tensor,
    num_draft_tokens: list[int],
    max_spec_len: int,
    cu_num_draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    sampling_metadata,
    *,
    positions: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """vLLM V1's ``rejection_sample`` (VLLM_V1_COMMIT): the same arguments and return.

    Args (vLLM's):
        draft_token_ids: ``[N]`` drafts, requests back to back.
        num_draft_tokens: host list of ``n_b`` (its length is B; not read otherwise).
        max_spec_len: output width - 1.
        cu_num_draft_tokens: ``[B]`` inclusive cumsum of ``n_b``, no leading 0.
        draft_probs: ``[N, V]`` or None (point-mass drafts, what V1's model runner passes).
        target_probs: ``[N, V]`` probabilities of the draft rows, after vLLM's
            processors, temperature and top-k / top-p (``apply_sampling_constraints``).
        bonus_token_ids: ``[B, 1]`` sampled by vLLM's Sampler; emitted when all drafts
            of a request are accepted.
        sampling_metadata: reads ``all_greedy``, ``temperature`` (0 = greedy) and
            ``generators``.
        positions (ours, optional): ``[B]`` each request's absolute position, the
            offset of its random stream (otherwise see docs/integration.md).
        backend (ours): verify_block's backend.

    Returns:
        ``[B, max_spec_len + 1]`` int32: accepted drafts, then the recovered or bonus
        token, then ``PLACEHOLDER_TOKEN_ID`` (-1).

    Example (greedy: draft 1 is row 0's argmax, draft 2 is not row 1's):

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from dspark_kernels.integrations.vllm import rejection_sample
    >>> probs = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    >>> greedy = SimpleNamespace(all_greedy=True, temperature=None, generators={})
    >>> rejection_sample(torch.tensor([1, 2]), [2], 2, torch.tensor([2]), None, probs, torch.tensor([[2]]),
    ...                  greedy).tolist()
    [[1, 0, -1]]

    Cost: vLLM hands over probabilities, our op reads logits: one ``[N + B, V]``
    gather + log of ``target_probs``. ``RejectionSampler.forward`` reads the logits
    in place instead.
    """
    cu = _common.exclusive_offsets(cu_num_draft_tokens)
    if cu.shape[0] - 1 != len(num_draft_tokens):
        raise ValueError(f"rejection_sample: cu_num_draft_tokens has {cu.shape[0] - 1} entries, "
                         f"num_draft_tokens {len(num_draft_tokens)}")
    return _v1_verify_rows(target_probs, True, draft_token_ids, cu, max_spec_len, draft_probs, bonus_token_ids,
                           sampling_metadata, positions, backend, {})


class RejectionSampler(torch.nn.Module):
    """vLLM V1's ``RejectionSampler`` (VLLM_V1_COMMIT): ``forward(metadata, draft_probs,
    logits, sampling_metadata) -> SamplerOutput``.

    ``metadata`` is vLLM's ``SpecDecodeMetadata`` (``draft_token_ids``,
    ``num_draft_tokens``, ``cu_num_draft_tokens``, ``max_spec_len``,
    ``bonus_logits_indices``), ``sampling_metadata`` its ``SamplingMetadata``
    (``all_greedy``, ``temperature``, ``top_k``, ``top_p``, ``generators``,
    ``max_num_logprobs``, ``logitsprocs`` for min-p, and the penalty / bad-word /
    allowed-token fields), both read by field name.

    * ``logits`` with ``N + B`` rows (what V1's model runner passes: per request its
      draft rows, then its bonus row): verified in place by one ``verify_block`` call,
      temperature, top-k, top-p (and min-p) applied inside the kernel, the bonus token
      drawn by the kernel from the request's own stream. No ``[N, V]`` copy.
    * ``logits`` with ``N`` rows (``bonus_logits_indices`` empty, as in vLLM's own
      unit tests): the bonus tokens come from ``sampler`` exactly as in vLLM.

    Args:
        sampler: vLLM's ``Sampler`` (only used in the N-row case).
        logits_processor: ``f(logits, sampling_metadata, metadata) -> logits`` applying
            the engine-side processors (penalties, bad words, allowed ids) to every row;
            without it a batch using them is an error.
        backend: verify_block's backend.
        logprobs_mode: vLLM's ``logprobs_mode`` (default: ``sampler.logprobs_mode``, else
            ``"raw_logprobs"``). With ``sampling_metadata.max_num_logprobs = k`` set, the
            output's ``logprobs_tensors`` are vLLM's: for every output token, its log-prob
            under the raw row it was verified at (``raw_logprobs``; ``raw_logits``: the raw
            logit), the top-k, and its rank (one host sync, as in vLLM).
    """

    def __init__(self, sampler=None, *, logits_processor=None, backend: str | None = None,
                 logprobs_mode: str | None = None):
        super().__init__()
        self.sampler = sampler
        # vLLM's Sampler.logprobs_mode (its default "raw_logprobs" without a sampler)
        self.logprobs_mode = logprobs_mode or getattr(sampler, "logprobs_mode", None) or "raw_logprobs"
        self.logits_processor = logits_processor
        self.backend = backend

    def forward(self, metadata, draft_probs: torch.Tensor | None, logits: torch.Tensor, sampling_metadata, *,
                positions: torch.Tensor | None = None):
        where = "RejectionSampler.forward"
        if int(metadata.max_spec_len) > MAX_SPEC_LEN:
            raise ValueError(f"{where}: max_spec_len = {metadata.max_spec_len} > MAX_SPEC_LEN = {MAX_SPEC_LEN}")
        num_logprobs = getattr(sampling_metadata, "max_num_logprobs", None)
        _v1_check_engine_processing(sampling_metadata, self.logits_processor, where)
        raw_logits = logits
        if self.logits_processor is not None:
            logits = self.logits_processor(logits, sampling_metadata, metadata)
        draft_token_ids = metadata.draft_token_ids
        batch = len(metadata.num_draft_tokens)
        num_draft = draft_token_ids.shape[0]
        cu = _common.exclusive_offsets(metadata.cu_num_draft_tokens)
        device = logits.device
        min_p, needs_min_p = _v1_min_p(sampling_metadata, batch)
        filters = dict(top_k=_slice(sampling_metadata.top_k, batch), top_p=_slice(sampling_metadata.top_p, batch))
        filters.update(_common.min_p_kwargs(min_p, needs_min_p))
        if logits.shape[0] == num_draft + batch:
            seed, offset = _v1_seed_offset(sampling_metadata, batch, device, positions)
            out, _ = _verify_block(
                logits, draft_token_ids, cu, draft_probs=draft_probs,
                temperature=_v1_sampling_temperature(sampling_metadata, batch, device, False),
                seed=seed, offset=offset, max_num_draft=int(metadata.max_spec_len), backend=self.backend, **filters)
        elif logits.shape[0] == num_draft:
            if num_logprobs is not None:
                raise NotImplementedError(f"{where}: sampling_metadata.max_num_logprobs with N-row logits (no bonus "
                                          f"rows): the bonus tokens' log-probs belong to the sampler; pass the N + B "
                                          f"rows")
            if self.sampler is None:
                raise ValueError(f"{where}: logits has N = {num_draft} rows (no bonus rows): the bonus tokens "
                                 f"come from the sampler, pass RejectionSampler(sampler)")
            bonus_logits = logits[metadata.bonus_logits_indices]
            bonus = self.sampler(logits=bonus_logits, sampling_metadata=sampling_metadata,
                                 predict_bonus_token=True).sampled_token_ids
            out = _v1_verify_rows(logits, False, draft_token_ids, cu, metadata.max_spec_len, draft_probs, bonus,
                                  sampling_metadata, positions, self.backend, filters)
        else:
            raise ValueError(f"{where}: logits must have N + B = {num_draft + batch} rows (drafts then the bonus "
                             f"row of every request) or N = {num_draft}, got {logits.shape[0]}")
        logprobs_tensors = None
        if num_logprobs is not None:
            logprobs_tensors = _v1_logprobs_tensors(raw_logits, out, cu, num_logprobs, self.logprobs_mode, where)
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs_tensors)

    @staticmethod
    def parse_output(output_token_ids: torch.Tensor, vocab_size: int) -> list[list[int]]:
        """vLLM's host-side unpacking (one device read, as in vLLM): the valid tokens of
        every row."""
        rows = output_token_ids.cpu().tolist()
        return [[t for t in row if t != PLACEHOLDER_TOKEN_ID and t < vocab_size] for row in rows]


def _slice(t, batch):
    return None if t is None else t.reshape(-1)[:batch]


# ----------------------------------------------------------------------------------------
# Model Runner V2


def rejection_sample_mrv2(
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor | None,
    draft_sampled: torch.Tensor,
    cu_num_logits: torch.Tensor,
    pos: torch.Tensor,
    idx_mapping: torch.Tensor,
    expanded_idx_mapping: torch.Tensor,
    expanded_local_pos: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    num_speculative_steps: int,
    synthetic_conditional_rates: torch.Tensor | None = None,
    use_fp64: bool = False,
    use_block_verification: bool = False,
    *,
    rejection_sample_method: str | None = None,
    contexts: torch.Tensor | None = None,
    watermarking: torch.Tensor | None = None,
    watermarking_skip_mask: torch.Tensor | None = None,
    watermark_key: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model Runner V2's ``rejection_sample`` (VLLM_MRV2_COMMIT, plus the
    ``use_block_verification`` flag of VLLM_MRV2_BLOCK_COMMIT): the same arguments and
    the same ``(sampled, num_sampled)``.

    Args (vLLM's):
        target_logits: ``[L, V]``, ``L = N + R``, after ``apply_sampling_params``
            (penalties, temperature, top-k / top-p, min-p are already applied: the kernel
            only verifies). Request r's rows ``cu_num_logits[r] ..`` are its drafts' rows,
            then its bonus row, i.e. our layout.
        draft_logits: ``[max_num_reqs, K, V]`` per request *slot* or None (point-mass
            drafts); q of draft j of request r is ``softmax(draft_logits[idx_mapping[r], j])``
            (read in place through ``draft_index`` when verify_block has it).
        draft_sampled: ``[L]`` = ``input_ids[logits_indices]``; logit row i verifies
            ``draft_sampled[i + 1]``.
        cu_num_logits: ``[R + 1]`` exclusive offsets of the logit rows.
        pos: ``[L]`` absolute positions; the stream offset of request r is its first row's.
        idx_mapping: ``[R]`` request -> slot; temperature / seed are per slot.
        expanded_idx_mapping, expanded_local_pos: accepted, not needed.
        temperature: ``[max_num_reqs]``, 0 = greedy (only that fact is used: the logits
            are already tempered).
        seed: ``[max_num_reqs]`` int64.
        num_speculative_steps: K, the output width - 1.
        synthetic_conditional_rates: vLLM's synthetic acceptance (benchmarking, not
            lossless): an error.
        use_fp64: accepted and ignored (our Gumbel race is exact in its own arithmetic).
        use_block_verification / rejection_sample_method="block": ``method="block"``.
        contexts, watermarking, watermarking_skip_mask, watermark_key: what newer MRV2
            callers pass when watermarking is on (VLLM_MRV2_BLOCK_COMMIT); watermarked
            sampling is not ours: an error unless all are None.

    Example (one greedy request, drafts [1, 0], both the argmax; the bonus row's argmax is 2):

    >>> import torch
    >>> from dspark_kernels.integrations.vllm import rejection_sample_mrv2
    >>> logits = torch.tensor([[0., 5., 0.], [5., 0., 0.], [0., 0., 5.]])
    >>> sampled, num_sampled = rejection_sample_mrv2(
    ...     logits, None, torch.tensor([2, 1, 0]), torch.tensor([0, 3]), torch.tensor([10, 11, 12]),
    ...     torch.tensor([0]), torch.zeros(3, dtype=torch.int32), torch.arange(3), torch.zeros(1),
    ...     torch.zeros(1, dtype=torch.int64), 2)
    >>> sampled.tolist(), num_sampled.tolist()
    ([[1, 0, 2]], [3])

    Returns:
        ``sampled [R, K + 1]`` int64 (the first ``num_sampled[r]`` entries are valid;
        the rest are -1) and ``num_sampled [R]`` int32 = accepted drafts + 1.
    """
    where = "rejection_sample_mrv2"
    if synthetic_conditional_rates is not None or rejection_sample_method == "synthetic":
        raise NotImplementedError(f"{where}: synthetic acceptance rates are vLLM's benchmarking mode, not a "
                                  f"verification; use vLLM's kernel for it")
    if any(x is not None for x in (contexts, watermarking, watermarking_skip_mask, watermark_key)):
        raise NotImplementedError(f"{where}: watermarked sampling (contexts / watermarking / watermark_key) is "
                                  f"vLLM's own; use vLLM's kernel for watermarked requests")
    if rejection_sample_method not in (None, "default", "standard", "block"):
        raise ValueError(f"{where}: rejection_sample_method must be None, 'default' or 'block', got "
                         f"{rejection_sample_method!r}")
    method = "block" if (use_block_verification or rejection_sample_method == "block") else "token"
    batch = cu_num_logits.shape[0] - 1
    num_logits = target_logits.shape[0]
    num_draft = num_logits - batch
    device = target_logits.device
    cu_logits = cu_num_logits.to(torch.int64)
    cu = cu_logits - torch.arange(batch + 1, device=device, dtype=torch.int64)
    req = _common.request_of(cu, num_draft)                      # request of every draft
    draft_tokens = draft_sampled.index_select(0, torch.arange(num_draft, device=device) + req + 1)
    slot = idx_mapping.to(torch.int64)
    greedy = temperature.index_select(0, slot) == 0
    temp = torch.where(greedy, torch.zeros((), device=device), torch.ones((), device=device)).float()
    kwargs = {}
    logits = target_logits
    if draft_logits is not None:
        steps, vocab = draft_logits.shape[1], draft_logits.shape[2]
        if vocab < logits.shape[1]:  # a target vocabulary padded past the drafter's (vLLM does the same)
            logits = logits[:, :vocab]
        local = torch.arange(num_draft, device=device) - cu.index_select(0, req)
        index = slot.index_select(0, req) * steps + local
        try:  # the per-slot draft logits read in place: q of draft i is row index[i]
            kwargs = {"draft_logits": draft_logits.view(-1, vocab), "draft_index": index}
        except RuntimeError:  # slots not [K, V]-contiguous (a view of a larger buffer): one gather
            kwargs = {"draft_logits": draft_logits[slot.index_select(0, req), local]}
    out, num_accepted = _verify_block(
        logits, draft_tokens, cu, temperature=temp, seed=seed.index_select(0, slot).to(torch.int64),
        offset=pos.index_select(0, cu_logits[:-1]).to(torch.int64), max_num_draft=int(num_speculative_steps),
        method=method, backend=backend, **kwargs)
    return out.to(torch.int64), (num_accepted + 1).to(torch.int32)
