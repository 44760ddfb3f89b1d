"""Compile verify_block's block-method Triton kernel (``_decide_block_kernel``) for
sm_90 ahead of time, without a GPU (also the token method's kernels and token_logprobs'
in their min-p / draft_index variants).

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
from dspark_kernels.triton import token_logprobs as tlp  # noqa: E402
from dspark_kernels.triton import verify_block as vb  # noqa: E402
from dspark_kernels.triton import verify_block_method as vbm  # noqa: E402

_PTRS = dict(t_ptr="*bf16", d_ptr="*bf16", drafts_ptr="*i32", cu_ptr="*i32", temp_ptr="*fp32", topk_ptr="*i32",
             topp_ptr="*fp32", seed_ptr="*i64", offset_ptr="*i64", t_ws_max_ptr="*fp32", t_ws_arg_ptr="*i32",
             t_ws_m_ptr="*fp32", t_ws_sum_ptr="*i64", t_thr_ptr="*fp32", t_lse_ptr="*fp32", d_ws_m_ptr="*fp32",
             d_ws_sum_ptr="*i64", d_thr_ptr="*fp32", d_lse_ptr="*fp32", out_ptr="*i32", num_acc_ptr="*i32",
             lmp_ptr="*fp32", didx_ptr="*i64")
# The token method's kernels and token_logprobs' (pointer names not above are fp32 / bf16 rows).
_MORE_PTRS = dict(logits_ptr="*bf16", ws_max_ptr="*fp32", ws_arg_ptr="*i32", ws_m_ptr="*fp32", ws_sum_ptr="*i64",
                  thr_ptr="*fp32", lse_ptr="*fp32", tok_ptr="*i32", row_ptr="*i64")
_INTS = ("t_stride_row", "num_target_rows", "d_stride_row", "num_drafts", "V", "W", "max_num_draft", "S",
         "num_q_rows")


def compile_one(target, fn, consts: dict, warps: int) -> tuple[bool, str]:
    consts = dict(consts)
    ptrs = dict(_PTRS, **_MORE_PTRS, **consts.pop("_types", {}))
    ints = _INTS + ("stride_row", "num_rows", "chunks_per_split", "num_chunks")
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32" if n in ints else None) for n in fn.arg_names}
    missing = [n for n, t in sig.items() if t is None]
    if missing:
        return False, f"no type or value for {missing}"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    return compile_and_measure(target, fn, sig, consts, attrs, warps, 2, max_stack_bytes=64)


def jobs():
    out = []
    for kind in (0, 1, 2):
        for filt in (False, True):
            # min_p and draft_index ride with the filtered variants (both on, or both off)
            consts = dict(KIND=kind, HAS_TEMP=True, HAS_TOPK=filt, HAS_TOPP=filt, HAS_FILTER=filt, S_BLOCK=4,
                          BLOCK=1024, BLOCK4=256, BLOCK_W=8, t_stride_col=1, d_stride_col=1, HAS_MINP=filt,
                          HAS_DIDX=filt and kind != 0)
            out.append((f"decide_block kind={kind} filters={filt}", vbm._decide_block_kernel, consts, 4))
            token = {k: v for k, v in consts.items() if k != "BLOCK"}
            out.append((f"decide kind={kind} filters={filt}", vb._decide_kernel, token, 4))
    for target_rows in (True, False):
        out.append((f"row_stats target={target_rows}", vb._row_stats_kernel,
                    dict(IS_TARGET=target_rows, HAS_TEMP=True, BLOCK=1024, HAS_DIDX=not target_rows, stride_col=1),
                    4))
        out.append((f"row_mass target={target_rows}", vb._row_mass_kernel,
                    dict(IS_TARGET=target_rows, HAS_TEMP=True, BLOCK=1024, S_BLOCK=4, HAS_DIDX=not target_rows,
                         stride_col=1), 4))
        out.append((f"filter target={target_rows}", vb._filter_kernel,
                    dict(IS_TARGET=target_rows, HAS_TOPK=True, HAS_TOPP=True, BLOCK=256, RADIX_BITS=4, S_BLOCK=4,
                         HAS_MINP=True, HAS_DIDX=not target_rows, stride_col=1), 8))
    out.append(("token_logprobs", tlp._token_logprobs_kernel,
                dict(HAS_TEMP=True, HAS_TOPK=True, HAS_TOPP=True, HAS_MINP=True, BLOCK=256, RADIX_BITS=4,
                     t_stride_col=1, _types=dict(out_ptr="*fp32")), 8))
    return out


if __name__ == "__main__":
    sys.exit(aot_main(__doc__.splitlines()[0], jobs, compile_one))
