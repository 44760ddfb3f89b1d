"""Verification: ``verify_block``, batched lossless acceptance of ragged draft blocks.

The public function normalises its arguments (scalars to per-request tensors,
default seeds and offsets, ``max_num_draft``) and ends in the op's single dispatch
path; the op is declared once, by ``VERIFY_BLOCK`` below.
"""

from __future__ import annotations

import torch

from . import _registry
from ._validation import (
    _FLOAT_DTYPES,
    _INT_DTYPES,
    _check_draft_ids,
    _check_draft_index,
    _check_draft_index_data,
    _check_min_p,
    _check_offsets,
    _check_sampling_tensors,
    _check_tensor,
    _default_seed_offset,
    _fail,
    _per_request_sampling,
)


def verify_block(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    *,
    draft_logits: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature: torch.Tensor | float | None = None,
    top_k: torch.Tensor | int | None = None,
    top_p: torch.Tensor | float | None = None,
    seed: torch.Tensor | int | None = None,
    offset: torch.Tensor | int | None = None,
    max_num_draft: int | None = None,
    method: str = "token",
    min_p: torch.Tensor | float | None = None,
    draft_index: torch.Tensor | None = None,
    return_logprobs: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, ...]:
    r"""Lossless batched verification of ragged draft blocks (speculative sampling).

    Request ``b`` proposed ``n_b = cu_num_draft[b+1] - cu_num_draft[b]`` tokens
    ``x_{b,i} = draft_tokens[cu[b] + i]``; its target rows are
    ``target_logits[cu[b] + b + i]`` for ``i = 0..n_b`` (the last is the bonus row),
    so ``T = N + B``.

    Distributions, with ``T_b = temperature[b]`` and the row's top-k / top-p filter F::

        p_i = F(softmax(target_logits_i / T_b))
        q_i = F(softmax(draft_logits_i / T_b))    if draft_logits is given
            = draft_probs_i                        if draft_probs is given (used as is)
            = one_hot(x_i)                         otherwise (point-mass draft)

    Sampling rows (``T_b > 0``): draft ``i`` is accepted iff
    ``log u_i < log p_i(x_i) - log q_i(x_i)`` (``u_i`` from the accept stream), never
    when ``p_i(x_i) = 0``, ``q_i(x_i)`` is not a finite positive number, or ``x_i`` is
    ``-1`` / ``>= V``. At the first rejection the emitted token is drawn from
    ``norm(max(p_i - q_i, 0))`` (from ``p_i`` if that has no mass, ``x_i`` is padding
    or ``q_i(x_i)`` is unusable); if all are accepted, a bonus token is drawn from
    ``p_{n_b}``. Draws are Gumbel races on the resample stream. Greedy rows
    (``T_b <= 0`` or ``temperature=None``): accept while ``x_i == argmax target_i``,
    then emit the argmax (ties: lowest index).

    Filters, in vLLM's order (temperature, min-p, top-k, top-p): min-p keeps tokens with
    ``p >= min_p * max p``, i.e. scaled logit ``s >= max s + log(min_p)`` (``min_p <= 0``:
    off; ``>= 1``: only the maximal tokens); top-k keeps tokens with ``s >=`` the k-th
    largest (``k <= 0`` or ``>= V``: off); top-p then keeps token v iff the mass of kept
    tokens with a strictly larger logit is ``< top_p`` (``top_p >= 1``: off). The same
    filters make q from ``draft_logits``.

    Non-finite input (docs/verification.md): NaN logits count as -inf; an infinite
    logit stays infinite when scaled (an overflowing ``l / T`` is infinite); a row whose
    max is +inf puts equal mass on its +inf entries and none elsewhere.

    Randomness: Philox4x32-10 keyed by ``seed[b]`` at position ``offset[b] + i``
    (see the README): identical on every backend, independent of batch
    composition, and CUDA-graph safe. ``seed=None`` draws seeds from torch's
    default generator of the device, ``offset=None`` is 0.

    Args:
        target_logits: ``[N + B, V]`` float32 / float16 / bfloat16; rows may be strided.
        draft_tokens: ``[N]`` int32 / int64, ``-1`` = padding (always rejected).
        cu_num_draft: ``[B + 1]`` int32 / int64 offsets, ``cu[0] = 0``, ``cu[B] = N``.
        draft_logits / draft_probs: ``[N, V]`` (at most one of them); ``[R, V]`` for any R
            with ``draft_index``.
        temperature, top_k, top_p, min_p: ``[B]`` tensors or scalars for every request.
        seed, offset: ``[B]`` int64 tensors or Python ints.
        draft_index: ``[N]`` int32 / int64, optional: q of draft i is row ``draft_index[i]``
            of draft_logits / draft_probs (e.g. Model Runner V2's per-slot draft logits,
            read in place); entries in ``[0, R)``.
        return_logprobs: also return ``logprobs [B, max_num_draft + 1]`` float32: for each
            output token, ``log p(token)`` under the filtered target distribution of its
            row (:func:`token_logprobs`), ``-inf`` on the padding.
        max_num_draft: output width - 1, ``>= max n_b``; None reads it from
            ``cu_num_draft`` (one host read: pass it under CUDA graphs / torch.compile).
        backend: "reference" | "cpu" | "triton" | "cuda" | "nvrtc" | None.
        method: ``"token"`` (the rule above, token by token) or ``"block"`` (block
            verification, Sun et al. 2024: the same sampling law, a longer expected
            accepted length; greedy rows unchanged). See docs/verification.md.

    Returns:
        ``output_tokens [B, max_num_draft + 1]`` int32 (accepted drafts, then the
        emitted token, then -1) and ``num_accepted [B]`` int32; with
        ``return_logprobs=True`` also ``logprobs``.

    Example:

    >>> import torch, dspark_kernels as dk
    >>> logits = torch.full((3, 5), -10.0)
    >>> logits[0, 2] = logits[1, 4] = logits[2, 1] = 10.0
    >>> # one greedy request drafting [2, 3]: 2 is row 0's argmax (accepted), 3 is not row 1's (4 is emitted)
    >>> out, n = dk.verify_block(logits, torch.tensor([2, 3]), torch.tensor([0, 2]), max_num_draft=2)
    >>> out.tolist(), n.tolist()
    ([[2, 4, -1]], [1])
    >>> out, n, lp = dk.verify_block(logits, torch.tensor([2, 3]), torch.tensor([0, 2]), max_num_draft=2,
    ...                              return_logprobs=True)
    >>> lp.tolist()   # log p of 2 (row 0) and 4 (row 1): -log(1 + 4 e^-20), 0 in fp32; then padding
    [[0.0, 0.0, -inf]]
    """
    op = "verify_block"
    _check_method(method)
    _check_tensor(op, "target_logits", target_logits, dim=2, dtypes=_FLOAT_DTYPES)
    _check_tensor(op, "cu_num_draft", cu_num_draft, dim=1, dtypes=_INT_DTYPES, device=target_logits.device)
    device = target_logits.device
    batch = max(cu_num_draft.shape[0] - 1, 0)
    temperature, top_k, top_p, min_p = _per_request_sampling(
        op, temperature, top_k, top_p, min_p, batch, device)
    seed, offset = _default_seed_offset(op, seed, offset, batch, device)
    _check_return_logprobs(op, return_logprobs)
    if max_num_draft is None:  # one host read; valid offsets first (a wild one must not size the output)
        _check_tensor(op, "draft_tokens", draft_tokens, dim=1, dtypes=_INT_DTYPES)
        n = _check_offsets(op, "cu_num_draft", cu_num_draft, draft_tokens.shape[0], "draft_tokens.size(0)")
        max_num_draft = int(n.max()) if batch > 0 else 0
    out, num_accepted = _registry.dispatch(VERIFY_BLOCK, backend, target_logits, draft_tokens, cu_num_draft,
                                           draft_logits, draft_probs, temperature, top_k, top_p, seed, offset,
                                           max_num_draft, method, min_p, draft_index)
    if not return_logprobs:
        return out, num_accepted
    # Output column j of request b came from target row cu[b] + b + j (j <= num_accepted).
    cols = torch.arange(max_num_draft + 1, device=device)
    first = (cu_num_draft[:-1].to(torch.int64) + torch.arange(batch, device=device)).unsqueeze(1)
    rows = torch.where(cols.unsqueeze(0) <= num_accepted.unsqueeze(1), first + cols, -1)
    lp = token_logprobs(target_logits, out, rows, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        backend=backend)
    return out, num_accepted, lp


def _check_return_logprobs(op, return_logprobs) -> None:
    if not isinstance(return_logprobs, bool):
        _fail(op, f"return_logprobs must be a bool, got {type(return_logprobs).__name__}")


VERIFY_METHODS = ("token", "block")


def _check_method(method) -> None:
    if not isinstance(method, str) or method not in VERIFY_METHODS:
        _fail("verify_block", f"method must be one of {VERIFY_METHODS}, got {method!r}")


def _check_verify_layout(op, target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, temperature,
                         top_k, top_p, seed, offset, width, width_name, min_p=None, draft_index=None):
    """The checks verify_block and verify_tree share: the ragged layout (T = N + B target
    rows), q, the sampling tensors, and the output width ``width + 1`` (int32 columns)."""
    _check_tensor(op, "target_logits", target_logits, dim=2, dtypes=_FLOAT_DTYPES)
    device = target_logits.device
    _check_tensor(op, "draft_tokens", draft_tokens, dim=1, dtypes=_INT_DTYPES, device=device)
    _check_tensor(op, "cu_num_draft", cu_num_draft, dim=1, dtypes=_INT_DTYPES, device=device)
    if cu_num_draft.shape[0] < 1:
        _fail(op, f"cu_num_draft must have B + 1 >= 1 entries, got shape {tuple(cu_num_draft.shape)}")
    batch = cu_num_draft.shape[0] - 1
    num_draft = draft_tokens.shape[0]
    vocab = target_logits.shape[1]
    if vocab < 1:
        _fail(op, f"target_logits must have a vocabulary of at least 1, got shape {tuple(target_logits.shape)}")
    if target_logits.shape[0] != num_draft + batch:
        _fail(op, f"target_logits must have N + B = {num_draft + batch} rows (N = draft_tokens.size(0) = "
                  f"{num_draft}, B = cu_num_draft.size(0) - 1 = {batch}), got {target_logits.shape[0]}")
    if draft_logits is not None and draft_probs is not None:
        _fail(op, "give draft_logits or draft_probs, not both")
    for name, t in (("draft_logits", draft_logits), ("draft_probs", draft_probs)):
        if t is not None:
            _check_tensor(op, name, t, dim=2, dtypes=_FLOAT_DTYPES, device=device)
            if draft_index is None and tuple(t.shape) != (num_draft, vocab):
                _fail(op, f"{name} must have shape [N, V] = [{num_draft}, {vocab}], got {tuple(t.shape)}")
            if t.shape[1] != vocab:
                _fail(op, f"{name} must have V = {vocab} columns, got shape {tuple(t.shape)}")
    _check_draft_index(op, draft_index, num_draft, draft_logits, draft_probs, device)
    _check_sampling_tensors(op, batch, device, temperature, top_k, top_p, seed, offset)
    _check_min_p(op, min_p, batch, device)
    if isinstance(width, bool) or not isinstance(width, (int, torch.SymInt)):
        _fail(op, f"{width_name} must be an int, got {type(width).__name__}")
    if not 0 <= width <= 2**31 - 2:
        _fail(op, f"{width_name} must be in [0, 2^31 - 2] (the output has {width_name} + 1 int32 columns), "
                  f"got {width}")


def _check_verify_block(target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, temperature, top_k,
                        top_p, seed, offset, max_num_draft, method="token", min_p=None, draft_index=None):
    """Shape / dtype / device checks (the C++ kernels run the same ones themselves)."""
    _check_method(method)
    _check_verify_layout("verify_block", target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs,
                         temperature, top_k, top_p, seed, offset, max_num_draft, "max_num_draft", min_p, draft_index)


def _check_verify_block_data(target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, temperature,
                             top_k, top_p, seed, offset, max_num_draft, method="token", min_p=None, draft_index=None):
    """Data-dependent checks (host reads): CPU always, CUDA under DSPARK_DEBUG=1."""
    op = "verify_block"
    vocab = target_logits.shape[1]
    n = _check_offsets(op, "cu_num_draft", cu_num_draft, draft_tokens.shape[0], "draft_tokens.size(0)")
    if n.numel() and int(n.max()) > max_num_draft:
        b = int(torch.argmax(n))
        _fail(op, f"request {b} has {int(n[b])} drafts, more than max_num_draft = {max_num_draft}")
    _check_draft_ids(op, draft_tokens, vocab)
    _check_draft_index_data(op, draft_index, draft_logits, draft_probs)


def _verify_block_fake(target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, temperature, top_k, top_p,
                       seed, offset, max_num_draft, method="token", min_p=None, draft_index=None):
    batch = cu_num_draft.shape[0] - 1
    out = target_logits.new_empty((batch, max_num_draft + 1), dtype=torch.int32)
    return out, target_logits.new_empty((batch,), dtype=torch.int32)


VERIFY_BLOCK = _registry.declare(_registry.OpSpec(
    schema="verify_block(Tensor target_logits, Tensor draft_tokens, Tensor cu_num_draft, *, "
           "Tensor? draft_logits=None, Tensor? draft_probs=None, Tensor? temperature=None, "
           "Tensor? top_k=None, Tensor? top_p=None, Tensor seed, Tensor offset, SymInt max_num_draft, "
           "str method=\"token\", Tensor? min_p=None, Tensor? draft_index=None) "
           "-> (Tensor output_tokens, Tensor num_accepted)",
    fake=_verify_block_fake,
    reference=".reference.verify_block:verify_block",
    triton=".triton.verify_block:verify_block",
    nvrtc=".nvrtc.ops:verify_block",
    check=_check_verify_block,
    check_data=_check_verify_block_data,
    cpp=frozenset({"CPU", "CUDA"}),
))


# ----------------------------------------------------------------------------------------
# verify_tree: SpecInfer multi-round verification of ragged draft trees.


def verify_tree(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    cu_num_draft: torch.Tensor,
    *,
    draft_logits: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature: torch.Tensor | float | None = None,
    top_k: torch.Tensor | int | None = None,
    top_p: torch.Tensor | float | None = None,
    seed: torch.Tensor | int | None = None,
    offset: torch.Tensor | int | None = None,
    max_depth: int | None = None,
    min_p: torch.Tensor | float | None = None,
    draft_index: torch.Tensor | None = None,
    return_logprobs: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, ...]:
    r"""Verification of ragged draft trees (SpecInfer multi-round speculative sampling).

    Request ``b`` owns nodes ``j = 0 .. n_b - 1`` (global ``cu[b] + j``) in topological
    order; ``parents[cu[b] + j]`` is the parent's local index, ``-1`` for a child of the
    root (the last committed token). Target row ``cu[b] + b`` is the distribution after
    the root, row ``cu[b] + b + 1 + j`` the one after node ``j`` (so ``T = N + B``, and
    the chain ``parents = [-1, 0, 1, ...]`` is verify_block's layout: it gives exactly
    verify_block's tokens from the same seeds).

    Rule, with ``p`` / ``q`` filtered as in verify_block: at the current node (start:
    the root, ``p' = p`` of its row) try its children in increasing local index;
    accept child ``c`` iff ``log u < log p'(c) - log q_c(c)`` where ``q_c`` is c's own
    row of ``draft_logits`` / ``draft_probs``, or a point mass at c's token when
    neither is given; on rejection ``p' <- norm(max(p' - q_c, 0))`` and try the next
    sibling; after an acceptance descend (``p'`` becomes the new node's ``p``); when
    no child is accepted (or at a leaf) emit a Gumbel-race sample of ``p'``. Ids ``-1``
    are padding (skipped). Greedy requests (``T <= 0`` / ``temperature=None``) follow
    the first child whose id is the argmax of the current row and emit the argmax
    where none is.

    Losslessness: the output is distributed as the target when the siblings of a
    node were drawn i.i.d. from their ``q`` given the parent (SpecInfer's multi-step
    speculative sampling). Siblings chosen deterministically (EAGLE's top-k children)
    must be verified as point masses (pass neither ``draft_logits`` nor
    ``draft_probs``): then rejecting ``c`` sets ``p'(c) = 0`` and renormalises, which
    is SGLang's target-only tree walk (``tree_speculative_sampling_target_only``),
    also lossless. Passing the drafter's q for deterministic siblings is not.

    Randomness (docs/randomness.md, verify_block's salts): the accept coin of a child
    of rank ``r`` among its siblings at position ``offset + depth(parent)`` (root
    depth 0), index ``r``; the emitted token's race at ``offset + depth(current)``.
    A chain therefore uses exactly verify_block's coins; batch-invariant, identical
    on every backend.

    Args:
        target_logits: ``[N + B, V]`` float32 / float16 / bfloat16.
        draft_tokens: ``[N]`` int32 / int64, ``-1`` = padding (never accepted).
        parents: ``[N]`` int32 / int64 local parent indices, ``-1 <= parents[j] < j``.
        cu_num_draft: ``[B + 1]`` int32 / int64 offsets.
        draft_logits / draft_probs: ``[N, V]`` (at most one of them).
        temperature, top_k, top_p, min_p, seed, offset: as in verify_block (min-p too:
            temperature, min-p, top-k, top-p, for p and for q from draft_logits).
        draft_index: ``[N]`` int, optional: q of node j is row ``draft_index[j]`` of
            draft_logits / draft_probs (which may then have any number of rows).
        return_logprobs: also return ``logprobs [B, max_depth + 1]`` float32: for each
            output token, ``log p(token)`` under the filtered target distribution of the
            node it was drawn at (its parent's row; the root's for the first), ``-inf``
            on the padding (see verify_block).
        max_depth: output width - 1, ``>=`` the depth of every tree; None reads it
            from ``parents`` (one host read: pass it under CUDA graphs / torch.compile).
            Nodes deeper than ``max_depth`` are an error on the CPU (and under
            ``DSPARK_DEBUG=1`` on CUDA), and never visited otherwise.
        backend: "reference" | "cpu" | "triton" | "cuda" | "nvrtc" | None.

    Returns:
        ``accept_path [B, max_depth + 1]`` int32 (window indices for kv_commit:
        0 = the root, ``1 + j`` = node j; ``num_accepted + 1`` of them, then -1),
        ``num_accepted [B]`` int32, and ``output_tokens [B, max_depth + 1]`` int32
        (the accepted tokens, then the emitted one, then -1); with
        ``return_logprobs=True`` also ``logprobs``.

    Example:

    >>> import torch, dspark_kernels as dk
    >>> logits = torch.full((4, 5), -10.0)
    >>> logits[0, 2] = logits[1, 4] = logits[2, 1] = logits[3, 3] = 10.0
    >>> # greedy, root -> {node 0: token 3, node 1: token 2}, node 1 -> {node 2: token 1}
    >>> path, n, out = dk.verify_tree(logits, torch.tensor([3, 2, 1]), torch.tensor([-1, -1, 1]),
    ...                               torch.tensor([0, 3]), max_depth=2)
    >>> path.tolist(), n.tolist(), out.tolist()
    ([[0, 2, 3]], [2], [[2, 1, 3]])
    """
    op = "verify_tree"
    _check_tensor(op, "target_logits", target_logits, dim=2, dtypes=_FLOAT_DTYPES)
    _check_tensor(op, "cu_num_draft", cu_num_draft, dim=1, dtypes=_INT_DTYPES, device=target_logits.device)
    device = target_logits.device
    batch = max(cu_num_draft.shape[0] - 1, 0)
    temperature, top_k, top_p, min_p = _per_request_sampling(
        op, temperature, top_k, top_p, min_p, batch, device)
    seed, offset = _default_seed_offset(op, seed, offset, batch, device)
    _check_return_logprobs(op, return_logprobs)
    if max_depth is None:  # one host read; valid offsets and parents first
        _check_tensor(op, "draft_tokens", draft_tokens, dim=1, dtypes=_INT_DTYPES)
        _check_tensor(op, "parents", parents, dim=1, shape=tuple(draft_tokens.shape), dtypes=_INT_DTYPES)
        max_depth = _tree_max_depth(op, parents, cu_num_draft, draft_tokens.shape[0])[0]
    path, num_accepted, out = _registry.dispatch(VERIFY_TREE, backend, target_logits, draft_tokens, parents,
                                                 cu_num_draft, draft_logits, draft_probs, temperature, top_k, top_p,
                                                 seed, offset, max_depth, min_p, draft_index)
    if not return_logprobs:
        return path, num_accepted, out
    # Output column j was drawn at path node j (window index accept_path[b, j]: 0 = the
    # root), whose target row is cu[b] + b + accept_path[b, j]; the last path entry is
    # the node the emitted token was drawn at.
    first = (cu_num_draft[:-1].to(torch.int64) + torch.arange(batch, device=device)).unsqueeze(1)
    rows = torch.where(path >= 0, first + path.to(torch.int64), -1)
    lp = token_logprobs(target_logits, out, rows, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        backend=backend)
    return path, num_accepted, out, lp


def _tree_max_depth(op, parents, cu_num_draft, num_draft) -> tuple[int, int]:
    """Checks cu_num_draft and parents (host reads); returns the deepest node's depth and its request."""
    n = _check_offsets(op, "cu_num_draft", cu_num_draft, num_draft, "draft_tokens.size(0)")
    par = parents.detach().cpu().to(torch.int64).tolist()
    deepest, where = 0, 0
    start = 0
    for b, nb in enumerate(n.tolist()):
        depth = []
        for j in range(nb):
            i = start + j
            pj = par[i]
            if pj < -1:
                _fail(op, f"parents[{i}] = {pj} is out of range (request {b}: local parent indices are >= -1)")
            if pj >= j:
                _fail(op, f"parents[{i}] = {pj} must be < its local index {j} (request {b}: nodes in topological "
                          f"order, parents within the request; -1 = the root)")
            depth.append(1 if pj < 0 else depth[pj] + 1)
        if depth and max(depth) > deepest:
            deepest, where = max(depth), b
        start += nb
    return deepest, where


def _check_verify_tree(target_logits, draft_tokens, parents, cu_num_draft, draft_logits, draft_probs,
                       temperature, top_k, top_p, seed, offset, max_depth, min_p=None, draft_index=None):
    """Shape / dtype / device checks (the C++ kernels run the same ones themselves)."""
    _check_verify_layout("verify_tree", target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs,
                         temperature, top_k, top_p, seed, offset, max_depth, "max_depth", min_p, draft_index)
    _check_tensor("verify_tree", "parents", parents, dim=1, shape=tuple(draft_tokens.shape), dtypes=_INT_DTYPES,
                  device=target_logits.device)


def _check_verify_tree_data(target_logits, draft_tokens, parents, cu_num_draft, draft_logits, draft_probs,
                            temperature, top_k, top_p, seed, offset, max_depth, min_p=None, draft_index=None):
    """Data-dependent checks (host reads): CPU always, CUDA under DSPARK_DEBUG=1."""
    op = "verify_tree"
    deepest, b = _tree_max_depth(op, parents, cu_num_draft, draft_tokens.shape[0])
    if deepest > max_depth:
        _fail(op, f"request {b}'s tree has depth {deepest}, more than max_depth = {max_depth}")
    vocab = target_logits.shape[1]
    _check_draft_ids(op, draft_tokens, vocab)
    _check_draft_index_data(op, draft_index, draft_logits, draft_probs)


def _verify_tree_fake(target_logits, draft_tokens, parents, cu_num_draft, draft_logits, draft_probs, temperature,
                      top_k, top_p, seed, offset, max_depth, min_p=None, draft_index=None):
    batch = cu_num_draft.shape[0] - 1
    path = target_logits.new_empty((batch, max_depth + 1), dtype=torch.int32)
    out = target_logits.new_empty((batch, max_depth + 1), dtype=torch.int32)
    return path, target_logits.new_empty((batch,), dtype=torch.int32), out


VERIFY_TREE = _registry.declare(_registry.OpSpec(
    schema="verify_tree(Tensor target_logits, Tensor draft_tokens, Tensor parents, Tensor cu_num_draft, *, "
           "Tensor? draft_logits=None, Tensor? draft_probs=None, Tensor? temperature=None, "
           "Tensor? top_k=None, Tensor? top_p=None, Tensor seed, Tensor offset, SymInt max_depth, "
           "Tensor? min_p=None, Tensor? draft_index=None) "
           "-> (Tensor accept_path, Tensor num_accepted, Tensor output_tokens)",
    fake=_verify_tree_fake,
    reference=".reference.verify_tree:verify_tree",
    triton=".triton.verify_tree:verify_tree",
    nvrtc=".nvrtc.ops:verify_tree",
    check=_check_verify_tree,
    check_data=_check_verify_tree_data,
    cpp=frozenset({"CPU", "CUDA"}),
))


# ----------------------------------------------------------------------------------------
# token_logprobs: the target log-probabilities of chosen tokens (verify_block /
# verify_tree with return_logprobs=True).


def token_logprobs(
    target_logits: torch.Tensor,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    *,
    temperature: torch.Tensor | float | None = None,
    top_k: torch.Tensor | int | None = None,
    top_p: torch.Tensor | float | None = None,
    min_p: torch.Tensor | float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Log-probabilities of chosen tokens under the filtered target distribution.

    For request ``b`` and column ``j`` with ``r = rows[b, j] >= 0`` and
    ``x = tokens[b, j]`` in ``[0, V)``::

        logprobs[b, j] = log p_r(x),   p_r = F(softmax(target_logits[r] / T_b))

    with F verify_block's filters (min-p, top-k, top-p, in that order) and
    ``T_b = temperature[b]`` when it is ``> 0``, else 1 (greedy requests: the log-softmax
    of the raw logits, filtered). ``-inf`` where ``rows < 0``, the token is outside
    ``[0, V)`` or the filters drop it. This is vLLM's "processed" log-probability of a
    sampled token (after temperature and filters) and the law the verified token
    follows: a token emitted from a residual ``norm(max(p - q, 0))`` still reports
    ``log p(x)``, since the output of lossless verification is distributed as ``p``.
    One pass over the vocabulary per non-padding entry, nothing else is read.

    Args:
        target_logits: ``[T, V]`` float32 / float16 / bfloat16.
        tokens: ``[B, W]`` int32 / int64.
        rows: ``[B, W]`` int32 / int64 rows of target_logits, ``-1`` = padding.
        temperature, top_k, top_p, min_p: ``[B]`` tensors or scalars, as in verify_block.
        backend: "reference" | "cpu" | "triton" | "cuda" | None.

    Returns:
        ``logprobs [B, W]`` float32.

    Example:

    >>> import torch, dspark_kernels as dk
    >>> logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    >>> dk.token_logprobs(logits, torch.tensor([[0, 2, 1]]), torch.tensor([[0, 0, -1]]),
    ...                   temperature=1.0).exp().tolist()
    [[0.5, 0.25, 0.0]]
    """
    op = "token_logprobs"
    _check_tensor(op, "tokens", tokens, dim=2, dtypes=_INT_DTYPES)
    device = tokens.device
    batch = tokens.shape[0]
    temperature, top_k, top_p, min_p = _per_request_sampling(
        op, temperature, top_k, top_p, min_p, batch, device)
    return _registry.dispatch(TOKEN_LOGPROBS, backend, target_logits, tokens, rows, temperature, top_k, top_p, min_p)


def _check_token_logprobs(target_logits, tokens, rows, temperature, top_k, top_p, min_p):
    op = "token_logprobs"
    _check_tensor(op, "target_logits", target_logits, dim=2, dtypes=_FLOAT_DTYPES)
    device = target_logits.device
    if target_logits.shape[1] < 1:
        _fail(op, f"target_logits must have a vocabulary of at least 1, got shape {tuple(target_logits.shape)}")
    _check_tensor(op, "tokens", tokens, dim=2, dtypes=_INT_DTYPES, device=device)
    _check_tensor(op, "rows", rows, dim=2, shape=tuple(tokens.shape), dtypes=_INT_DTYPES, device=device)
    batch = tokens.shape[0]
    for name, t, floating in (("temperature", temperature, True), ("top_k", top_k, False), ("top_p", top_p, True),
                              ("min_p", min_p, True)):
        if t is not None:
            _check_tensor(op, name, t, dim=1, shape=(batch,), device=device)
            if t.dtype.is_floating_point != floating:
                _fail(op, f"{name} must be a {'floating' if floating else 'integer'} tensor, got {t.dtype}")


def _check_token_logprobs_data(target_logits, tokens, rows, *rest):
    r = rows.detach().cpu().to(torch.int64)
    bad = r >= target_logits.shape[0]
    if bad.any():
        b, j = (int(v) for v in torch.nonzero(bad)[0])
        _fail("token_logprobs", f"rows[{b}, {j}] = {int(r[b, j])} is not a row of target_logits "
                                f"(it has {target_logits.shape[0]}; -1 = padding)")


def _token_logprobs_fake(target_logits, tokens, rows, temperature, top_k, top_p, min_p):
    return target_logits.new_empty(tuple(tokens.shape), dtype=torch.float32)


TOKEN_LOGPROBS = _registry.declare(_registry.OpSpec(
    schema="token_logprobs(Tensor target_logits, Tensor tokens, Tensor rows, *, Tensor? temperature=None, "
           "Tensor? top_k=None, Tensor? top_p=None, Tensor? min_p=None) -> Tensor logprobs",
    fake=_token_logprobs_fake,
    reference=".reference.token_logprobs:token_logprobs",
    triton=".triton.token_logprobs:token_logprobs",
    check=_check_token_logprobs,
    check_data=_check_token_logprobs_data,
    cpp=frozenset({"CPU"}),
))
