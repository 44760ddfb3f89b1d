"""KV-cache rollback after verification (docs/kv.md): public functions and declarations.

After the target verified a window of tokens per request, only the accepted
tokens' KV stays:

* ``kv_commit`` moves the accepted path of each request's window into place in
  every paged cache (K, V, MLA latents, fp8 scales, indexer keys ...) in one call;
  chains move nothing, trees and any other path are compacted safely.
* ``kv_release_pages`` drops the references of whole pages past the new length
  and returns the pages that reached zero.
* ``window_commit`` writes the accepted rows into the drafter's circular window.
* ``state_select`` takes the recurrent (SSM / linear-attention) state of the
  accepted step.

Every function takes ``backend=`` ("reference", "cpu", "cuda", "nvrtc" or None: through
``torch.ops.dspark.<op>``). Data-dependent checks (path entries, page ids, offsets,
refcounts) run on the CPU always and on CUDA under ``DSPARK_DEBUG=1``; without them
the CUDA kernels skip out-of-range entries and never touch memory outside the
given tensors. The ops are declared at the end of this file (docs/kv.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _registry
from ._validation import _INT_DTYPES, _check_offsets, _check_tensor, _fail

_KEEP_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64)


def _dense_from(t: torch.Tensor, first_dim: int) -> bool:
    """Dims first_dim.. are dense row-major (size-1 dims ignored)."""
    expected = 1
    for d in range(t.dim() - 1, first_dim - 1, -1):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def _first_bad(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(mask)[0])


# --------------------------------------------------------------------------- kv_commit


def kv_commit(
    caches: Sequence[torch.Tensor],
    block_table: torch.Tensor,
    page_size: int,
    committed_len: torch.Tensor,
    accept_path: torch.Tensor,
    num_accept: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Compact the accepted path of every request's verify window into place, in every cache.

    The verify pass wrote the KV of request ``b``'s window at logical positions
    ``committed_len[b] + i`` (``i = 0 .. W-1``). For ``j < num_accept[b]``, window
    index ``accept_path[b, j]`` moves to logical position ``committed_len[b] + j``::

        for every cache, request b, j < num_accept[b]:
            cache[slot(committed_len[b] + j)] = old cache[slot(committed_len[b] + accept_path[b, j])]
        slot(pos) = (block_table[b, pos // page_size], pos % page_size)     (page, slot in page)
        new_len   = committed_len + num_accept                               (int32)

    Every source is read before any destination is written, so any path is safe:
    a chain (``accept_path[b] = [0, 1, ..., a]``, ``num_accept = a + 1`` =
    verify_block's ``num_accepted + 1``) moves nothing (identity moves are
    skipped), trees (``[0, 2, 3]``, ``[0, 3, 4, 5]``), reversed and sparse paths are
    compacted correctly. Entries past ``num_accept[b]`` are ignored (``-1`` padding);
    ``num_accept[b] = 0`` commits nothing. Bytes are copied as they are, so any
    dtype works (bf16, fp8 as uint8 or float8_e4m3fn, fp32 scales, ...).

    Args:
        caches: list of ``[num_pages, page_size, *row]`` tensors (K or V of a layer,
            an MLA latent, scales, indexer keys ...), all on one device with the same
            ``num_pages``; dtypes and row shapes may differ. The row must be dense
            (dims 2.. contiguous); page and slot strides are free (e.g. K and V as
            views of one ``[num_pages, 2, page_size, H, D]`` tensor). Modified in place.
        block_table: ``[B, P]`` int32/int64 physical page of each request's logical page.
        page_size: slots per page (= every cache's ``size(1)``).
        committed_len: ``[B]`` int32/int64, the length before the verify window.
        accept_path: ``[B, W]`` int32/int64 window indices of the accepted tokens, in order.
        num_accept: ``[B]`` int32/int64 in ``[0, W]``.
        backend: "reference" | "cpu" | "cuda" | "nvrtc" | None.

    Returns:
        ``new_len [B]`` int32.

    Requirements (checked on CPU, and on CUDA under ``DSPARK_DEBUG=1``): every
    ``j < num_accept[b]`` has ``accept_path[b, j] >= 0`` and both positions inside
    the block table on pages in ``[0, num_pages)``; no physical slot is written by
    two requests, or written by one request and read by another. Without the checks
    the CUDA kernel skips such moves (it never writes outside the caches).
    CUDA: one launch for up to 96 caches (more: one launch per 96), no host sync,
    CUDA-graph capturable.

    Example:

    >>> import torch, dspark_kernels as dk
    >>> cache = torch.arange(8.0).reshape(2, 4, 1)   # 2 pages of 4 slots: position p holds the value p
    >>> # one request on pages [0, 1], 2 committed tokens; the window at positions 2.. accepted indices [0, 2, 3]
    >>> new_len = dk.kv_commit([cache], torch.tensor([[0, 1]]), 4, torch.tensor([2]), torch.tensor([[0, 2, 3]]),
    ...                        torch.tensor([3]))
    >>> new_len.tolist(), cache.flatten().tolist()
    ([5], [0.0, 1.0, 2.0, 4.0, 5.0, 5.0, 6.0, 7.0])
    """
    if isinstance(caches, (list, tuple)):
        caches = list(caches)
    return _registry.dispatch(KV_COMMIT, backend, caches, block_table, page_size, committed_len, accept_path,
                              num_accept)


def _check_kv_commit(caches, block_table, page_size, committed_len, accept_path, num_accept):
    op = "kv_commit"
    if isinstance(caches, torch.Tensor) or not isinstance(caches, (list, tuple)):
        _fail(op, f"caches must be a list of tensors [num_pages, page_size, *row], got {type(caches).__name__}")
    for i, c in enumerate(caches):
        if not isinstance(c, torch.Tensor):
            _fail(op, f"caches[{i}] must be a torch.Tensor, got {type(c).__name__}")
    _check_tensor(op, "block_table", block_table, dim=2, dtypes=_INT_DTYPES)
    device = block_table.device
    batch, _pages = block_table.shape
    _check_tensor(op, "committed_len", committed_len, dim=1, shape=(batch,), dtypes=_INT_DTYPES, device=device)
    _check_tensor(op, "accept_path", accept_path, dim=2, dtypes=_INT_DTYPES, device=device)
    if accept_path.shape[0] != batch:
        _fail(op, f"accept_path must have shape [B, W] with B = {batch}, got {tuple(accept_path.shape)}")
    _check_tensor(op, "num_accept", num_accept, dim=1, shape=(batch,), dtypes=_INT_DTYPES, device=device)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size < 2**31:
        _fail(op, f"page_size must be in [1, 2^31), got {page_size!r}")
    _check_caches(caches, page_size, device)


def _check_caches(caches, page_size, device):
    """The caches' shape / layout checks (csrc/kv.h runs the same ones for the C++ kernels)."""
    op = "kv_commit"
    seen = {}
    for i, c in enumerate(caches):
        name = f"caches[{i}]"
        _check_tensor(op, name, c, device=device)
        if c.dim() < 2:
            _fail(op, f"{name} must be [num_pages, page_size, *row] (at least 2-D), got shape {tuple(c.shape)}")
        if c.shape[1] != page_size:
            _fail(op, f"{name}.size(1) must equal page_size = {page_size}, got shape {tuple(c.shape)}")
        if c.shape[0] != caches[0].shape[0]:
            _fail(op, f"{name} must have the same num_pages as caches[0] ({caches[0].shape[0]}), "
                      f"got shape {tuple(c.shape)}")
        if not _dense_from(c, 2):
            _fail(op, f"{name} must have a dense row (dims 2.. contiguous; page and slot strides are free), "
                      f"got strides {c.stride()} for shape {tuple(c.shape)}")
        if c.numel() > 0:
            k = seen.setdefault(c.data_ptr(), i)
            if k != i:
                _fail(op, f"caches[{k}] and {name} are the same memory: each cache may appear once")


def _check_kv_commit_data(caches, block_table, page_size, committed_len, accept_path, num_accept):
    """Data-dependent checks (host reads): CPU always, CUDA under DSPARK_DEBUG=1."""
    op = "kv_commit"
    bt = block_table.cpu().to(torch.int64)
    L = committed_len.cpu().to(torch.int64)
    path = accept_path.cpu().to(torch.int64)
    n = num_accept.cpu().to(torch.int64)
    pages = bt.shape[1]
    width = path.shape[1]
    num_pages = caches[0].shape[0] if caches else None
    bad = (n < 0) | (n > width)
    if bad.any():
        b = _first_bad(bad)[0]
        _fail(op, f"num_accept[{b}] = {int(n[b])} is outside [0, W] with W = accept_path.size(1) = {width}")
    if (L < 0).any():
        b = _first_bad(L < 0)[0]
        _fail(op, f"committed_len[{b}] = {int(L[b])} is negative")
    bad = L > (2**31 - 1) - n  # written so that it cannot overflow
    if bad.any():
        b = _first_bad(bad)[0]
        _fail(op, f"committed_len[{b}] = {int(L[b])} + num_accept[{b}] = {int(n[b])} does not fit the int32 new_len "
                  "(at most 2^31 - 1)")
    j = torch.arange(width)
    active = j[None, :] < n[:, None]
    bad = active & (path < 0)
    if bad.any():
        b, jj = _first_bad(bad)
        _fail(op, f"accept_path[{b}, {jj}] = {int(path[b, jj])} is negative but j < num_accept[{b}] = {int(n[b])} "
                  "(-1 padding is allowed only past num_accept)")
    located = {}
    reach = min(pages * page_size, 2**62)  # a clamp that keeps the sums below in int64
    for kind, pos in (("source", L[:, None] + path.clamp(max=reach)), ("destination", L[:, None] + j[None, :])):
        col = torch.div(pos, page_size, rounding_mode="floor")
        bad = active & (col >= pages)
        if bad.any():
            b, jj = _first_bad(bad)
            _fail(op, f"{kind} position {int(pos[b, jj])} of accept_path[{b}, {jj}] (committed_len[{b}] = "
                      f"{int(L[b])}) is past the block_table's {pages} pages of {page_size} slots")
        page = bt.gather(1, col.clamp(0, max(pages - 1, 0))) if pages else torch.zeros_like(col)
        if num_pages is not None:
            bad = active & ((page < 0) | (page >= num_pages))
            if bad.any():
                b, jj = _first_bad(bad)
                _fail(op, f"block_table[{b}, {int(col[b, jj])}] = {int(page[b, jj])} ({kind} of accept_path[{b}, "
                          f"{jj}]) is outside [0, num_pages) with num_pages = {num_pages}")
        located[kind] = page * page_size + pos % page_size
    real = active & (path != j[None, :])
    if not real.any():
        return
    owner = {}
    for b, jj in torch.nonzero(real).tolist():
        key = int(located["destination"][b, jj])
        if key in owner:
            _fail(op, f"block_table maps a destination of request {b} and one of request {owner[key]} to the same "
                      f"physical slot (page {key // page_size}, slot {key % page_size}); destinations must be distinct")
        owner[key] = b
    for b, jj in torch.nonzero(real).tolist():
        key = int(located["source"][b, jj])
        if owner.get(key, b) != b:
            _fail(op, f"request {b} reads page {key // page_size} slot {key % page_size}, which request {owner[key]} "
                      "overwrites: the block_table rows share a page that is being written")
    if not caches:  # nothing is written
        return
    for b, jj in torch.nonzero(active & (path == j[None, :])).tolist():
        key = int(located["destination"][b, jj])
        if owner.get(key, b) != b:
            _fail(op, f"request {b} keeps its token at page {key // page_size} slot {key % page_size} "
                      f"(accept_path[{b}, {jj}] = {jj}, an identity move), which request {owner[key]} overwrites: "
                      "the block_table rows share a page that is being written")


# --------------------------------------------------------------------------- kv_release_pages


def kv_release_pages(
    block_table: torch.Tensor,
    new_len: torch.Tensor,
    old_len: torch.Tensor,
    page_size: int,
    refcount: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Drop the references of whole pages past each request's new length; return the freed ones.

    Block-table entry ``p`` of request ``b`` is released iff
    ``p * page_size >= new_len[b]`` and ``p * page_size < old_len[b]`` (the page that
    holds position ``new_len[b] - 1`` is partially used and kept)::

        for b in order, for released p in order:
            refcount[block_table[b, p]] -= 1
            if it reached 0: append block_table[b, p] to freed[b]

    A page shared by several requests that all release it is returned once, by the
    decrement that brings it to zero (the last request in batch order on CPU and in
    the reference; whichever request's atomic decrement comes last on CUDA).
    Refcounts never go negative: releasing a page whose refcount is already 0 is an
    error on the CPU (and on CUDA under ``DSPARK_DEBUG=1``); the CUDA kernel
    otherwise leaves it at 0 and does not return it.

    Args:
        block_table: ``[B, P]`` int32/int64 page ids.
        new_len, old_len: ``[B]`` int32/int64, ``0 <= len <= P * page_size``.
        page_size: slots per page.
        refcount: ``[num_pages]`` int32/int64, modified in place.
        backend: "reference" | "cpu" | "cuda" | "nvrtc" | None.

    Returns:
        ``freed [B, P]`` int32 (page ids in block-table order, then -1) and
        ``num_freed [B]`` int32.

    Example:

    >>> import torch, dspark_kernels as dk
    >>> refcount = torch.tensor([1, 1, 2], dtype=torch.int32)   # page 2 is shared with another request
    >>> freed, n = dk.kv_release_pages(torch.tensor([[0, 1, 2]]), torch.tensor([3]), torch.tensor([12]), 4, refcount)
    >>> freed.tolist(), n.tolist(), refcount.tolist()
    ([[1, -1, -1]], [1], [1, 0, 1])
    """
    return _registry.dispatch(KV_RELEASE_PAGES, backend, block_table, new_len, old_len, page_size, refcount)


def _check_kv_release_pages(block_table, new_len, old_len, page_size, refcount):
    op = "kv_release_pages"
    _check_tensor(op, "block_table", block_table, dim=2, dtypes=_INT_DTYPES)
    device = block_table.device
    batch = block_table.shape[0]
    _check_tensor(op, "new_len", new_len, dim=1, shape=(batch,), dtypes=_INT_DTYPES, device=device)
    _check_tensor(op, "old_len", old_len, dim=1, shape=(batch,), dtypes=_INT_DTYPES, device=device)
    _check_tensor(op, "refcount", refcount, dim=1, dtypes=_INT_DTYPES, device=device)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        _fail(op, f"page_size must be an int >= 1, got {page_size!r}")


def _check_kv_release_pages_data(block_table, new_len, old_len, page_size, refcount):
    op = "kv_release_pages"
    bt = block_table.cpu().to(torch.int64)
    new, old = new_len.cpu().to(torch.int64), old_len.cpu().to(torch.int64)
    rc = refcount.cpu().to(torch.int64)
    pages = bt.shape[1]
    for arg, v in (("new_len", new), ("old_len", old)):
        if (v < 0).any():
            b = _first_bad(v < 0)[0]
            _fail(op, f"{arg}[{b}] = {int(v[b])} is negative")
    cap = min(pages * page_size, 2**63 - 1)  # a Python int: no overflow at page_size = 2^62
    for arg, v in (("new_len", new), ("old_len", old)):
        if (v > cap).any():
            b = _first_bad(v > cap)[0]
            _fail(op, f"{arg}[{b}] = {int(v[b])} is past the block_table's {pages} pages of {page_size} slots")
    if rc.shape[0] > 2**31 - 1:
        _fail(op, f"refcount.size(0) = {rc.shape[0]} pages: page ids are int32 (at most 2^31 - 1 pages)")
    # Column p is released iff ceil(new / page_size) <= p < ceil(old / page_size): no p * page_size product.
    col = torch.arange(pages)
    first, end = -((-new) // page_size), -((-old) // page_size)
    released = (col[None, :] >= first[:, None]) & (col[None, :] < end[:, None])
    bad = released & ((bt < 0) | (bt >= rc.shape[0]))
    if bad.any():
        b, p = _first_bad(bad)
        _fail(op, f"block_table[{b}, {p}] = {int(bt[b, p])} is released but outside [0, num_pages) with "
                  f"num_pages = refcount.size(0) = {rc.shape[0]}")
    ids = bt[released]
    if ids.numel():
        times = torch.bincount(ids, minlength=rc.shape[0])
        over = times > rc
        if over.any():
            page = _first_bad(over)[0]
            _fail(op, f"page {page} is released {int(times[page])} time(s) but refcount[{page}] = {int(rc[page])} "
                      "(a double free: refcounts never go negative)")


# --------------------------------------------------------------------------- window_commit


def window_commit(
    window: torch.Tensor,
    rows: torch.Tensor,
    cu: torch.Tensor,
    positions: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Write the kept rows into the drafter's circular context window.

    Request ``b``'s rows are ``rows[cu[b] : cu[b+1]]``::

        for t in cu[b] .. cu[b+1]-1, in order:
            if keep[t]: window[b, positions[t] % W] = rows[t]

    Rejected rows leave the window untouched. When two kept rows of a request map
    to the same slot (positions W apart) the later row wins, on every backend.

    Args:
        window: ``[B, W, *row]`` any dtype, dense row; modified in place.
        rows: ``[T, *row]`` same dtype, dense row.
        cu: ``[B + 1]`` int32/int64 offsets, ``cu[0] = 0``, ``cu[B] = T``, non-decreasing.
        positions: ``[T]`` int32/int64 absolute token positions (``>= 0`` for kept rows).
        keep: ``[T]`` bool (or integer, nonzero = kept); None keeps every row.
        backend: "reference" | "cpu" | "cuda" | "nvrtc" | None.

    Returns:
        ``window`` (the same tensor).

    Without ``DSPARK_DEBUG=1`` the CUDA kernel skips rows with a negative position
    or outside a consistent ``cu``.

    Example:

    >>> import torch, dspark_kernels as dk
    >>> window = torch.zeros(1, 4, 1)
    >>> rows = torch.tensor([[7.0], [8.0], [9.0]])   # positions 5, 6, 7; the last one was rejected
    >>> keep = torch.tensor([True, True, False])
    >>> dk.window_commit(window, rows, torch.tensor([0, 3]), torch.tensor([5, 6, 7]), keep).flatten().tolist()
    [0.0, 7.0, 8.0, 0.0]
    """
    if keep is None and isinstance(rows, torch.Tensor):
        keep = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    _registry.dispatch(WINDOW_COMMIT, backend, window, rows, cu, positions, keep)
    return window


def _check_window_commit(window, rows, cu, positions, keep):
    op = "window_commit"
    _check_tensor(op, "window", window)
    device = window.device
    if window.dim() < 2 or window.shape[1] < 1:
        _fail(op, f"window must be [B, W, *row] with W >= 1, got shape {tuple(window.shape)}")
    _check_tensor(op, "rows", rows, dtypes=(window.dtype,), device=device)
    if rows.dim() != window.dim() - 1 or tuple(rows.shape[1:]) != tuple(window.shape[2:]):
        _fail(op, f"rows must be [T, *row] with row = window.shape[2:] = {list(window.shape[2:])}, "
                  f"got shape {tuple(rows.shape)}")
    if not _dense_from(window, 2):
        _fail(op, f"window must have a dense row (dims 2.. contiguous), got strides {window.stride()}")
    if not _dense_from(rows, 1):
        _fail(op, f"rows must have a dense row (dims 1.. contiguous), got strides {rows.stride()}")
    batch, num_rows = window.shape[0], rows.shape[0]
    _check_tensor(op, "cu", cu, dim=1, shape=(batch + 1,), dtypes=_INT_DTYPES, device=device)
    _check_tensor(op, "positions", positions, dim=1, shape=(num_rows,), dtypes=_INT_DTYPES, device=device)
    _check_tensor(op, "keep", keep, dim=1, shape=(num_rows,), dtypes=_KEEP_DTYPES, device=device)


def _check_window_commit_data(window, rows, cu, positions, keep):
    op = "window_commit"
    num_rows = rows.shape[0]
    _check_offsets(op, "cu", cu, num_rows, "rows.size(0)")
    pos = positions.cpu().to(torch.int64)
    bad = (keep.cpu() != 0) & (pos < 0)
    if bad.any():
        t = _first_bad(bad)[0]
        _fail(op, f"positions[{t}] = {int(pos[t])} is negative for a kept row")


# --------------------------------------------------------------------------- state_select


def state_select(
    states: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Copy the recurrent state of each request's accepted step: ``out[b] = states[b, index[b]]``.

    ``states`` holds one state per verified step (SSM / linear-attention state after
    each window position); ``index[b]`` is the step to keep (e.g. ``num_accept[b] - 1``).
    ``index[b] = -1`` is padding and leaves ``out[b]`` untouched; any other index
    outside ``[0, S)`` is an error on the CPU (and on CUDA under ``DSPARK_DEBUG=1``),
    otherwise skipped on CUDA.

    Args:
        states: ``[B, S, *state]`` any dtype, dense state (dims 2.. contiguous).
        index: ``[B]`` int32/int64.
        out: ``[B, *state]`` same dtype, dense state; modified in place.
        backend: "reference" | "cpu" | "cuda" | "nvrtc" | None.

    Returns:
        ``out`` (the same tensor).

    Example:

    >>> import torch, dspark_kernels as dk
    >>> states = torch.arange(6.0).reshape(2, 3, 1)
    >>> dk.state_select(states, torch.tensor([2, -1]), torch.zeros(2, 1)).flatten().tolist()
    [2.0, 0.0]
    """
    _registry.dispatch(STATE_SELECT, backend, states, index, out)
    return out


def _check_state_select(states, index, out):
    op = "state_select"
    _check_tensor(op, "states", states)
    device = states.device
    if states.dim() < 2:
        _fail(op, f"states must be [B, S, *state] (at least 2-D), got shape {tuple(states.shape)}")
    batch = states.shape[0]
    _check_tensor(op, "index", index, dim=1, shape=(batch,), dtypes=_INT_DTYPES, device=device)
    _check_tensor(op, "out", out, shape=(batch, *states.shape[2:]), dtypes=(states.dtype,), device=device)
    if not _dense_from(states, 2):
        _fail(op, f"states must have a dense state (dims 2.. contiguous), got strides {states.stride()}")
    if not _dense_from(out, 1):
        _fail(op, f"out must have a dense state (dims 1.. contiguous), got strides {out.stride()}")


def _check_state_select_data(states, index, out):
    idx = index.cpu().to(torch.int64)
    bad = (idx != -1) & ((idx < 0) | (idx >= states.shape[1]))
    if bad.any():
        b = _first_bad(bad)[0]
        _fail("state_select", f"index[{b}] = {int(idx[b])} is outside [0, S) with S = states.size(1) = "
                              f"{states.shape[1]} (-1 = leave out[{b}] as it is)")


# --------------------------------------------------------------------------- declarations


def _kv_commit_fake(caches, block_table, page_size, committed_len, accept_path, num_accept):
    return committed_len.new_empty(committed_len.shape, dtype=torch.int32)


def _kv_release_pages_fake(block_table, new_len, old_len, page_size, refcount):
    return (block_table.new_empty(block_table.shape, dtype=torch.int32),
            block_table.new_empty(block_table.shape[:1], dtype=torch.int32))


def _no_output_fake(*args):
    return None


_KV_CPP = frozenset({"CPU", "CUDA"})  # pure data movement: C++ kernels, no Triton

KV_COMMIT = _registry.declare(_registry.OpSpec(
    schema="kv_commit(Tensor(a!)[] caches, Tensor block_table, int page_size, Tensor committed_len, "
           "Tensor accept_path, Tensor num_accept) -> Tensor",
    fake=_kv_commit_fake, reference=".reference.kv:kv_commit", check=_check_kv_commit,
    check_data=_check_kv_commit_data, cpp=_KV_CPP, device_arg="block_table", nvrtc=".nvrtc.ops:kv_commit",
))
KV_RELEASE_PAGES = _registry.declare(_registry.OpSpec(
    schema="kv_release_pages(Tensor block_table, Tensor new_len, Tensor old_len, int page_size, "
           "Tensor(a!) refcount) -> (Tensor freed, Tensor num_freed)",
    fake=_kv_release_pages_fake, reference=".reference.kv:kv_release_pages", check=_check_kv_release_pages,
    check_data=_check_kv_release_pages_data, cpp=_KV_CPP, nvrtc=".nvrtc.ops:kv_release_pages",
))
WINDOW_COMMIT = _registry.declare(_registry.OpSpec(
    schema="window_commit(Tensor(a!) window, Tensor rows, Tensor cu, Tensor positions, Tensor keep) -> ()",
    fake=_no_output_fake, reference=".reference.kv:window_commit", check=_check_window_commit,
    check_data=_check_window_commit_data, cpp=_KV_CPP, nvrtc=".nvrtc.ops:window_commit",
))
STATE_SELECT = _registry.declare(_registry.OpSpec(
    schema="state_select(Tensor states, Tensor index, Tensor(a!) out) -> ()",
    fake=_no_output_fake, reference=".reference.kv:state_select", check=_check_state_select,
    check_data=_check_state_select_data, cpp=_KV_CPP, nvrtc=".nvrtc.ops:state_select",
))
