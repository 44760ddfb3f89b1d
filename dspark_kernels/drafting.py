"""Drafting ops: ``schedule_verify_lens`` (DSpark's prefix scheduler) and
``draft_sample_block`` (block-parallel drafting with the DSpark Markov head).

Public functions (defaults, docstrings) and the ops' declarations (``OpSpec``):
docs/drafting.md.
"""

from __future__ import annotations

import torch

from . import _registry
from ._validation import (
    _FLOAT_DTYPES,
    _INT_DTYPES,
    _check_min_p,
    _check_sampling_tensors,
    _check_tensor,
    _default_seed_offset,
    _fail,
    _per_request_sampling,
)

# R * gamma candidates are indexed in 32 bits and their fixed-point survival sums must
# stay below 2^63 (csrc/drafting.h).
MAX_SCHEDULE_CANDIDATES = 1 << 22


# ------------------------------------------------------------------------------------
# schedule_verify_lens
# ------------------------------------------------------------------------------------


def schedule_verify_lens(
    confidence: torch.Tensor,
    sps: torch.Tensor,
    *,
    early_stop: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""How many drafts of each request to verify: DSpark's Algorithm 1 on the device.

    With ``R`` requests, ``gamma`` drafts each and per-draft confidences ``c[r, j]``
    (the drafter's estimate that draft ``j`` is accepted given the ones before it)::

        a[r, j]  = c[r, 0] * c[r, 1] * ... * c[r, j]          survival (fp32, c clamped to [0, 1])
        order    = all (r, j) by a descending, then r, then j ascending
        B_k      = R + k                                      tokens verified with the first k admitted
        tau_k    = R + a_(1) + ... + a_(k)                    expected tokens per step
        Theta_k  = tau_k * SPS(B_k)                           expected tokens per second

    ``k = 0`` verifies no draft (``Theta_0 = R * SPS(R)``); ``k`` never exceeds
    ``min(R * gamma, Bmax - R)`` with ``Bmax = len(sps) - 1``. Lossless mode
    (``early_stop=True``) admits candidates in order while each one strictly
    improves Theta and stops at the first that does not; async mode
    (``early_stop=False``, for confidences two steps old) takes the ``k`` with the
    largest Theta over the whole range (the smallest such ``k`` on ties). Because
    survival never increases along a block and ties go to the smaller ``j``, the
    admitted candidates are always a prefix of each request's block.

    Determinism: survival is an fp32 running product; ``tau`` is summed exactly in
    fixed point (each survival counts as ``floor(a * 2^40) / 2^40``), Theta is fp64,
    so every backend returns the same integers, whatever order it sums in. The GPU
    kernels never synchronise with the host (CUDA-graph safe).

    Args:
        confidence: ``[R, gamma]`` floating tensor (any strides); NaN counts as 0,
            values outside ``[0, 1]`` are clamped.
        sps: ``[Bmax + 1]`` floating tensor, ``sps[B]`` = verify steps per second at a
            verify batch of ``B`` tokens (profiled). Needs ``Bmax >= R``; entries below
            ``R`` are not read. A NaN entry never improves Theta.
        early_stop: lossless (True) or async (False) search.
        backend: "reference" | "cpu" | "triton" | "cuda" | "nvrtc" | None.

    Returns:
        ``verify_lens [R]`` int32 (in ``[0, gamma]``) and ``cu_verify [R + 1]`` int32
        ``= [0, cumsum(verify_lens)]``, which is verify_block's ``cu_num_draft``.

    Example:

    >>> import torch, dspark_kernels as dk
    >>> conf = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.1, 0.1]])
    >>> sps = 100.0 / (1 + 0.05 * torch.arange(9.0))   # verify steps/s falls slowly with the batch
    >>> lens, cu = dk.schedule_verify_lens(conf, sps)
    >>> lens.tolist(), cu.tolist()
    ([2, 1], [0, 2, 3])
    """
    return _registry.dispatch(SCHEDULE_VERIFY_LENS, backend, confidence, sps, bool(early_stop))


def _check_schedule_verify_lens(confidence, sps, early_stop):
    op = "schedule_verify_lens"
    _check_tensor(op, "confidence", confidence, dim=2)
    if not confidence.dtype.is_floating_point:
        _fail(op, f"confidence must be a floating tensor, got {confidence.dtype}")
    device = confidence.device
    _check_tensor(op, "sps", sps, dim=1, device=device)
    if not sps.dtype.is_floating_point:
        _fail(op, f"sps must be a floating tensor, got {sps.dtype}")
    num_req, gamma = confidence.shape
    if sps.shape[0] < num_req + 1:
        _fail(op, f"sps must have Bmax + 1 >= R + 1 = {num_req + 1} entries (SPS(R) is the rate without "
                  f"speculation), got shape {tuple(sps.shape)}")
    if num_req * gamma > MAX_SCHEDULE_CANDIDATES:
        _fail(op, f"R * gamma = {num_req * gamma} candidates is more than the supported {MAX_SCHEDULE_CANDIDATES} "
                  f"(confidence shape {tuple(confidence.shape)})")
    if not isinstance(early_stop, bool):
        _fail(op, f"early_stop must be a bool, got {type(early_stop).__name__}")


def _schedule_verify_lens_fake(confidence, sps, early_stop):
    num_req = confidence.shape[0]
    return (confidence.new_empty((num_req,), dtype=torch.int32),
            confidence.new_empty((num_req + 1,), dtype=torch.int32))


# ------------------------------------------------------------------------------------
# draft_sample_block
# ------------------------------------------------------------------------------------


def draft_sample_block(
    base_logits: torch.Tensor,
    anchor: torch.Tensor,
    *,
    markov_w1: torch.Tensor | None = None,
    markov_w2: torch.Tensor | None = None,
    temperature: torch.Tensor | float | None = None,
    top_k: torch.Tensor | int | None = None,
    top_p: torch.Tensor | float | None = None,
    seed: torch.Tensor | int | None = None,
    offset: torch.Tensor | int | None = None,
    return_logits: bool = True,
    min_p: torch.Tensor | float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Sample a block of ``gamma`` draft tokens per request (DFlash / DSpark drafting).

    Position ``k`` of request ``b`` samples ``x_k`` from the logits ::

        l_k = base_logits[b, k]                                   without the Markov head
        l_k = base_logits[b, k] + markov_w1[x_{k-1}] @ markov_w2   with it (x_{-1} = anchor[b])

    so without the Markov weights all positions are independent and sampled at
    once; with them they are sampled left to right, one step per position.
    Sampling rows (``T_b = temperature[b] > 0``) draw ``x_k`` from
    ``F(softmax(l_k / T_b))`` where F is the min-p / top-k / top-p filter of verify_block
    (same rules and order: min-p keeps ``s >= max s + log(min_p)``, top-k keeps ``s >= `` the k-th largest scaled logit, top-p then keeps
    the tokens whose strictly-larger kept mass is ``< top_p``). The draw is the Gumbel
    race ``argmax_v (s_v + G_v)`` over the kept tokens, ``s = l_k / T_b`` (an IEEE
    division), ``G_v`` from the *draft* Philox stream at position ``offset[b] + k``
    and index ``v`` (never the streams verify_block uses, so drafting and
    verification noise are independent). ``s`` is not normalised: subtracting the
    log-sum-exp would shift every score alike and cannot change the winner.
    Greedy rows (``T_b <= 0`` or ``temperature=None``) take the argmax of ``l_k``
    (lowest index on ties). A row with no finite score gives token 0.

    The returned ``draft_logits`` are the fp32 ``l_k`` that were sampled from (before
    temperature), exactly what ``verify_block(draft_logits=...)`` needs with the same
    ``temperature`` / ``top_k`` / ``top_p`` / ``min_p`` for draft -> verify to be lossless.

    The Markov correction is an fp32 dot product over ``r`` (the weights may be
    fp16 / bf16: products are exact in fp32). The reference and the CPU kernel sum
    over ``i = 0 .. r-1`` in order; GPU kernels sum in the order of their matrix
    instructions, so GPU logits agree to fp32 rounding and tokens agree except
    where two race scores are that close.

    Args:
        base_logits: ``[B, gamma, V]`` float32 / float16 / bfloat16, any strides.
        anchor: ``[B]`` int32 / int64, the token before the block (``x_{-1}``), in ``[0, V)``.
        markov_w1: ``[V, r]`` and markov_w2: ``[r, V]``, both or neither, same float dtype.
        temperature, top_k, top_p: ``[B]`` tensors or scalars for every request.
        min_p: ``[B]`` tensor or scalar, optional (``<= 0``: off).
        seed, offset: ``[B]`` int64 tensors or Python ints (``seed=None``: from torch's
            generator of the device; ``offset=None``: 0).
        return_logits: return the sampled-from logits (else an empty ``[0]`` tensor).
        backend: "reference" | "cpu" | "triton" | "cuda" | "nvrtc" | None.

    Returns:
        ``draft_tokens [B, gamma]`` int32 and ``draft_logits [B, gamma, V]`` float32
        (or ``[0]`` float32 when ``return_logits=False``).

    Example:

    >>> import torch, dspark_kernels as dk
    >>> base = torch.zeros(1, 3, 4)
    >>> base[0, :, 1] = 5.0
    >>> tokens, logits = dk.draft_sample_block(base, torch.tensor([0]))   # greedy: no temperature
    >>> tokens.tolist(), tuple(logits.shape)
    ([[1, 1, 1]], (1, 3, 4))
    >>> t = torch.tensor([1.0])                                           # sampled, reproducible from the seed
    >>> torch.equal(dk.draft_sample_block(base, torch.tensor([0]), temperature=t, seed=7)[0],
    ...             dk.draft_sample_block(base, torch.tensor([0]), temperature=t, seed=7, backend="reference")[0])
    True
    >>> base[0, :, 2] = 4.0   # p(2) / p(1) = e^-1 < 0.5: min_p = 0.5 leaves token 1 alone
    >>> dk.draft_sample_block(base, torch.tensor([0]), temperature=t, min_p=0.5, seed=3)[0].tolist()
    [[1, 1, 1]]
    """
    op = "draft_sample_block"
    _check_tensor(op, "base_logits", base_logits, dim=3, dtypes=_FLOAT_DTYPES)
    device = base_logits.device
    batch = base_logits.shape[0]
    temperature, top_k, top_p, min_p = _per_request_sampling(
        op, temperature, top_k, top_p, min_p, batch, device)
    seed, offset = _default_seed_offset(op, seed, offset, batch, device)
    return _registry.dispatch(DRAFT_SAMPLE_BLOCK, backend, base_logits, anchor, markov_w1, markov_w2, temperature,
                              top_k, top_p, seed, offset, bool(return_logits), min_p)


def _check_draft_sample_block(base_logits, anchor, markov_w1, markov_w2, temperature, top_k, top_p, seed, offset,
                              return_logits, min_p=None):
    """Shape / dtype / device checks (the C++ CPU kernel runs the same ones itself)."""
    op = "draft_sample_block"
    _check_tensor(op, "base_logits", base_logits, dim=3, dtypes=_FLOAT_DTYPES)
    device = base_logits.device
    batch, gamma, vocab = base_logits.shape
    if vocab < 1:
        _fail(op, f"base_logits must have a vocabulary of at least 1, got shape {tuple(base_logits.shape)}")
    if vocab > 2**31 - 1:
        _fail(op, f"vocabulary too large ({vocab} > 2^31 - 1)")
    _check_tensor(op, "anchor", anchor, dim=1, shape=(batch,), dtypes=_INT_DTYPES, device=device)
    if (markov_w1 is None) != (markov_w2 is None):
        _fail(op, f"give both markov_w1 and markov_w2 or neither, got markov_w1 "
                  f"{'set' if markov_w1 is not None else 'None'} and markov_w2 "
                  f"{'set' if markov_w2 is not None else 'None'}")
    if markov_w1 is not None:
        _check_tensor(op, "markov_w1", markov_w1, dim=2, dtypes=_FLOAT_DTYPES, device=device)
        rank = markov_w1.shape[1]
        if markov_w1.shape[0] != vocab or rank < 1:
            _fail(op, f"markov_w1 must have shape [V, r] = [{vocab}, r >= 1], got {tuple(markov_w1.shape)}")
        _check_tensor(op, "markov_w2", markov_w2, dim=2, shape=(rank, vocab), dtypes=_FLOAT_DTYPES, device=device)
        if markov_w2.dtype != markov_w1.dtype:
            _fail(op, f"markov_w2 must have markov_w1's dtype {markov_w1.dtype}, got {markov_w2.dtype}")
    _check_sampling_tensors(op, batch, device, temperature, top_k, top_p, seed, offset)
    _check_min_p(op, min_p, batch, device)
    if not isinstance(return_logits, bool):
        _fail(op, f"return_logits must be a bool, got {type(return_logits).__name__}")


def _check_draft_sample_block_data(base_logits, anchor, markov_w1, *rest):
    if markov_w1 is not None:
        _check_anchor(anchor, base_logits.shape[2])


def _check_anchor(anchor: torch.Tensor, vocab: int) -> None:
    """Data-dependent check (host read): CPU always, CUDA under DSPARK_DEBUG=1."""
    a = anchor.cpu()
    bad = (a < 0) | (a >= vocab)
    if bad.any():
        b = int(torch.nonzero(bad)[0])
        _fail("draft_sample_block", f"anchor[{b}] = {int(a[b])} is outside [0, V) with V = {vocab}")


def _draft_sample_block_fake(base_logits, anchor, markov_w1, markov_w2, temperature, top_k, top_p, seed, offset,
                             return_logits, min_p=None):
    batch, gamma, vocab = base_logits.shape
    tokens = base_logits.new_empty((batch, gamma), dtype=torch.int32)
    logits = base_logits.new_empty((batch, gamma, vocab) if return_logits else (0,), dtype=torch.float32)
    return tokens, logits


SCHEDULE_VERIFY_LENS = _registry.declare(_registry.OpSpec(
    schema="schedule_verify_lens(Tensor confidence, Tensor sps, bool early_stop=True) "
           "-> (Tensor verify_lens, Tensor cu_verify)",
    fake=_schedule_verify_lens_fake,
    reference=".reference.schedule_verify_lens:schedule_verify_lens",
    triton=".triton.schedule_verify_lens:schedule_verify_lens",
    nvrtc=".nvrtc.ops:schedule_verify_lens",
    check=_check_schedule_verify_lens,
    cpp=frozenset({"CPU", "CUDA"}),
))

DRAFT_SAMPLE_BLOCK = _registry.declare(_registry.OpSpec(
    schema="draft_sample_block(Tensor base_logits, Tensor anchor, *, Tensor? markov_w1=None, "
           "Tensor? markov_w2=None, Tensor? temperature=None, Tensor? top_k=None, Tensor? top_p=None, "
           "Tensor seed, Tensor offset, bool return_logits=True, Tensor? min_p=None) "
           "-> (Tensor draft_tokens, Tensor draft_logits)",
    fake=_draft_sample_block_fake,
    reference=".reference.draft_sample_block:draft_sample_block",
    triton=".triton.draft_sample_block:draft_sample_block",
    check=_check_draft_sample_block,
    check_data=_check_draft_sample_block_data,
    cpp=frozenset({"CPU"}),  # Triton is the GPU backend
))
