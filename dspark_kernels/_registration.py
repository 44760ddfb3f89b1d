"""Python-side registrations for the dspark ops.

* When the compiled extension is missing, the schemas are defined here (the same
  strings as csrc/ops.cpp) and the CPU key runs the reference, so
  `torch.ops.dspark.*` exists on every install.
* Fake (meta) kernels for every op: exact output shapes for torch.compile and
  CUDA-graph capture.
* When no CUDA C++ kernel was compiled but Triton is importable, the CUDA key
  runs the Triton kernel.
"""

from __future__ import annotations

import torch

from . import _backend

SCHEMAS = {
    "verify_block": (
        "verify_block(Tensor target_logits, Tensor draft_tokens, Tensor cu_num_draft, *, "
        "Tensor? draft_logits=None, Tensor? draft_probs=None, Tensor? temperature=None, "
        "Tensor? top_k=None, Tensor? top_p=None, Tensor seed, Tensor offset, SymInt max_num_draft) "
        "-> (Tensor output_tokens, Tensor num_accepted)"
    ),
    "random_words": "random_words(Tensor seed, Tensor position, Tensor index, int salt) -> Tensor",
    "kv_commit": (
        "kv_commit(Tensor(a!)[] caches, Tensor block_table, int page_size, Tensor committed_len, "
        "Tensor accept_path, Tensor num_accept) -> Tensor"
    ),
    "kv_release_pages": (
        "kv_release_pages(Tensor block_table, Tensor new_len, Tensor old_len, int page_size, "
        "Tensor(a!) refcount) -> (Tensor freed, Tensor num_freed)"
    ),
    "window_commit": "window_commit(Tensor(a!) window, Tensor rows, Tensor cu, Tensor positions, Tensor keep) -> ()",
    "state_select": "state_select(Tensor states, Tensor index, Tensor(a!) out) -> ()",
    "schedule_verify_lens": (
        "schedule_verify_lens(Tensor confidence, Tensor sps, bool early_stop=True) "
        "-> (Tensor verify_lens, Tensor cu_verify)"
    ),
    "draft_sample_block": (
        "draft_sample_block(Tensor base_logits, Tensor anchor, *, Tensor? markov_w1=None, "
        "Tensor? markov_w2=None, Tensor? temperature=None, Tensor? top_k=None, Tensor? top_p=None, "
        "Tensor seed, Tensor offset, bool return_logits=True) -> (Tensor draft_tokens, Tensor draft_logits)"
    ),
    "moe_align": (
        "moe_align(Tensor topk_ids, int num_experts, int block_m) "
        "-> (Tensor sorted_token_ids, Tensor expert_ids, Tensor num_tokens_post_pad)"
    ),
    "grouped_gemm": "grouped_gemm(Tensor a, Tensor w, Tensor expert_offsets) -> Tensor",
    "grouped_gemm_out": "grouped_gemm_out(Tensor a, Tensor w, Tensor expert_offsets, *, Tensor(a!) out) -> ()",
    "grouped_gemm_masked": "grouped_gemm_masked(Tensor a, Tensor w, Tensor masked_m) -> Tensor",
    "fused_moe": (
        "fused_moe(Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, *, "
        "str activation=\"silu\") -> Tensor"
    ),
    "fused_moe_fp8": (
        "fused_moe_fp8(Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, Tensor w13_scale, "
        "Tensor w2_scale, *, int[] block_shape=[128, 128], str activation=\"silu\") -> Tensor"
    ),
    "draft_block_attention": (
        "draft_block_attention(Tensor q, Tensor k_block, Tensor v_block, Tensor k_ctx, Tensor v_ctx, "
        "Tensor cu_block, Tensor ctx_lens, *, Tensor? sinks=None, float? softmax_scale=None, "
        "int? window=None, SymInt max_block_len) -> Tensor"
    ),
}

_lib_def = None
_lib_impl = torch.library.Library("dspark", "FRAGMENT")


def _define_missing_schemas() -> None:
    global _lib_def
    for name, schema in SCHEMAS.items():
        if not _backend.HAS_EXTENSION:
            if _lib_def is None:
                _lib_def = torch.library.Library("dspark", "DEF")
            _lib_def.define(schema)
        elif name not in _backend.COMPILED:  # an extension built before this op existed
            _lib_impl.define(schema)


def _verify_block_fake(target_logits, draft_tokens, cu_num_draft, draft_logits=None, draft_probs=None,
                       temperature=None, top_k=None, top_p=None, seed=None, offset=None, max_num_draft=0):
    batch = cu_num_draft.shape[0] - 1
    out = target_logits.new_empty((batch, max_num_draft + 1), dtype=torch.int32)
    return out, target_logits.new_empty((batch,), dtype=torch.int32)


def _random_words_fake(seed, position, index, salt):
    return seed.new_empty(seed.shape, dtype=torch.int64)


def _register() -> None:
    _define_missing_schemas()
    torch.library.register_fake("dspark::verify_block", _verify_block_fake, lib=_lib_impl)
    torch.library.register_fake("dspark::random_words", _random_words_fake, lib=_lib_impl)
    if not _backend.HAS_EXTENSION:
        from .reference.philox import random_words as ref_random_words
        from .reference.verify_block import verify_block as ref_verify_block

        _lib_impl.impl("verify_block", ref_verify_block, "CPU")
        _lib_impl.impl("random_words", lambda s, p, i, salt: ref_random_words(s, p, salt, i), "CPU")
    if not _backend.CUDA_COMPILED and _backend.triton_available() and torch.cuda.is_available():
        from .triton.verify_block import verify_block as triton_verify_block

        _lib_impl.impl("verify_block", triton_verify_block, "CUDA")
    _register_drafting()
    _register_kv()
    _register_moe()
    _register_attention()


def _register_drafting() -> None:
    """schedule_verify_lens / draft_sample_block: fakes; the reference on the CPU key and
    Triton on the CUDA key wherever the extension has no kernel for the op."""
    from . import drafting

    torch.library.register_fake("dspark::schedule_verify_lens", drafting._schedule_verify_lens_fake, lib=_lib_impl)
    torch.library.register_fake("dspark::draft_sample_block", drafting._draft_sample_block_fake, lib=_lib_impl)
    for name in ("schedule_verify_lens", "draft_sample_block"):
        kernels = _backend.COMPILED.get(name, set())
        if "CPU" not in kernels:
            _lib_impl.impl(name, drafting._reference_impl(name), "CPU")
        if "CUDA" not in kernels and _backend.triton_available() and torch.cuda.is_available():
            _lib_impl.impl(name, drafting._triton_impl(name), "CUDA")


def _register_kv() -> None:
    """kv_commit / kv_release_pages / window_commit / state_select: fakes; the reference
    on the CPU and CUDA keys wherever the extension has no kernel for the op."""
    from . import kv

    for name in kv.OPS:
        torch.library.register_fake(f"dspark::{name}", kv.FAKES[name], lib=_lib_impl)
        kernels = _backend.COMPILED.get(name, set())
        for key in ("CPU", "CUDA"):
            if key not in kernels and (key == "CPU" or torch.cuda.is_available()):
                _lib_impl.impl(name, kv.REFERENCE[name], key)


def _register_moe() -> None:
    """moe_align / grouped_gemm(_out) / grouped_gemm_masked / fused_moe / fused_moe_fp8:
    fakes (exact shapes); the PyTorch cpu backend on the CPU key and Triton on the CUDA
    key wherever the extension has no kernel for the op (it has none: see
    dspark_kernels/moe.py).

    fp8 weights are a separate op, ``fused_moe_fp8``, rather than optional scale
    arguments on ``fused_moe``: a schema is defined once, by the extension when it
    has the op, and an extension built before the change (the prebuilt in-place
    ``_C.abi3.so``) would keep the old ``fused_moe`` schema, which has no scale
    arguments and cannot be redefined from Python. A new op name is simply defined
    here when the extension lacks it, so both old and fresh builds work; the public
    ``dspark_kernels.fused_moe`` takes the scales and picks the op."""
    from . import moe
    from .reference.moe import align_sizes

    def moe_align_fake(topk_ids, num_experts, block_m):
        length, num_blocks = align_sizes(topk_ids.numel(), num_experts, block_m)
        i32 = dict(dtype=torch.int32)
        return (topk_ids.new_empty((length,), **i32), topk_ids.new_empty((num_blocks,), **i32),
                topk_ids.new_empty((1,), **i32))

    fakes = {
        "moe_align": moe_align_fake,
        "grouped_gemm": lambda a, w, expert_offsets: a.new_empty((a.shape[0], w.shape[1])),
        "grouped_gemm_out": lambda a, w, expert_offsets, out: None,
        "grouped_gemm_masked": lambda a, w, masked_m: a.new_empty((a.shape[0], a.shape[1], w.shape[1])),
        "fused_moe": lambda x, w13, w2, topk_weights, topk_ids, activation="silu": x.new_empty(
            (x.shape[0], w2.shape[1])),
        "fused_moe_fp8": lambda x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape=(128, 128),
        activation="silu": x.new_empty((x.shape[0], w2.shape[1])),
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"dspark::{name}", fake, lib=_lib_impl)
        kernels = _backend.COMPILED.get(name, set())
        if "CPU" not in kernels:
            _lib_impl.impl(name, getattr(moe, f"{name}_cpu"), "CPU")
        if "CUDA" not in kernels and _backend.triton_available() and torch.cuda.is_available():
            _lib_impl.impl(name, getattr(moe, f"{name}_triton"), "CUDA")


def _register_attention() -> None:
    """draft_block_attention: fake (out = q's shape, contiguous); PyTorch SDPA on the CPU
    key and Triton on the CUDA key wherever the extension has no kernel (it has none)."""
    from . import attention

    name = "draft_block_attention"
    torch.library.register_fake(f"dspark::{name}", attention._op_fake, lib=_lib_impl)
    kernels = _backend.COMPILED.get(name, set())
    if "CPU" not in kernels:
        _lib_impl.impl(name, attention._op_cpu, "CPU")
    if "CUDA" not in kernels and _backend.triton_available() and torch.cuda.is_available():
        _lib_impl.impl(name, attention._op_cuda, "CUDA")


_register()
