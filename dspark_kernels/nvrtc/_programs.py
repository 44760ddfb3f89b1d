"""The NVRTC programs: one translation unit per op (per dtype pair for the logits
ops, so a call compiles only what it runs), each the include of the op's header
and the kernels it exports. The same headers the compiled extension's
csrc/cuda/<op>.cu include."""

from __future__ import annotations

import functools
import itertools

from ._compiler import Program

FLOAT_TAGS = ("F32", "F16", "BF16")  # vb::F32 ... / vt::F32 ...


def _program(name: str, header: str, kernels: list[str]) -> Program:
    return Program(name, f'#include "dspark/{header}"\n', tuple(kernels))


def verify_block(tt: str, dt: str) -> Program:
    targs = f"<dspark::vb::{tt}, dspark::vb::{dt}>"
    kernels = [f"dspark::vb::{k}{targs}" for k in
               ("stats_kernel", "mass_kernel", "filter_kernel", "walk_kernel", "race_kernel", "block_z_kernel",
                "block_walk_kernel")]
    return _program(f"verify_block_{tt}_{dt}", "verify_block_method.cuh", kernels + ["dspark::vb::finish_kernel"])


def verify_tree(tt: str, dt: str) -> Program:
    return _program(f"verify_tree_{tt}_{dt}", "verify_tree.cuh",
                    [f"dspark::vt::tree_kernel<dspark::vt::{tt}, dspark::vt::{dt}>"])


@functools.cache
def fixed() -> dict[str, Program]:
    """The programs without a dtype: {"random_words" | "schedule_verify_lens" | "kv": Program}."""
    return {
        "random_words": _program("random_words", "random_words.cuh", ["dspark::rw::random_words_kernel"]),
        "schedule_verify_lens": _program("schedule_verify_lens", "schedule_verify_lens.cuh",
                                         [f"dspark::sched::{k}" for k in ("survival_kernel", "rank_kernel",
                                                                          "finish_kernel")]),
        # One program for the four kv ops: their kernels are file-static in kv.cuh, so
        # every translation unit including it emits all four anyway.
        "kv": _program("kv", "kv.cuh", [f"dspark::kv::{k}" for k in ("commit_kernel", "release_kernel",
                                                                     "window_commit_kernel", "state_select_kernel")]),
    }


def all_programs() -> list[Program]:
    """Every program the NVRTC backend may compile (what `python -m dspark_kernels.nvrtc compile` builds)."""
    pairs = list(itertools.product(FLOAT_TAGS, FLOAT_TAGS))
    return (list(fixed().values()) + [verify_block(t, d) for t, d in pairs] + [verify_tree(t, d) for t, d in pairs])


OPS = ("verify_block", "verify_tree", "random_words", "schedule_verify_lens", "kv_commit", "kv_release_pages",
       "window_commit", "state_select")
