"""Compile verify_block's block-method Triton kernel (``_decide_block_kernel``) for
sm_90 ahead of time, without a GPU.

    python python_tests/aot_compile_verify_block_method.py [--arch 90]

Every draft kind (point mass, logits, probs) with and without filters, bf16 rows,
unit column strides (as the JIT specialises them). Prints shared memory, registers
and stack per variant; exits 1 if one fails to compile or spills. TRITON_INTERPRET
must be unset (this script unsets it).
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aot_triton import compile_and_measure, main as aot_main  # noqa: E402  (this folder is sys.path[0])
from dspark_kernels.triton import verify_block_method as vbm  # noqa: E402

_PTRS = dict(t_ptr="*bf16", d_ptr="*bf16", drafts_ptr="*i32", cu_ptr="*i32", temp_ptr="*fp32", topk_ptr="*i32",
             topp_ptr="*fp32", seed_ptr="*i64", offset_ptr="*i64", t_ws_max_ptr="*fp32", t_ws_arg_ptr="*i32",
             t_ws_m_ptr="*fp32", t_ws_sum_ptr="*fp32", t_thr_ptr="*fp32", t_lse_ptr="*fp32", d_ws_m_ptr="*fp32",
             d_ws_sum_ptr="*fp32", d_thr_ptr="*fp32", d_lse_ptr="*fp32", out_ptr="*i32", num_acc_ptr="*i32")
_INTS = ("t_stride_row", "num_target_rows", "d_stride_row", "num_drafts", "V", "W", "max_num_draft", "S")


def compile_one(target, fn, consts: dict, warps: int) -> tuple[bool, str]:
    sig = {n: "constexpr" if n in consts else _PTRS.get(n, "i32" if n in _INTS else None) for n in fn.arg_names}
    missing = [n for n, t in sig.items() if t is None]
    if missing:
        return False, f"no type or value for {missing}"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    return compile_and_measure(target, fn, sig, consts, attrs, warps, 2, max_stack_bytes=64)


def jobs():
    out = []
    for kind in (0, 1, 2):
        for filt in (False, True):
            consts = dict(KIND=kind, HAS_TEMP=True, HAS_TOPK=filt, HAS_TOPP=filt, HAS_FILTER=filt, S_BLOCK=4,
                          BLOCK=1024, BLOCK4=256, BLOCK_W=8, t_stride_col=1, d_stride_col=1)
            out.append((f"decide_block kind={kind} filters={filt}", vbm._decide_block_kernel, consts, 4))
    return out


if __name__ == "__main__":
    sys.exit(aot_main(__doc__.splitlines()[0], jobs, compile_one))
