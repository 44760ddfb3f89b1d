"""Compile the verify_tree Triton kernel for sm_90 ahead of time, without a GPU.

    python python_tests/aot_compile_verify_tree.py [--arch 90]

Triton's full lowering (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for the launch
configuration the wrapper picks on a GPU, for every draft kind and filter combination,
with a unit column stride specialised to a constexpr 1 and not. Exits 1 if a variant
fails to compile or spills more than 256 bytes of stack. TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aot_triton import compile_and_measure, main as aot_main  # noqa: E402
from dspark_kernels.triton import verify_tree as vt  # noqa: E402

_INTS = ("t_stride_row", "t_stride_col", "d_stride_row", "d_stride_col", "num_drafts", "V", "W", "max_depth",
         "num_q_rows")
_PTRS = dict(t_ptr="*{dt}", d_ptr="*{dt}", drafts_ptr="*i32", parents_ptr="*i32", cu_ptr="*i32", temp_ptr="*fp32",
             topk_ptr="*i32", topp_ptr="*fp32", seed_ptr="*i64", offset_ptr="*i64", ws_ptr="*fp32",
             path_ptr="*i32", num_acc_ptr="*i32", out_ptr="*i32", lmp_ptr="*fp32", didx_ptr="*i64")


def compile_one(target, fn, types: dict, consts: dict, warps: int, stages: int = 2) -> tuple[bool, str]:
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    missing = [n for n in fn.arg_names if sig[n] == "constexpr" and n not in consts]
    if missing:
        return False, f"no type or value for {missing}"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    return compile_and_measure(target, fn, sig, consts, attrs, warps, stages, max_stack_bytes=256)


def jobs():
    out = []
    for dt in ("fp32", "bf16"):
        for kind in (0, 1, 2):
            for has_temp, has_topk, has_topp in ((False, False, False), (True, False, False), (True, True, True)):
                for unit in (False, True):
                    types = {n: "i32" for n in _INTS}
                    consts = {}
                    if unit:
                        for n in ("t_stride_col", "d_stride_col"):
                            types.pop(n)
                            consts[n] = 1
                    types.update({k: v.format(dt=dt) for k, v in _PTRS.items()})
                    # min_p and draft_index ride with the filtered variants
                    consts.update(KIND=kind, HAS_TEMP=has_temp, HAS_TOPK=has_topk, HAS_TOPP=has_topp, BLOCK=256,
                                  BLOCK4=64, BLOCK_W=16, RADIX_BITS=4, HAS_MINP=has_topp,
                                  HAS_DIDX=has_topp and kind != 0)
                    out.append((f"tree {dt} kind={kind} temp={has_temp} filters={has_topk} unit={unit}",
                                vt._tree_kernel, types, consts, 8))
    return out


def main(argv=None) -> int:
    return aot_main(__doc__.splitlines()[0], jobs, compile_one, argv)


if __name__ == "__main__":
    sys.exit(main())
