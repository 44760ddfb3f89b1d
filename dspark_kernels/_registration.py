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


_register()
