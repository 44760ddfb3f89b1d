"""Compile the MoE Triton kernels for sm_90 ahead of time, without a GPU.

    python python_tests/aot_compile_moe.py [--arch 90]

Runs Triton's full lowering (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled
ptxas) for the configs the heuristic picks at the DeepSeek-V3 / Qwen3-30B-A3B
shapes, with the specialisations the JIT applies at run time (16-byte aligned
pointers and strides, unit strides folded to 1). Prints shared memory, registers
and spills per kernel; exits 1 if a kernel fails to compile or spills. This is
what a machine without a GPU can check beyond the interpreter (test_moe.py runs
it, marked slow). TRITON_INTERPRET must be unset: the kernels are compiled, not
interpreted.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aot_triton import compile_and_measure, main as aot_main  # noqa: E402  (this folder is sys.path[0])
from dspark_kernels.triton import _moe_common  # noqa: E402
from dspark_kernels.triton import fused_moe as fm  # noqa: E402
from dspark_kernels.triton import fused_moe_fp8 as fm8  # noqa: E402
from dspark_kernels.triton import grouped_gemm as gg  # noqa: E402
from dspark_kernels.triton import grouped_gemm_masked as ggm  # noqa: E402
from dspark_kernels.triton import moe_align as ma  # noqa: E402

UNIT = {"s_xk", "s_wk", "s_ak", "s_on", "s_ik", "s_sk"}  # unit strides: the JIT folds them to the constant 1
NOT_ALIGNED = {"numel", "E", "block_m", "length", "num_blocks", "num_chunks", "T", "top_k", "max_blocks", "max_m",
               "s_xsm", "s_hsm", "s_sn", "s_sm"}  # fp8 scale strides: ceil(K / 128), e.g. 56


def compile_one(target, fn, types: dict, consts: dict, warps: int, stages: int) -> tuple[bool, str]:
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    consts = dict(consts)
    for n in UNIT & set(sig):
        sig[n], consts[n] = "constexpr", 1
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and (sig[n].startswith("*") or n not in NOT_ALIGNED)}
    return compile_and_measure(target, fn, sig, consts, attrs, warps, stages, max_stack_bytes=0,
                               max_error_chars=2000)


def jobs():
    """(label, kernel, arg types, constexprs, warps, stages)."""
    out = []
    i32 = "*i32"
    for ids_t in ("*i32", "*i64"):
        e_block, c, bm_pow2, tb = ma._sizes(4096, 256, 16)
        out.append((f"moe_align hist ids {ids_t}", ma._chunk_hist_kernel,
                    dict(ids_ptr=ids_t, numel="i32", E="i32", table_ptr=i32), dict(C=c, E_BLOCK=e_block), 4, 3))
    out.append(("moe_align scan", ma._chunk_scan_kernel, dict(table_ptr=i32, totals_ptr=i32, num_chunks="i32"),
                dict(E_BLOCK=256, E_TILE=32, C_TILE=64), 4, 3))
    for mode in (0, 1, 2):
        e_block, c, bm_pow2, tb = ma._sizes(4096, 256, 16)
        out.append((f"moe_align scatter mode {mode}", ma._align_scatter_kernel, dict(
            ids_ptr=i32, numel="i32", E="i32", block_m="i32", length="i32", num_blocks="i32", table_ptr=i32,
            totals_ptr=i32, num_chunks="i32", sorted_ptr=i32, expert_ids_ptr=i32, post_pad_ptr=i32),
            dict(C=c, E_BLOCK=e_block, MODE=mode, NC_BLOCK=ma._SMALL_CHUNKS, TB=tb, BM_POW2=bm_pow2), 4, 3))
    seen = set()
    for (E, k, H, I) in ((256, 8, 7168, 2048), (128, 8, 2048, 768)):
        for M in (1, 64, 1024, 8192):
            cfg = _moe_common.heuristic_config(M, E, H, I, k, torch.bfloat16)
            key = tuple(cfg.values())
            if key in seen:
                continue
            seen.add(key)
            bm, bn, bk, w, st = (cfg[x] for x in _moe_common.CONFIG_KEYS)
            for persistent in (False, True):
                tag = f"bf16 {bm}x{bn}x{bk} w{w} s{st}{' persistent' if persistent else ''}"
                out.append((f"fused_moe gemm1 {tag}", fm._gemm1_kernel, dict(
                    x_ptr="*bf16", s_xm="i32", s_xk="i32", w_ptr="*bf16", s_we="i32", s_wn="i32", s_wk="i32",
                    up_offset="i32", h_ptr="*bf16", s_hm="i32", sorted_ptr=i32, expert_ids_ptr=i32,
                    post_pad_ptr=i32, numel="i32", top_k="i32", K="i32", I="i32", max_blocks="i32"),
                    dict(PERSISTENT=persistent, BLOCK_M=bm, BLOCK_N=bn // 2, BLOCK_K=bk, PRECISION="tf32"), w, st))
                for atomic in (False, True):
                    out.append((f"fused_moe gemm2 {tag} atomic={atomic}", fm._gemm2_kernel, dict(
                        h_ptr="*bf16", s_hm="i32", w_ptr="*bf16", s_we="i32", s_wn="i32", s_wk="i32",
                        y_ptr="*fp32", s_ym="i32", weights_ptr="*fp32", sorted_ptr=i32, expert_ids_ptr=i32,
                        post_pad_ptr=i32, numel="i32", top_k="i32", K="i32", N="i32", max_blocks="i32"),
                        dict(PERSISTENT=persistent, ATOMIC=atomic, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                             PRECISION="tf32"), w, st))
    out.extend(fp8_jobs())
    out.append(("fused_moe topk_sum", fm._topk_sum_kernel, dict(
        y_ptr="*fp32", ids_ptr=i32, E="i32", out_ptr="*bf16", s_om="i32", s_on="i32", N="i32"),
        dict(TOP_K=8, BLOCK_N=1024), 4, 3))
    for T, E in ((8, 256), (4096, 16)):
        cfg = _moe_common.grouped_gemm_config(T, E, 4096, 7168, torch.bfloat16)
        bm, bn, bk, w, st = (cfg[x] for x in _moe_common.CONFIG_KEYS)
        for persistent in (False, True):
            out.append((f"grouped_gemm bf16 {bm}x{bn}x{bk} w{w} s{st}{' persistent' if persistent else ''}",
                        gg._grouped_gemm_kernel, dict(
                            a_ptr="*bf16", s_am="i32", s_ak="i32", w_ptr="*bf16", s_we="i32", s_wn="i32",
                            s_wk="i32", out_ptr="*bf16", s_om="i32", s_on="i32", offs_ptr=i32, T="i32", N="i32",
                            K="i32", E="i32"),
                        dict(PERSISTENT=persistent, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                             G_BLOCK=triton.next_power_of_2(E + 1), PRECISION="tf32"), w, st))
    for E, max_m in ((32, 8), (16, 64), (8, 4096)):  # DeepSeek-V3 widths, decode to prefill capacities
        cfg = ggm.masked_gemm_config(E, max_m, 4096, 7168, torch.bfloat16)
        bm, bn, bk, w, st = (cfg[x] for x in _moe_common.CONFIG_KEYS)
        for counts_t in ("*i32", "*i64"):
            out.append((f"grouped_gemm_masked bf16 {bm}x{bn}x{bk} w{w} s{st} masked_m {counts_t}",
                        ggm._grouped_gemm_masked_kernel, dict(
                            a_ptr="*bf16", s_ae="i32", s_am="i32", s_ak="i32", w_ptr="*bf16", s_we="i32",
                            s_wn="i32", s_wk="i32", out_ptr="*bf16", s_oe="i32", s_om="i32", s_on="i32",
                            masked_m_ptr=counts_t, max_m="i32", N="i32", K="i32"),
                        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION="tf32"), w, st))
    return out


def fp8_jobs():
    """fused_moe with fp8 e4m3 block-scaled weights (block_shape 128x128): the group
    quantiser (x in bf16, the fp32 intermediate) and both GEMMs with native fp8 dots."""
    i32 = "*i32"
    out = []
    for in_t in ("*bf16", "*fp32"):
        out.append((f"fused_moe_fp8 group_quant {in_t}", fm8._group_quant_kernel, dict(
            in_ptr=in_t, s_im="i32", s_ik="i32", q_ptr="*fp8e4nv", s_qm="i32", sc_ptr="*fp32", s_sm="i32",
            K="i32"), dict(GROUP=128, BLOCK=128), 4, 1))
    seen = set()
    for (E, k, H, I) in ((256, 8, 7168, 2048), (128, 8, 2048, 768)):
        for M in (1, 64, 1024, 8192):
            cfg = _moe_common.heuristic_config(M, E, H, I, k, torch.float8_e4m3fn)
            key = tuple(cfg.values())
            if key in seen:
                continue
            seen.add(key)
            bm, bn, bk, w, st = (cfg[x] for x in _moe_common.CONFIG_KEYS)
            for persistent in (False, True):
                tag = f"fp8 {bm}x{bn}x{bk} w{w} s{st}{' persistent' if persistent else ''}"
                common = dict(PERSISTENT=persistent, GROUP_N=128, GROUP_K=128, BLOCK_M=bm, BLOCK_K=bk)
                out.append((f"fused_moe_fp8 gemm1 {tag}", fm8._gemm1_fp8_kernel, dict(
                    xq_ptr="*fp8e4nv", s_xm="i32", xs_ptr="*fp32", s_xsm="i32", w_ptr="*fp8e4nv", s_we="i32",
                    s_wn="i32", s_wk="i32", ws_ptr="*fp32", s_se="i32", s_sn="i32", s_sk="i32", h_ptr="*fp32",
                    s_hm="i32", sorted_ptr=i32, expert_ids_ptr=i32, post_pad_ptr=i32, numel="i32", top_k="i32",
                    K="i32", I="i32", max_blocks="i32"), dict(common, BLOCK_N=bn // 2), w, st))
                out.append((f"fused_moe_fp8 gemm2 {tag}", fm8._gemm2_fp8_kernel, dict(
                    hq_ptr="*fp8e4nv", s_hm="i32", hs_ptr="*fp32", s_hsm="i32", w_ptr="*fp8e4nv", s_we="i32",
                    s_wn="i32", s_wk="i32", ws_ptr="*fp32", s_se="i32", s_sn="i32", s_sk="i32", y_ptr="*fp32",
                    s_ym="i32", weights_ptr="*fp32", sorted_ptr=i32, expert_ids_ptr=i32, post_pad_ptr=i32,
                    numel="i32", top_k="i32", K="i32", N="i32", max_blocks="i32"), dict(common, BLOCK_N=bn), w, st))
    return out


def main(argv=None) -> int:
    return aot_main(__doc__.splitlines()[0], jobs, compile_one, argv)


if __name__ == "__main__":
    sys.exit(main())
