"""draft_block_attention: the float64 reference against a pure-Python oracle; every backend
against the reference with FlashAttention's tolerance rule; ragged blocks, wrapped and
windowed context, GQA / MQA, sinks, odd head dims, strided inputs, poisoned outputs,
bad inputs, opcheck and torch.compile (docs/attention.md, docs/correctness.md).

Tolerance rule: the error of a backend against the float64 reference is at most twice
the error of plain PyTorch math in the inputs' dtype (``naive_attention``) plus a small
epsilon. bf16 only on a GPU (the Triton interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import available_backends, backend_device, requires_cuda

import dspark_kernels as dk
from dspark_kernels import _backend
from dspark_kernels.reference import draft_block_attention as ref_mod

OP = "draft_block_attention"
BACKENDS = [b for b in available_backends() if b != "cuda" and dk.backends(OP)[b]]
EPS = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def _cu(blocks):
    cu = torch.zeros(len(blocks) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(blocks, dtype=torch.int32), 0)
    return cu


def make_inputs(blocks, ctx_lens, *, heads=8, kv_heads=2, head_dim=64, cache_window=16, dtype=torch.float32,
                sinks=False, seed=0, device="cpu"):
    """Keyword arguments of dk.draft_block_attention (without backend). Values ~N(0, 1),
    queries scaled up so the softmax is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(blocks), sum(blocks)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    args = dict(
        q=rnd(T, heads, head_dim, scale=2.0),
        k_block=rnd(T, kv_heads, head_dim),
        v_block=rnd(T, kv_heads, head_dim),
        k_ctx=rnd(B, cache_window, kv_heads, head_dim),
        v_ctx=rnd(B, cache_window, kv_heads, head_dim),
        cu_block=_cu(blocks).to(device),
        ctx_lens=torch.tensor(ctx_lens, dtype=torch.int32).to(device),
    )
    if sinks:
        args["sinks"] = (torch.randn(heads, generator=g) * 2.0).to(device)
    return args


def reference64(args, **kw):
    a = {k: v for k, v in args.items()}
    return ref_mod.draft_block_attention(
        a["q"], a["k_block"], a["v_block"], a["k_ctx"], a["v_ctx"], a["cu_block"], a["ctx_lens"],
        a.get("sinks"), kw.get("softmax_scale"), kw.get("window"), out_dtype=torch.float64).cpu()


def naive_attention(args, softmax_scale=None, window=None):
    """Plain PyTorch math in the inputs' dtype, one request at a time (the tolerance yardstick)."""
    q, kb, vb = (args[k].cpu() for k in ("q", "k_block", "v_block"))
    kc, vc = args["k_ctx"].cpu(), args["v_ctx"].cpu()
    T, H, D = q.shape
    G = H // kb.shape[1]
    W = kc.shape[1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    cu, lens = args["cu_block"].cpu().tolist(), args["ctx_lens"].cpu().tolist()
    out = torch.zeros(T, H, D, dtype=q.dtype)
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        slots = [t % W for t in ref_mod.visible_positions(lens[b], W, window)]
        K = torch.cat([kc[b, slots], kb[s:e]]).repeat_interleave(G, dim=1)      # [Lk, H, D]
        V = torch.cat([vc[b, slots], vb[s:e]]).repeat_interleave(G, dim=1)
        S = torch.einsum("ihd,jhd->hij", q[s:e], K) * scale
        if "sinks" in args and args["sinks"] is not None:
            sink = args["sinks"].cpu().to(q.dtype)[:, None, None].expand(H, e - s, 1)
            P = torch.softmax(torch.cat([S, sink], dim=-1), dim=-1)[..., :-1]
        else:
            P = torch.softmax(S, dim=-1)
        out[s:e] = torch.einsum("hij,jhd->ihd", P, V)
    return out


def assert_fa_close(out, args, **kw):
    """FlashAttention's rule: |out - ref64| <= 2 |naive(dtype) - ref64| + eps (max norms)."""
    assert out.dtype == args["q"].dtype
    assert out.shape == args["q"].shape
    out = out.cpu()
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN output elements"
    ref = reference64(args, **kw)
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    err_pt = (naive_attention(args, **kw).double() - ref).abs().max().item() if out.numel() else 0.0
    tol = 2 * err_pt + EPS[out.dtype]
    assert err <= tol, f"error {err:.3g} > 2 x {err_pt:.3g} (plain PyTorch in {out.dtype}) + {EPS[out.dtype]}"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every backend's output buffer starts as NaN, so an unwritten element cannot pass."""
    from dspark_kernels.cpu import draft_block_attention as cpu_mod

    def nan_empty(num_tokens, num_heads, head_dim, dtype, device):
        return torch.full((num_tokens, num_heads, head_dim), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(cpu_mod, "_alloc_out", nan_empty)
    if dk.backends(OP)["triton"]:
        from dspark_kernels.triton import draft_block_attention as triton_mod

        monkeypatch.setattr(triton_mod, "_alloc_out", nan_empty)


def _run(backend, args, **kw):
    device = backend_device(backend)
    args = {k: v.to(device) for k, v in args.items()}
    return dk.draft_block_attention(**args, **kw, backend=backend)


# Ragged blocks (γ 1, 5, 7, 16 and an empty block) with an empty context, a short one
# (ctx_len < W), one that wrapped around the window (ctx_len > W), and a full one.
BLOCKS = [1, 5, 0, 7, 16]
CTX = [0, 9, 0, 41, 16]


# --------------------------------------------------------------------------
# The reference against an independent pure-Python oracle


def _oracle(args, b, i, h, softmax_scale=None, window=None):
    """out[cu[b] + i, h] by explicit lists of floats."""
    q, kb, vb = (args[k].double() for k in ("q", "k_block", "v_block"))
    kc, vc = args["k_ctx"].double(), args["v_ctx"].double()
    H, D = q.shape[1], q.shape[2]
    g = h // (H // kb.shape[1])
    W = kc.shape[1]
    start, end = int(args["cu_block"][b]), int(args["cu_block"][b + 1])
    L = int(args["ctx_lens"][b])
    n_vis = min(L, W, W if window is None else window)
    keys = [(kc[b, t % W, g].tolist(), vc[b, t % W, g].tolist()) for t in range(L - n_vis, L)]
    keys += [(kb[r, g].tolist(), vb[r, g].tolist()) for r in range(start, end)]
    scale = 1 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qv = q[start + i, h].tolist()
    logits = [scale * sum(a * c for a, c in zip(qv, k)) for k, _ in keys]
    extra = [float(args["sinks"][h])] if args.get("sinks") is not None else []
    m = max(logits + extra)
    w = [math.exp(x - m) for x in logits]
    z = sum(w) + sum(math.exp(x - m) for x in extra)
    return [sum(wj * v[d] for wj, (_, v) in zip(w, keys)) / z for d in range(D)]


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_reference_matches_python_oracle(sinks, window, kv_heads):
    args = make_inputs([2, 3, 0, 1], [0, 5, 3, 11], heads=4, kv_heads=kv_heads, head_dim=6, cache_window=4,
                       sinks=sinks, seed=kv_heads)
    out = reference64(args, window=window, softmax_scale=0.37)
    cu = args["cu_block"].tolist()
    for b in range(4):
        for i in range(cu[b + 1] - cu[b]):
            for h in range(4):
                expect = _oracle(args, b, i, h, softmax_scale=0.37, window=window)
                assert torch.allclose(out[cu[b] + i, h], torch.tensor(expect, dtype=torch.float64),
                                      rtol=1e-12, atol=1e-12), (b, i, h)


def test_reference_backend_returns_inputs_dtype():
    args = make_inputs([2, 1], [3, 0], dtype=torch.float16, head_dim=16)
    out = dk.draft_block_attention(**args, backend="reference")
    assert out.dtype == torch.float16 and out.shape == args["q"].shape
    assert_fa_close(out, args)


# --------------------------------------------------------------------------
# Every backend against the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("heads,kv_heads,sinks", [(8, 2, False), (8, 2, True), (8, 1, True), (4, 4, False)])
def test_backend_matches_reference(backend, dtype, head_dim, heads, kv_heads, sinks):
    args = make_inputs(BLOCKS, CTX, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, sinks=sinks,
                       seed=head_dim + heads + kv_heads)
    assert_fa_close(_run(backend, args), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [0, 1, 5, 16, 100])
def test_window(backend, window):
    """window < W caps the context at the last `window` tokens; window >= W changes nothing."""
    args = make_inputs(BLOCKS, CTX, head_dim=64, sinks=True, seed=window)
    assert_fa_close(_run(backend, args, window=window), args, window=window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale_and_wraparound(backend):
    """A custom scale, and context lengths far past W (the window wrapped many times)."""
    args = make_inputs([3, 4], [1000, 17], head_dim=64, cache_window=8, seed=7)
    assert_fa_close(_run(backend, args, softmax_scale=0.05), args, softmax_scale=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_192_and_mqa(backend):
    args = make_inputs([5, 2], [3, 30], heads=4, kv_heads=1, head_dim=192, sinks=True, seed=3)
    assert_fa_close(_run(backend, args), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """q a slice of a wider tensor, K/V views into packed buffers: no copies needed."""
    dense = make_inputs(BLOCKS, CTX, head_dim=64, sinks=True, seed=11)
    T = dense["q"].shape[0]
    wide_q = torch.full((T, 8, 96), float("nan"))
    wide_q[:, :, 16:80] = dense["q"]
    kv_block = torch.stack([dense["k_block"], dense["v_block"]], dim=1)         # [T, 2, Hkv, D]
    kv_ctx = torch.stack([dense["k_ctx"], dense["v_ctx"]], dim=2)               # [B, W, 2, Hkv, D]
    ctx_t = dense["k_ctx"].transpose(1, 2).contiguous().transpose(1, 2)         # [B, W, Hkv, D] head-major
    args = dict(dense, q=wide_q[:, :, 16:80], k_block=kv_block[:, 0], v_block=kv_block[:, 1],
                k_ctx=ctx_t, v_ctx=kv_ctx[:, :, 1])
    assert not args["q"].is_contiguous() and not args["k_ctx"].is_contiguous()
    assert torch.equal(args["k_ctx"], dense["k_ctx"])
    out = _run(backend, args)
    assert out.is_contiguous()
    assert_fa_close(out, dense)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_blocks_strided(backend):
    """Every block the same length (the engine's common case; the cpu backend then uses
    views instead of gathers), with a strided q."""
    dense = make_inputs([5, 5, 5], [0, 130, 7], heads=8, kv_heads=1, head_dim=64, sinks=True, seed=12)
    wide = torch.full((15, 8, 80), float("nan"))
    wide[:, :, :64] = dense["q"]
    out = _run(backend, dict(dense, q=wide[:, :, :64]))
    assert_fa_close(out, dense)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_empty_blocks_and_batch(backend):
    args = make_inputs([0, 0], [5, 0], head_dim=64)
    out = _run(backend, args)
    assert out.shape == (0, 8, 64)
    args = make_inputs([], [], head_dim=64)
    assert _run(backend, args).shape == (0, 8, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_window_cache(backend):
    """W = 0: block-only attention."""
    args = make_inputs([3, 2], [4, 0], head_dim=64, cache_window=0, sinks=True)
    assert_fa_close(_run(backend, args), args)


@pytest.mark.parametrize("max_block_len", [None, 1, 16, 40])
def test_triton_max_block_len_is_only_a_grid_hint(max_block_len):
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    args = make_inputs(BLOCKS, CTX, heads=4, kv_heads=4, head_dim=64, seed=5)
    assert_fa_close(_run("triton", args, max_block_len=max_block_len), args)


def test_triton_small_tiles_cover_many_chunks():
    """Several M tiles per request and several key chunks per loop (BLOCK 16 everywhere)."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    from dspark_kernels.triton.draft_block_attention import draft_block_attention as triton_impl

    args = make_inputs([16, 9], [40, 33], heads=8, kv_heads=2, head_dim=64, cache_window=40, sinks=True, seed=9)
    a = {k: v.to(backend_device("triton")) for k, v in args.items()}
    out = triton_impl(a["q"], a["k_block"], a["v_block"], a["k_ctx"], a["v_ctx"], a["cu_block"], a["ctx_lens"],
                      a["sinks"], None, None, 16,
                      _config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=64, num_warps=1, num_stages=1))
    assert_fa_close(out, args)


def test_auto_backend_and_availability():
    avail = dk.backends(OP)
    assert avail["reference"] and avail["cpu"]
    assert not avail["cuda"], "draft_block_attention has no CUDA C++ kernel: Triton is its GPU backend"
    args = make_inputs([2, 3], [4, 20], head_dim=64)
    assert_fa_close(dk.draft_block_attention(**args), args)


# --------------------------------------------------------------------------
# Bad inputs name the argument; data checks; the op is well-formed for the compiler


def _good():
    return make_inputs([2, 3], [4, 20], heads=4, kv_heads=2, head_dim=16, cache_window=8, sinks=True, seed=1)


BAD_CASES = [
    ("q", lambda a, k: a.update(q=a["q"][:, :, :, None])),
    ("q", lambda a, k: a.update(q=a["q"].to(torch.int32))),
    ("k_block", lambda a, k: a.update(k_block=a["k_block"][:-1])),
    ("k_block", lambda a, k: a.update(k_block=torch.cat([a["k_block"]] * 3, dim=1)[:, :3])),
    ("k_block", lambda a, k: a.update(k_block=a["k_block"].half())),
    ("v_block", lambda a, k: a.update(v_block=a["v_block"][:, :, :8])),
    ("k_ctx", lambda a, k: a.update(k_ctx=a["k_ctx"][:, :, :1])),
    ("k_ctx", lambda a, k: a.update(k_ctx=a["k_ctx"][0])),
    ("v_ctx", lambda a, k: a.update(v_ctx=a["v_ctx"][:, :4])),
    ("cu_block", lambda a, k: a.update(cu_block=a["cu_block"].float())),
    ("cu_block", lambda a, k: a.update(cu_block=a["cu_block"][:2])),
    ("ctx_lens", lambda a, k: a.update(ctx_lens=a["ctx_lens"][:1])),
    ("ctx_lens", lambda a, k: a.update(ctx_lens=a["ctx_lens"].float())),
    ("sinks", lambda a, k: a.update(sinks=a["sinks"][:2])),
    ("sinks", lambda a, k: a.update(sinks=a["sinks"].to(torch.int64))),
    ("softmax_scale", lambda a, k: k.update(softmax_scale=float("nan"))),
    ("window", lambda a, k: k.update(window=-1)),
    ("window", lambda a, k: k.update(window=2.5)),
    ("max_block_len", lambda a, k: k.update(max_block_len=-3)),
]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("name,mutate", BAD_CASES)
def test_bad_input_names_the_argument(backend, name, mutate):
    args, kw = _good(), {}
    mutate(args, kw)
    device = backend_device(backend)
    args = {k: v.to(device) for k, v in args.items()}
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.draft_block_attention(**args, **kw, backend=backend)


DATA_CASES = [
    ("cu_block", lambda a: a["cu_block"].__setitem__(0, 1)),
    ("cu_block", lambda a: a["cu_block"].__setitem__(2, 4)),
    ("cu_block", lambda a: a["cu_block"].__setitem__(1, 6)),
    ("ctx_lens", lambda a: a["ctx_lens"].__setitem__(1, -1)),
]


@pytest.mark.parametrize("backend", ["reference"] + [b for b in BACKENDS if backend_device(b) == "cpu"])
@pytest.mark.parametrize("name,mutate", DATA_CASES)
def test_data_dependent_checks_on_cpu(backend, name, mutate):
    args = _good()
    mutate(args)
    with pytest.raises((ValueError, RuntimeError), match=name):
        dk.draft_block_attention(**args, max_block_len=3, backend=backend)


def test_direct_op_call_checks_arguments():
    args = _good()
    with pytest.raises((ValueError, RuntimeError), match="k_ctx"):
        torch.ops.dspark.draft_block_attention(
            args["q"], args["k_block"], args["v_block"], args["k_ctx"][:, :, :1], args["v_ctx"], args["cu_block"],
            args["ctx_lens"], max_block_len=3)
    bad_cu = args["cu_block"].clone()
    bad_cu[-1] = 1
    with pytest.raises((ValueError, RuntimeError), match="cu_block"):
        torch.ops.dspark.draft_block_attention(
            args["q"], args["k_block"], args["v_block"], args["k_ctx"], args["v_ctx"], bad_cu, args["ctx_lens"],
            max_block_len=3)


def test_triton_rejects_head_dims_past_512():
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    args = make_inputs([1], [0], heads=1, kv_heads=1, head_dim=520)
    with pytest.raises(ValueError, match="q"):
        _run("triton", args)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        dk.draft_block_attention(**_good(), backend="tpu")


def test_schema_matches_the_extension():
    from dspark_kernels._registry import REGISTRY

    schema = str(torch.ops.dspark.draft_block_attention.default._schema)
    assert schema == "dspark::" + str(torch._C.parse_schema(REGISTRY[OP].schema))


@pytest.mark.parametrize("options", ["all", "none"])
def test_opcheck(options):
    args = _good()
    pos = [args[k] for k in ("q", "k_block", "v_block", "k_ctx", "v_ctx", "cu_block", "ctx_lens")]
    kw = dict(sinks=args["sinks"], softmax_scale=0.3, window=5) if options == "all" else {}
    torch.library.opcheck(torch.ops.dspark.draft_block_attention.default, pos, dict(kw, max_block_len=3))


def test_torch_compile_fullgraph():
    args = _good()

    def step(q, k_block, v_block, k_ctx, v_ctx, cu_block, ctx_lens, sinks):
        out = dk.draft_block_attention(q, k_block, v_block, k_ctx, v_ctx, cu_block, ctx_lens, sinks=sinks,
                                       window=6, max_block_len=3)
        return out * 2

    call = [args[k] for k in ("q", "k_block", "v_block", "k_ctx", "v_ctx", "cu_block", "ctx_lens", "sinks")]
    eager = step(*call)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*call)
    assert torch.equal(eager, compiled)


def test_bench_quick(tmp_path):
    """`dspark-bench draft-attn --quick` runs on CPU, checks every backend, writes JSON."""
    import json

    from dspark_kernels.bench.__main__ import main

    js = tmp_path / "attn.json"
    rc = main(["draft-attn", "--quick", "--json", str(js), "--device", "cpu", "--quiet", "--max-time", "0.005",
               "--threads", "1"])
    assert rc == 0
    cases = json.loads(js.read_text())["cases"]
    assert {c["batch"] for c in cases} == {1, 4}
    timed = {c["backend"] for c in cases if c["status"] == "ok"}
    assert {"cpu", "reference", "eager"} <= timed
    for c in cases:
        if c["status"] == "ok":
            assert c["bytes"] > 0 and c["flops"] > 0 and c["GBps"] > 0 and c["gflops"] > 0
            if c["backend"] != "eager":
                assert c["correct"] is True, c
    assert all(c["status"] == "skipped" for c in cases if c["backend"] == "triton")


# --------------------------------------------------------------------------
# The Triton kernel compiles for the GPU (sm_90a) even where none is present


_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dspark_kernels.triton import draft_block_attention as tmod

kernel = tmod._draft_block_attn_kernel
unit = {"sq_d", "skb_d", "svb_d", "skc_d", "svc_d", "so_d"}
for dtype, head_dim, group in [("bf16", 512, 64), ("fp16", 80, 4)]:
    table = tmod._CONFIGS_32 if dtype == "fp32" else tmod._CONFIGS_16
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, warps = table[block_d]
    consts = dict(G=group, HEAD_DIM=head_dim, HAS_SINKS=True, FP32=dtype == "fp32", BLOCK_M=block_m,
                  BLOCK_N=block_n, BLOCK_D=block_d, **{n: 1 for n in unit})
    signature = {}
    for n in kernel.arg_names:
        if n in consts:
            signature[n] = "constexpr"
        elif n in ("q_ptr", "kb_ptr", "vb_ptr", "kc_ptr", "vc_ptr", "o_ptr"):
            signature[n] = "*" + dtype
        elif n == "sinks_ptr":
            signature[n] = "*fp32"
        elif n.endswith("_ptr"):
            signature[n] = "*i32"
        else:
            signature[n] = "fp32" if n == "qk_scale" else "i32"
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=2))
    print(dtype, head_dim, "shared", compiled.metadata.shared, flush=True)
    assert compiled.metadata.shared <= 160 * 1024
"""


@pytest.mark.slow
def test_triton_kernel_compiles_for_sm90():
    """The interpreter accepts programs the compiler rejects: compile ahead of time for
    sm_90a (no GPU needed; a subprocess, since the interpreter replaces the JIT) with the
    launch configurations the wrapper picks for V4's MQA (bf16, D=512) and D=80 (fp16)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "No module named 'triton.backends" in proc.stderr):
        pytest.skip("no ptxas / nvidia backend in this triton: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------
# CUDA (skipped without a GPU): bf16, model-sized shapes, CUDA graphs


GPU_SHAPES = [
    # (name, H, Hkv, D): the DeepSeek-V4 drafter's MQA and a Qwen3-like GQA
    ("v4-mqa", 64, 1, 512),
    ("qwen3-gqa", 32, 8, 128),
]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name,heads,kv_heads,head_dim", GPU_SHAPES)
@pytest.mark.parametrize("sinks", [False, True])
def test_cuda_model_shapes(dtype, name, heads, kv_heads, head_dim, sinks):
    blocks = [5, 7, 15, 1, 0, 16, 5, 5]
    ctx = [0, 60, 128, 129, 7, 5000, 300, 127]
    args = make_inputs(blocks, ctx, heads=heads, kv_heads=kv_heads, head_dim=head_dim, cache_window=128,
                       dtype=dtype, sinks=sinks, seed=heads + head_dim)
    out = _run("triton", args)
    assert out.is_cuda
    assert_fa_close(out, args)
    # the CUDA dispatch key of the op runs the same Triton kernel
    a = {k: v.cuda() for k, v in args.items()}
    out_op = torch.ops.dspark.draft_block_attention(
        a["q"], a["k_block"], a["v_block"], a["k_ctx"], a["v_ctx"], a["cu_block"], a["ctx_lens"],
        sinks=a.get("sinks"), max_block_len=16)
    torch.testing.assert_close(out_op, out, rtol=0, atol=0)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("window", [None, 32])
def test_cuda_large_batch(window):
    B = 128
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(1, 16, (B,), generator=g).tolist()
    ctx = torch.randint(0, 400, (B,), generator=g).tolist()
    args = make_inputs(blocks, ctx, heads=32, kv_heads=8, head_dim=128, cache_window=128, dtype=torch.bfloat16,
                       sinks=True, seed=1)
    assert_fa_close(_run("triton", args, window=window), args, window=window)


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_capture():
    """No host sync with max_block_len given: the call captures into a CUDA graph and replays
    on new data in the same buffers."""
    args = make_inputs([5, 7, 0, 16], [3, 200, 0, 128], heads=64, kv_heads=1, head_dim=512, cache_window=128,
                       dtype=torch.bfloat16, sinks=True, seed=2)
    a = {k: v.cuda() for k, v in args.items()}

    def call():
        return dk.draft_block_attention(**a, max_block_len=16)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    fresh = make_inputs([5, 7, 0, 16], [9, 131, 0, 64], heads=64, kv_heads=1, head_dim=512, cache_window=128,
                        dtype=torch.bfloat16, sinks=True, seed=3)
    for k, v in fresh.items():
        a[k].copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    assert_fa_close(out.clone(), fresh)


@pytest.mark.cuda
@requires_cuda
def test_cuda_opcheck_and_compile():
    args = {k: v.cuda() for k, v in make_inputs([2, 3], [4, 20], heads=8, kv_heads=2, head_dim=64,
                                                 dtype=torch.bfloat16, sinks=True).items()}
    pos = [args[k] for k in ("q", "k_block", "v_block", "k_ctx", "v_ctx", "cu_block", "ctx_lens")]
    torch.library.opcheck(torch.ops.dspark.draft_block_attention.default, pos,
                          dict(sinks=args["sinks"], window=7, max_block_len=3))
    step = torch.compile(lambda *t: dk.draft_block_attention(*t, max_block_len=3), fullgraph=True)
    torch.testing.assert_close(step(*pos), dk.draft_block_attention(*pos, max_block_len=3), rtol=0, atol=0)


def test_no_cuda_cpp_kernel_compiled():
    assert "CUDA" not in _backend.COMPILED.get(OP, set())
