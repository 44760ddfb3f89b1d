"""The NVRTC implementations of the ops with CUDA C++ device code.

Each function is the Python twin of ``csrc/cuda/<op>.cu``: the same kernels
(compiled through NVRTC from the same headers), the same launch plans
(:mod:`.plans`, i.e. ``dspark/launch.h``), the same parameter blocks (ctypes
mirrors of the header structs, :func:`._source.struct`), workspaces from torch's
allocator, launches on the current stream, no host sync. Arguments arrive checked
(the registry runs the op's checks first); the checks here are the CUDA-only
limits the C++ launchers add.
"""

from __future__ import annotations

import ctypes

import torch

from . import _driver, _programs, plans
from ._source import struct

_TAG = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _on_device(index: int):
    """The tensors' device current for the driver calls (its primary context is torch's)."""
    return torch.cuda.device(index)


def _tag(op: str, name: str, t: torch.Tensor) -> str:
    tag = _TAG.get(t.dtype)
    if tag is None:
        raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    return tag


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _int_array(ns: str, t: torch.Tensor | None):
    a = struct(f"{ns}.IntArray")()
    if t is not None:
        a.ptr = t.data_ptr()
        a.is_int64 = 1 if t.dtype == torch.int64 else 0
    return a


def _vector_bytes(bits: int) -> int:  # kv_rules.h vector_bytes
    for w in (16, 8, 4, 2):
        if bits % w == 0:
            return w
    return 1


def _row_bytes(t: torch.Tensor, first_dim: int) -> int:  # kv.h kvcheck::row_bytes
    n = t.element_size()
    for d in range(first_dim, t.dim()):
        n *= t.size(d)
    return n


def _unit_col(t: torch.Tensor) -> torch.Tensor:
    """2-D index tensors: unit column stride (row stride free), as the C++ launchers."""
    return t if t.size(1) <= 1 or t.stride(1) == 1 else t.contiguous()


# ---------------------------------------------------------------------- random_words

def random_words(seed, position, index, salt):
    dev = seed.device.index
    s = seed.to(torch.int64).contiguous()
    p = position.to(torch.int64).contiguous()
    i = index.to(torch.int64).contiguous()
    out = torch.empty(seed.shape, dtype=torch.int64, device=seed.device)
    n = out.numel()
    if n == 0:
        return out
    with _on_device(dev):
        fn = _driver.functions(_programs.fixed()["random_words"], dev)["dspark::rw::random_words_kernel"]
        args = [ctypes.c_void_p(s.data_ptr()), ctypes.c_void_p(p.data_ptr()), ctypes.c_void_p(i.data_ptr()),
                ctypes.c_uint32(salt), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(n)]
        _driver.launch(fn, plans.random_words_blocks(n), plans.C()["rw.kThreads"], 0, args, dev)
    return out


# ---------------------------------------------------------------------- schedule_verify_lens

def schedule_verify_lens(confidence, sps, early_stop=True):
    dev = confidence.device.index
    R, gamma = confidence.shape
    n = R * gamma
    max_admit = plans.schedule_max_admit(R, gamma, sps.size(0) - 1)
    conf = confidence if confidence.dtype == torch.float32 else confidence.to(torch.float32)
    table = sps.to(torch.float64).contiguous()
    verify_lens = torch.empty(R, dtype=torch.int32, device=confidence.device)
    cu_verify = torch.empty(R + 1, dtype=torch.int32, device=confidence.device)
    w = plans.schedule_workspace(R, gamma)
    ws = torch.empty(w["bytes"], dtype=torch.uint8, device=confidence.device)
    base = ws.data_ptr()
    keys, quant, part_count, part_theta, rank = (ctypes.c_void_p(base + w[k]) for k in
                                                 ("keys", "quant", "part_count", "part_theta", "rank"))
    threads = plans.C()["sched.kThreads"]
    es = ctypes.c_int(1 if early_stop else 0)
    with _on_device(dev):
        fns = _driver.functions(_programs.fixed()["schedule_verify_lens"], dev)
        if n > 0:
            _driver.launch(fns["dspark::sched::survival_kernel"], plans.ceil_div(R, threads), threads, 0,
                           [ctypes.c_void_p(conf.data_ptr()), ctypes.c_int64(conf.stride(0)),
                            ctypes.c_int64(conf.stride(1)), ctypes.c_int64(R), ctypes.c_int64(gamma), keys, quant],
                           dev)
            _driver.launch(fns["dspark::sched::rank_kernel"], w["num_parts"], threads, 0,
                           [keys, quant, ctypes.c_void_p(table.data_ptr()), ctypes.c_int64(n), ctypes.c_int64(R),
                            ctypes.c_int64(max_admit), es, rank, part_count, part_theta], dev)
        _driver.launch(fns["dspark::sched::finish_kernel"], 1, plans.C()["sched.kFinishThreads"], 0,
                       [rank, ctypes.c_void_p(table.data_ptr()), part_count, part_theta,
                        ctypes.c_int64(w["num_parts"]), ctypes.c_int64(R), ctypes.c_int64(gamma),
                        ctypes.c_int64(max_admit), es, ctypes.c_void_p(verify_lens.data_ptr()),
                        ctypes.c_void_p(cu_verify.data_ptr())], dev)
    return verify_lens, cu_verify


# ---------------------------------------------------------------------- verify_block

def _check_vocab_stride(op, t, name):
    if t.size(1) > 1 and t.stride(1) != 1:
        raise ValueError(f"{op}: {name} must have stride 1 along the vocabulary (rows may be strided), got strides "
                         f"{tuple(t.stride())} for shape {tuple(t.shape)}; pass {name}.contiguous()")


def _rows_vectorizable(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _min_p_and_draft_index(min_p, draft_index):
    """min_p as fp32 (the kernels take log min_p themselves), draft_index as given (its range
    check is the registry's check_data, under DSPARK_DEBUG=1 on CUDA tensors)."""
    min_p_c = min_p.to(torch.float32).contiguous() if min_p is not None else None
    draft_index_c = draft_index.contiguous() if draft_index is not None else None
    return min_p_c, draft_index_c


def verify_block(target_logits, draft_tokens, cu_num_draft, draft_logits=None, draft_probs=None, temperature=None,
                 top_k=None, top_p=None, seed=None, offset=None, max_num_draft=0, method="token", min_p=None,
                 draft_index=None):
    op = "verify_block"
    if method not in ("token", "block"):
        raise ValueError(f'{op}: method must be "token" or "block", got {method!r}')
    dev = target_logits.device.index
    B = cu_num_draft.size(0) - 1
    N = draft_tokens.size(0)
    V = target_logits.size(1)
    T = N + B
    draft_dist = draft_logits if draft_logits is not None else draft_probs
    draft_name = "draft_logits" if draft_logits is not None else "draft_probs"
    _check_vocab_stride(op, target_logits, "target_logits")
    if draft_dist is not None:
        _check_vocab_stride(op, draft_dist, draft_name)
    sampling = temperature is not None
    q_stats = sampling and draft_logits is not None
    with_filters = sampling and (top_k is not None or top_p is not None or min_p is not None)
    block = method == "block" and sampling
    plan = plans.verify_block_plan(B, N, V, sampling, q_stats, with_filters, block)
    c = plans.C()
    if plan["num_splits"] > c["vb.kMaxGridY"] or plan["num_race_splits"] > c["vb.kMaxGridY"]:
        raise ValueError(f"{op}: vocabulary too large for the CUDA kernel, V = {V} > "
                         f"{c['vb.kMaxGridY'] * c['vb.kRaceSplit']}")
    if plan["stat_rows"] > 2**31 - 1 or B > 2**31 - 1:
        raise ValueError(f"{op}: too many rows for the CUDA kernel ({plan['stat_rows']})")
    device = target_logits.device
    output_tokens = torch.full((B, max_num_draft + 1), -1, dtype=torch.int32, device=device)
    num_accepted = torch.empty(B, dtype=torch.int32, device=device)
    if B == 0:
        return output_tokens, num_accepted
    tt = _tag(op, "target_logits", target_logits)
    dt = _tag(op, draft_name, draft_dist) if draft_dist is not None else "F32"
    drafts_c, cu_c = draft_tokens.contiguous(), cu_num_draft.contiguous()
    seed_c, offset_c = seed.contiguous(), offset.contiguous()
    temp_c = temperature.to(torch.float32).contiguous() if temperature is not None else None
    top_k_c = top_k.contiguous() if top_k is not None else None
    top_p_c = top_p.to(torch.float32).contiguous() if top_p is not None else None
    min_p_c, draft_index_c = _min_p_and_draft_index(min_p, draft_index)
    workspace = torch.empty(plan["bytes"], dtype=torch.uint8, device=device)
    ws = workspace.data_ptr()

    p = struct("vb.Params")()
    p.target = target_logits.data_ptr()
    p.target_stride = target_logits.stride(0)
    p.target_vec = 1 if _rows_vectorizable(target_logits) else 0
    p.draft = _ptr(draft_dist)
    p.draft_stride = draft_dist.stride(0) if draft_dist is not None else 0
    p.draft_vec = 1 if draft_dist is not None and _rows_vectorizable(draft_dist) else 0
    p.draft_kind = 1 if draft_logits is not None else (2 if draft_probs is not None else 0)  # vb::DraftKind
    p.draft_tokens = _int_array("vb", drafts_c)
    p.cu = _int_array("vb", cu_c)
    p.top_k = _int_array("vb", top_k_c)
    p.seed = _int_array("vb", seed_c)
    p.offset = _int_array("vb", offset_c)
    p.temperature = _ptr(temp_c)
    p.top_p = _ptr(top_p_c)
    p.min_p = _ptr(min_p_c)
    p.draft_index = _int_array("vb", draft_index_c)
    p.draft_rows = draft_dist.size(0) if draft_dist is not None else 0
    p.B, p.N, p.T, p.V, p.max_num_draft = B, N, T, V, max_num_draft
    p.num_splits = plan["num_splits"]
    p.num_race_splits = plan["num_race_splits"]
    p.partials = ws + plan["partials"]
    p.row_filter = ws + plan["row_filter"] if with_filters else None
    p.desc = ws + plan["desc"]
    p.race_partials = ws + plan["race_partials"] if sampling else None
    p.output_tokens = output_tokens.data_ptr()
    p.num_accepted = num_accepted.data_ptr()

    k = lambda name: f"dspark::vb::{name}<dspark::vb::{tt}, dspark::vb::{dt}>"  # noqa: E731
    stat_rows = plan["stat_rows"]
    with _on_device(dev):
        fns = _driver.functions(_programs.verify_block(tt, dt), dev)
        run = lambda name, grid, threads, arg: _driver.launch(fns[name], grid, c[threads], 0, [arg], dev)  # noqa: E731
        run(k("stats_kernel"), (stat_rows, p.num_splits), "vb.kStatsThreads", p)
        if sampling:  # the split masses against the row's max (step 1b, after the split maxima)
            run(k("mass_kernel"), (stat_rows, p.num_splits), "vb.kStatsThreads", p)
        if with_filters:
            run(k("filter_kernel"), stat_rows, "vb.kFilterThreads", p)
        if block:  # method="block" (verify_block_method.cuh): Z_j and the block walk replace the token walk
            bp = struct("vb.BlockParams")()
            bp.p = p
            bp.z = ws + plan["z"]
            if p.draft_kind != 0:
                run(k("block_z_kernel"), T, "vb.kBlockZThreads", bp)
            run(k("block_walk_kernel"), B, "vb.kBlockWalkThreads", bp)
        else:
            run(k("walk_kernel"), B, "vb.kWalkThreads", p)
        if sampling:
            run(k("race_kernel"), (B, p.num_race_splits), "vb.kRaceThreads", p)
            run("dspark::vb::finish_kernel", B, "vb.kFinishThreads", p)
    return output_tokens, num_accepted


# ---------------------------------------------------------------------- verify_tree

def verify_tree(target_logits, draft_tokens, parents, cu_num_draft, draft_logits=None, draft_probs=None,
                temperature=None, top_k=None, top_p=None, seed=None, offset=None, max_depth=0, min_p=None,
                draft_index=None):
    op = "verify_tree"
    dev = target_logits.device.index
    B = cu_num_draft.size(0) - 1
    N = draft_tokens.size(0)
    V = target_logits.size(1)
    if B > 2**31 - 1:
        raise ValueError(f"{op}: too many requests for the CUDA kernel ({B})")
    device = target_logits.device
    accept_path = torch.empty((B, max_depth + 1), dtype=torch.int32, device=device)
    output_tokens = torch.empty((B, max_depth + 1), dtype=torch.int32, device=device)
    num_accepted = torch.empty(B, dtype=torch.int32, device=device)
    if B == 0:
        return accept_path, num_accepted, output_tokens
    draft_dist = draft_logits if draft_logits is not None else draft_probs
    tt = _tag(op, "target_logits", target_logits)
    dt = _tag(op, "draft_logits" if draft_logits is not None else "draft_probs", draft_dist) \
        if draft_dist is not None else "F32"
    drafts_c, parents_c, cu_c = draft_tokens.contiguous(), parents.contiguous(), cu_num_draft.contiguous()
    seed_c, offset_c = seed.contiguous(), offset.contiguous()
    temp_c = temperature.to(torch.float32).contiguous() if temperature is not None else None
    top_k_c = top_k.contiguous() if top_k is not None else None
    top_p_c = top_p.to(torch.float32).contiguous() if top_p is not None else None
    min_p_c, draft_index_c = _min_p_and_draft_index(min_p, draft_index)
    sampling = temperature is not None
    workspace = torch.empty(plans.verify_tree_workspace_floats(B, V, sampling), dtype=torch.float32, device=device)

    p = struct("vt.Params")()
    p.target = target_logits.data_ptr()
    p.target_stride0, p.target_stride1 = target_logits.stride(0), target_logits.stride(1)
    p.draft = _ptr(draft_dist)
    p.draft_stride0 = draft_dist.stride(0) if draft_dist is not None else 0
    p.draft_stride1 = draft_dist.stride(1) if draft_dist is not None else 0
    p.draft_kind = 1 if draft_logits is not None else (2 if draft_probs is not None else 0)  # vt::DraftKind
    p.draft_tokens = _int_array("vt", drafts_c)
    p.parents = _int_array("vt", parents_c)
    p.cu = _int_array("vt", cu_c)
    p.top_k = _int_array("vt", top_k_c)
    p.seed = _int_array("vt", seed_c)
    p.offset = _int_array("vt", offset_c)
    p.temperature = _ptr(temp_c)
    p.top_p = _ptr(top_p_c)
    p.min_p = _ptr(min_p_c)
    p.draft_index = _int_array("vt", draft_index_c)
    p.draft_rows = draft_dist.size(0) if draft_dist is not None else 0
    p.B, p.N, p.V, p.max_depth = B, N, V, max_depth
    p.workspace = workspace.data_ptr() if sampling else None
    p.accept_path = accept_path.data_ptr()
    p.num_accepted = num_accepted.data_ptr()
    p.output_tokens = output_tokens.data_ptr()
    with _on_device(dev):
        name = f"dspark::vt::tree_kernel<dspark::vt::{tt}, dspark::vt::{dt}>"
        fn = _driver.functions(_programs.verify_tree(tt, dt), dev)[name]
        _driver.launch(fn, B, plans.C()["vt.kThreads"], 0, [p], dev)
    return accept_path, num_accepted, output_tokens


# ---------------------------------------------------------------------- kv ops

def _kv_functions(dev):
    return _driver.functions(_programs.fixed()["kv"], dev)


def kv_commit(caches, block_table, page_size, committed_len, accept_path, num_accept):
    op = "kv_commit"
    dev = block_table.device.index
    B, P = committed_len.size(0), block_table.size(1)
    W = accept_path.size(1)
    new_len = torch.empty(B, dtype=torch.int32, device=block_table.device)
    if B == 0:
        return new_len
    if B > 0x7FFFFFFF:
        raise ValueError(f"{op}: batch of {B} requests is too large for one grid")
    L, n = committed_len.contiguous(), num_accept.contiguous()
    bt, path = _unit_col(block_table), _unit_col(accept_path)
    p = struct("kv.CommitParams")()
    p.block_table = _int_array("kv", bt)
    p.committed_len = _int_array("kv", L)
    p.accept_path = _int_array("kv", path)
    p.num_accept = _int_array("kv", n)
    p.new_len = new_len.data_ptr()
    p.bt_stride, p.path_stride = bt.stride(0), path.stride(0)
    p.P, p.W = P, W
    p.num_pages = caches[0].size(0) if len(caches) else 0
    p.page_size, p.B = page_size, B
    max_row = max([_row_bytes(t, 2) for t in caches], default=0)
    if max_row > 0x7FFFFFFF:
        raise ValueError(f"{op}: a cache row of {max_row} bytes is too large")
    plan = plans.commit_plan(W, max_row)
    c = plans.C()
    name = "dspark::kv::commit_kernel"
    with _on_device(dev):
        fn = _kv_functions(dev)[name]
        if plan["smem"] > c["kv.kDefaultSmem"]:
            optin = torch.cuda.get_device_properties(dev).shared_memory_per_block_optin
            if plan["smem"] > optin:
                raise ValueError(f"{op}: accept_path is too wide for the CUDA kernel: W = {W} needs {plan['smem']} "
                                 f"bytes of shared memory, the device allows {optin}")
            _driver.allow_dynamic_smem(fn, name, dev, plan["smem"])
        if plan["tiles"] > 65535:
            raise ValueError(f"{op}: a cache row of {max_row} bytes needs {plan['tiles']} tiles of {plan['tile']} "
                             f"bytes, more than one grid allows (accept_path width W = {W})")
        p.tile_bytes = plan["tile"]
        C, per = len(caches), c["kv.kMaxCachesPerLaunch"]
        c0 = 0
        while c0 == 0 or c0 < C:
            count = min(per, C - c0)
            for i in range(count):
                t = caches[c0 + i]
                es = t.element_size()
                d = p.caches[i]
                d.base = t.data_ptr()
                d.page_stride, d.slot_stride = t.stride(0) * es, t.stride(1) * es
                d.row_bytes = _row_bytes(t, 2)
                d.vec = _vector_bytes(t.data_ptr() | d.page_stride | d.slot_stride | d.row_bytes)
            p.num_caches = max(count, 0)
            p.write_new_len = 1 if c0 == 0 else 0
            grid = (B, plan["tiles"] if p.num_caches > 0 else 1, max(p.num_caches, 1))
            _driver.launch(fn, grid, c["kv.kCommitThreads"], plan["smem"], [p], dev)
            c0 += per
    return new_len


def kv_release_pages(block_table, new_len, old_len, page_size, refcount):
    dev = block_table.device.index
    B, P = block_table.shape
    freed = torch.empty((B, P), dtype=torch.int32, device=block_table.device)
    num_freed = torch.empty(B, dtype=torch.int32, device=block_table.device)
    if B == 0:
        return freed, num_freed
    bt, nl, ol = _unit_col(block_table), new_len.contiguous(), old_len.contiguous()
    p = struct("kv.ReleaseParams")()
    p.block_table = _int_array("kv", bt)
    p.new_len = _int_array("kv", nl)
    p.old_len = _int_array("kv", ol)
    p.refcount = refcount.data_ptr()
    p.rc_is_int64 = 1 if refcount.dtype == torch.int64 else 0
    p.rc_stride = refcount.stride(0)
    p.freed, p.num_freed = freed.data_ptr(), num_freed.data_ptr()
    p.bt_stride, p.B, p.P = bt.stride(0), B, P
    p.num_pages, p.page_size = refcount.size(0), page_size
    with _on_device(dev):
        fn = _kv_functions(dev)["dspark::kv::release_kernel"]
        _driver.launch(fn, plans.release_blocks(B), plans.C()["kv.kReleaseWarps"] * 32, 0, [p], dev)
    return freed, num_freed


def window_commit(window, rows, cu, positions, keep):
    op = "window_commit"
    dev = window.device.index
    B, T = window.size(0), rows.size(0)
    row_bytes = _row_bytes(rows, 1)
    if B == 0 or T == 0 or row_bytes == 0:
        return
    if T > 0x7FFFFFFF:
        raise ValueError(f"{op}: {T} rows are too many for one grid")
    if row_bytes > 0x7FFFFFFF:
        raise ValueError(f"{op}: a row of {row_bytes} bytes is too large")
    cu_c, pos_c, keep_c = cu.contiguous(), positions.contiguous(), keep.contiguous()
    es = window.element_size()
    p = struct("kv.WindowParams")()
    p.window, p.rows = window.data_ptr(), rows.data_ptr()
    p.cu = _int_array("kv", cu_c)
    p.positions = _int_array("kv", pos_c)
    keep_flags = struct("kv.FlagArray")()
    keep_flags.ptr, keep_flags.elem_bytes = keep_c.data_ptr(), keep_c.element_size()
    p.keep = keep_flags
    p.window_stride0, p.window_stride1 = window.stride(0) * es, window.stride(1) * es
    p.rows_stride0 = rows.stride(0) * es
    p.B, p.W, p.T = B, window.size(1), T
    p.row_bytes = row_bytes
    p.vec = _vector_bytes(p.window | p.rows | p.window_stride0 | p.window_stride1 | p.rows_stride0 | row_bytes)
    with _on_device(dev):
        fn = _kv_functions(dev)["dspark::kv::window_commit_kernel"]
        _driver.launch(fn, T, plans.C()["kv.kWindowThreads"], 0, [p], dev)


def state_select(states, index, out):
    op = "state_select"
    dev = states.device.index
    B = states.size(0)
    row_bytes = _row_bytes(out, 1)
    if B == 0 or row_bytes == 0:
        return
    if B > 0x7FFFFFFF:
        raise ValueError(f"{op}: batch of {B} requests is too large for one grid")
    tiles = plans.state_tiles(row_bytes)
    if tiles > 65535:
        raise ValueError(f"{op}: a state of {row_bytes} bytes is too large for one grid")
    idx = index.contiguous()
    es = states.element_size()
    p = struct("kv.StateParams")()
    p.states, p.out = states.data_ptr(), out.data_ptr()
    p.index = _int_array("kv", idx)
    p.states_stride0, p.states_stride1 = states.stride(0) * es, states.stride(1) * es
    p.out_stride0 = out.stride(0) * es
    p.S, p.row_bytes = states.size(1), row_bytes
    p.vec = _vector_bytes(p.states | p.out | p.states_stride0 | p.states_stride1 | p.out_stride0 | row_bytes)
    with _on_device(dev):
        fn = _kv_functions(dev)["dspark::kv::state_select_kernel"]
        _driver.launch(fn, (B, tiles), plans.C()["kv.kStateThreads"], 0, [p], dev)
