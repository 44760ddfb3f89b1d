"""Compile the drafting Triton kernels (schedule_verify_lens, draft_sample_block) for
sm_90 ahead of time, without a GPU.

    python python_tests/aot_compile_drafting.py [--arch 90]

The interpreter accepts programs the compiler rejects; this runs Triton's full
lowering (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for the
launch configurations the wrappers pick on a GPU, with the specialisations the JIT
applies at run time (an int argument equal to 1 becomes a constexpr: every such
argument is compiled both ways where the kernel's code depends on it). Prints shared
memory, registers and spills per kernel; exits 1 if one fails to compile or
spills (more than 64 bytes of stack).
test_draft_sample_block.py runs it (marked slow). TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aot_triton import compile_and_measure, main as aot_main  # noqa: E402  (this folder is sys.path[0])
from dspark_kernels.triton import draft_sample_block as dsb  # noqa: E402
from dspark_kernels.triton import schedule_verify_lens as svl  # noqa: E402


def compile_one(target, fn, types: dict, consts: dict, warps: int, stages: int = 2) -> tuple[bool, str]:
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    missing = [n for n in fn.arg_names if sig[n] == "constexpr" and n not in consts]
    if missing:
        return False, f"no type or value for {missing}"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    # a few bytes of stack are locals, not a spill worth failing on
    return compile_and_measure(target, fn, sig, consts, attrs, warps, stages, max_stack_bytes=64,
                               max_error_chars=3000)


def _ints(names, ones=()):
    """Types of int arguments: i32, or constexpr 1 for those in ``ones``."""
    types, consts = {}, {}
    for n in names:
        if n in ones:
            consts[n] = 1
        else:
            types[n] = "i32"
    return types, consts


def jobs():
    out = []
    # ---- schedule_verify_lens
    for ones in ((), ("R", "GAMMA")):
        t, c = _ints(("stride_r", "stride_j", "R", "GAMMA"), ones + ("stride_j",))
        out.append((f"schedule survival ones={ones}", svl._survival_kernel,
                    dict(conf_ptr="*fp32", key_ptr="*i64", q_ptr="*i64", **t), dict(BLOCK_R=64, **c), 4))
        for early in (True, False):
            t, c = _ints(("n", "R", "KMAX"), ones and ("R", "KMAX"))
            out.append((f"schedule rank early={early} ones={bool(ones)}", svl._rank_kernel,
                        dict(key_ptr="*i64", q_ptr="*i64", sps_ptr="*fp64", rank_ptr="*i32", part_k_ptr="*i64",
                             part_theta_ptr="*fp64", **t), dict(EARLY_STOP=early, BLOCK_E=64, BLOCK_T=64, **c), 4))
            t, c = _ints(("num_parts", "R", "GAMMA", "KMAX"), ones and ("num_parts", "R", "GAMMA", "KMAX"))
            out.append((f"schedule finish early={early} ones={bool(ones)}", svl._finish_kernel,
                        dict(rank_ptr="*i32", sps_ptr="*fp64", part_k_ptr="*i64", part_theta_ptr="*fp64",
                             lens_ptr="*i32", cu_ptr="*i32", **t),
                        dict(EARLY_STOP=early, BLOCK_P=128, BLOCK_R=256, BLOCK_G=16, **c), 4))
    # ---- draft_sample_block
    for dt in ("bf16", "fp32"):
        for has_topk, has_topp, has_minp in ((True, True, True), (True, False, False), (False, False, True)):
            t, c = _ints(("sx0", "sx1", "sx2", "V", "ROWS_PER_B"), ("sx2",))
            out.append((f"draft threshold {dt} topk={has_topk} topp={has_topp} minp={has_minp}",
                        dsb._threshold_kernel,
                        dict(x_ptr="*" + dt, temp_ptr="*fp32", topk_ptr="*i32", topp_ptr="*fp32", thr_ptr="*fp32",
                             lmp_ptr="*fp32", **t),
                        dict(HAS_TOPK=has_topk, HAS_TOPP=has_topp, HAS_MINP=has_minp, BLOCK=256, RADIX_BITS=4, **c),
                        8))
        for split in (True, False):
            for ones in (("sx2",), ("sx2", "ROWS_PER_B", "k0", "GAMMA")):
                t, c = _ints(("sx0", "sx1", "sx2", "NUM_ROWS", "V", "GAMMA", "ROWS_PER_B", "k0", "S",
                              "chunks_per_split"), ones)
                out.append((f"draft race {dt} split={split} ones={ones}", dsb._race_kernel,
                            dict(x_ptr="*" + dt, logits_out_ptr="*fp32", tokens_ptr="*i32", temp_ptr="*fp32",
                                 thr_ptr="*fp32", seed_ptr="*i64", offset_ptr="*i64", pv_ptr="*fp32", pi_ptr="*i32",
                                 cnt_ptr="*i32", **t),
                            dict(HAS_TEMP=True, HAS_FILTER=True, WRITE_LOGITS=True, SPLIT=split, BLOCK_R=4, BV=512,
                                 S_BLOCK=512, **c), 4))
        for race in (True, False):
            for ones in (("s11", "s21", "sb2"), ("s11", "s21", "sb2", "k", "B"), ("sb2", "s10", "s21", "GAMMA")):
                t, c = _ints(("sb0", "sb1", "sb2", "s10", "s11", "s20", "s21", "sl0", "sl1", "B", "V", "RANK",
                              "GAMMA", "k", "S", "chunks_per_split"), ones)
                out.append((f"draft markov {dt} race={race} ones={ones}", dsb._markov_kernel,
                            dict(base_ptr="*" + dt, w1_ptr="*" + dt, w2_ptr="*" + dt, anchor_ptr="*i32",
                                 tokens_ptr="*i32", logits_ptr="*fp32", temp_ptr="*fp32", seed_ptr="*i64",
                                 offset_ptr="*i64", pv_ptr="*fp32", pi_ptr="*i32", cnt_ptr="*i32", **t),
                            dict(HAS_TEMP=True, WRITE_LOGITS=True, DO_RACE=race, DOT_IEEE=dt == "fp32", BLOCK_B=16,
                                 BV=128, BLOCK_K=64, S_BLOCK=512, **c), 8))
    return out


def main(argv=None) -> int:
    return aot_main(__doc__.splitlines()[0], jobs, compile_one, argv)


if __name__ == "__main__":
    sys.exit(main())
