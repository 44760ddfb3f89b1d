"""`dspark-bench moe`: fused_moe (the target's MoE layer on the verify batch) vs the reference and anchors.

Cases: preset x M (tokens in the verify batch, ``B·(γ+1)``) x backend.

* presets (E experts, top-k, hidden H, intermediate I):
  ``deepseek-v3``    E=256 top-8 H=7168 I=2048 (bf16 weights 22.5 GB: GPU only);
  ``qwen3-30b-a3b``  E=128 top-8 H=2048 I=768 (1.2 GB);
  ``quick`` (--quick) E=16 top-4 H=128 I=64.
* routing: uniform random, k distinct experts per token (top-k of random scores,
  softmax weights), seeded; on the GPU several routings are rotated (different
  experts touched by consecutive calls, so the L2 does not hold them).

Columns (``GB/s``, ``%ceil``) use the bytes the layer must move at the least::

    bytes = touched · 3·H·I·s        every expert the routing touches, its w13 and w2 once
          + 2·M·H·s + 8·M·k           x in, out, routing

with ``touched`` the distinct experts of ``topk_ids`` (averaged over the rotated
routings) and ``s`` the element size. ``--weights fp8``: e4m3 weights with 128×128
block scales (DeepSeek-V3's format, activations quantised per token per 128
columns), counted at 1 byte per element plus 4 bytes per block scale; the anchors
then are vLLM's ``fused_experts(use_fp8_w8a8=True, block_shape=[128, 128])``, and
``triton-atomic`` / ``grouped_mm`` have no fp8 variant. In the verify regime (M ≤ a few hundred) the
layer is weight-streaming bound, so ``%ceil`` is the figure of merit. The note
gives ``touched`` and TFLOP/s (``2·M·k·3·H·I`` FLOPs over the time), the figure
of merit at large M.

Backends: ``triton`` (default reduction, deterministic), ``triton-atomic``
(fp32 atomics for the top-k sum), ``triton-persistent`` / ``triton-grid`` (the
default config with the schedule forced, to measure the heuristic's choice; only
with ``--backend``), ``cpu`` (PyTorch per-expert loop),
``reference`` (fp32 loop over all experts; ``x ref`` is the ratio to it), and the
anchors when importable: ``vllm`` (``fused_experts``) and ``grouped_mm``
(``torch._grouped_mm`` twice, with the sort, SiLU-and-mul and scatter-add an
engine would write around it). Correctness: every backend's output against the
reference (relative max error ≤ 2e-2); for the anchors the error is in the note.
On the CPU, cases above ``--flop-cap`` FLOPs and presets whose weights exceed
``--max-weight-gb`` are listed as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import dspark_kernels

from . import timing
from .presets import DTYPES, dtype_name
from .report import add_speedups, new_case

NAME = "moe"
HELP = "fused_moe: the MoE layer of the verify pass vs the reference, vLLM's fused_experts and torch._grouped_mm"

PRESETS = {  # name -> (E, top_k, H, I)
    "deepseek-v3": (256, 8, 7168, 2048),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
QUICK_PRESET = ("quick", (16, 4, 128, 64))
DEFAULT_M = (1, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
QUICK_M = (1, 8)
OWN = ("triton", "triton-atomic", "triton-persistent", "triton-grid", "cpu", "reference")
SCHEDULES = {"triton-persistent": True, "triton-grid": False}
BASELINES = ("vllm", "grouped_mm")
ALL_BACKENDS = OWN + BASELINES
TOLERANCE = 2e-2
CPU_FLOP_CAP = 2e10
GPU_ROUTINGS = 4
FP8_BLOCK = 128
NO_FP8 = ("triton-atomic", "grouped_mm")


@dataclass(frozen=True)
class Preset:
    name: str
    experts: int
    top_k: int
    hidden: int
    inter: int

    def label(self, dtype: str) -> str:
        return f"{self.name} E={self.experts} top-{self.top_k} H={self.hidden} I={self.inter} {dtype}"

    def expert_bytes(self, elem: int, fp8: bool = False) -> int:
        """w13 and w2 of one expert; fp8: 1 byte per element plus a 4-byte scale per 128×128 block."""
        if not fp8:
            return 3 * self.hidden * self.inter * elem
        H, I, cdiv = self.hidden, self.inter, lambda a: -(-a // FP8_BLOCK)
        return 3 * H * I + 4 * (cdiv(2 * I) * cdiv(H) + cdiv(H) * cdiv(I))


def add_arguments(p) -> None:
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), metavar="NAME",
                   help=f"model presets (default: all): {', '.join(PRESETS)}")
    p.add_argument("--m", "--batch", dest="m", type=int, nargs="+", metavar="M",
                   help=f"tokens per call (default {list(DEFAULT_M)})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and activations (default bf16)")
    p.add_argument("--backend", nargs="+", choices=ALL_BACKENDS, metavar="NAME",
                   help=f"implementations to time: {', '.join(ALL_BACKENDS)} (default: every one that runs here)")
    p.add_argument("--weights", choices=("same", "fp8"), default="same",
                   help="weight format: --dtype (default) or fp8 e4m3 with 128x128 block scales")
    p.add_argument("--flop-cap", type=float, default=CPU_FLOP_CAP,
                   help="CPU: skip cases above this many FLOPs (default %(default).0e)")
    p.add_argument("--max-weight-gb", type=float, default=None,
                   help="skip presets whose weights exceed this (default: 40%% of RAM on CPU, of GPU memory on GPU)")


# --------------------------------------------------------------------------- inputs


def make_weights(preset: Preset, dtype: torch.dtype, device: torch.device, seed: int, fp8: bool = False):
    """(w13, w2) in ``dtype``, or fp8: (w13, w2, w13_scale, w2_scale) block-quantised."""
    gen = torch.Generator(device=device).manual_seed(seed)
    E, H, I = preset.experts, preset.hidden, preset.inter
    if fp8:
        from ..reference.moe import quantize_fp8_blocks

        block = (FP8_BLOCK, FP8_BLOCK)
        out = [torch.empty(E, 2 * I, H, dtype=torch.float8_e4m3fn, device=device),
               torch.empty(E, H, I, dtype=torch.float8_e4m3fn, device=device)]
        scales = [torch.empty(E, -(-2 * I // FP8_BLOCK), -(-H // FP8_BLOCK), device=device),
                  torch.empty(E, -(-H // FP8_BLOCK), -(-I // FP8_BLOCK), device=device)]
        for e in range(E):
            out[0][e], scales[0][e] = quantize_fp8_blocks(torch.randn(2 * I, H, generator=gen, device=device) * 0.05,
                                                          block)
            out[1][e], scales[1][e] = quantize_fp8_blocks(torch.randn(H, I, generator=gen, device=device) * 0.05,
                                                          block)
        return (*out, *scales)
    w13 = torch.empty(E, 2 * I, H, dtype=dtype, device=device)
    w2 = torch.empty(E, H, I, dtype=dtype, device=device)
    for e in range(E):  # expert by expert: no fp32 copy of the whole tensor
        w13[e] = torch.randn(2 * I, H, generator=gen, device=device) * 0.05
        w2[e] = torch.randn(H, I, generator=gen, device=device) * 0.05
    return w13, w2


def make_tokens(preset: Preset, m: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(m, preset.hidden, generator=gen, device=device) * 0.1).to(dtype)
    scores = torch.rand(m, preset.experts, generator=gen, device=device)
    weights, ids = torch.topk(torch.softmax(scores, -1), preset.top_k, dim=-1)
    return {"x": x, "topk_weights": weights, "topk_ids": ids.to(torch.int32)}


def touched_experts(ids: torch.Tensor, num_experts: int) -> int:
    flat = ids.reshape(-1).long()
    flat = flat[(flat >= 0) & (flat < num_experts)]
    return int(torch.unique(flat).numel())


# --------------------------------------------------------------------------- runners


def _scales(w) -> dict:
    return dict(w13_scale=w[2], w2_scale=w[3]) if len(w) == 4 else {}


def own_runner(name: str):
    if name.startswith("triton-"):
        from ..triton._moe_common import fused_moe_config
        from ..triton.fused_moe import fused_moe as triton_fused_moe
        from ..triton.fused_moe_fp8 import fused_moe_fp8 as triton_fp8
    if name == "triton-atomic":
        return lambda w, t: triton_fused_moe(t["x"], w[0], w[1], t["topk_weights"], t["topk_ids"], reduce="atomic")
    if name in SCHEDULES:
        def run_schedule(w, t):
            (E, two_i, H), (M, k) = w[0].shape, t["topk_ids"].shape
            if len(w) == 4:
                cfg = dict(fused_moe_config(M, E, H, two_i // 2, k, w[0].dtype), persistent=SCHEDULES[name])
                return triton_fp8(t["x"], w[0], w[1], t["topk_weights"], t["topk_ids"], w[2], w[3], config=cfg)
            cfg = dict(fused_moe_config(M, E, H, two_i // 2, k, t["x"].dtype), persistent=SCHEDULES[name])
            return triton_fused_moe(t["x"], w[0], w[1], t["topk_weights"], t["topk_ids"], config=cfg)

        return run_schedule
    backend = name

    def run(w, t):
        return dspark_kernels.fused_moe(t["x"], w[0], w[1], t["topk_weights"], t["topk_ids"], backend=backend,
                                        **_scales(w))

    return run


class Unavailable(Exception):
    pass


def vllm_runner(device: torch.device):
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception as exc:  # noqa: BLE001 - ImportError, or vLLM failing at import time
        raise Unavailable(f"vllm not importable ({type(exc).__name__})") from None
    if device.type != "cuda":
        raise Unavailable("needs CUDA")
    def run(w, t):
        if len(w) == 4:
            return fused_experts(t["x"], w[0], w[1], t["topk_weights"], t["topk_ids"], use_fp8_w8a8=True,
                                 w1_scale=w[2], w2_scale=w[3], block_shape=[FP8_BLOCK, FP8_BLOCK])
        return fused_experts(t["x"], w[0], w[1], t["topk_weights"], t["topk_ids"])

    return run


def grouped_mm_moe(x, w13, w2, topk_weights, topk_ids):
    """The MoE layer around ``torch._grouped_mm``, as an engine would write it (no host sync)."""
    m, k = topk_ids.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    key = torch.where(valid, flat, E)
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(E + 1, dtype=torch.int64, device=x.device).scatter_add_(0, key, torch.ones_like(key))
    offs = torch.cumsum(counts[:E], 0).to(torch.int32)
    tokens = order // k
    h = torch._grouped_mm(x[tokens], w13.transpose(1, 2), offs)
    act = (torch.nn.functional.silu(h[:, :inter].float()) * h[:, inter:].float()).to(x.dtype)
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs).float()
    wt = topk_weights.reshape(-1).float()[order]
    y = torch.where(valid[order][:, None], y * wt[:, None], 0.0)  # rows past offs[E-1] are undefined
    return torch.zeros(m, w2.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tokens, y).to(x.dtype)


def grouped_mm_runner(device: torch.device):
    if not hasattr(torch, "_grouped_mm"):
        raise Unavailable("torch._grouped_mm needs torch >= 2.8")
    return lambda w, t: grouped_mm_moe(t["x"], w[0], w[1], t["topk_weights"], t["topk_ids"])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    scale = float(want.abs().max()) if want.numel() else 0.0
    return float((got - want).abs().max()) / max(scale, 1e-30) if want.numel() else 0.0


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:160]


# --------------------------------------------------------------------------- the sweep


def plan(args, device: torch.device) -> tuple[list[Preset], list[int]]:
    if args.quick:
        name, (E, k, H, I) = QUICK_PRESET
        return [Preset(name, E, k, H, I)], list(args.m or QUICK_M)
    presets = [Preset(n, *PRESETS[n]) for n in (args.preset or list(PRESETS))]
    return presets, sorted(set(args.m or DEFAULT_M))


def select_backends(args, device: torch.device) -> tuple[list[str], bool]:
    if args.backend:
        return list(dict.fromkeys(args.backend)), True
    if device.type == "cuda":
        return ["triton", "triton-atomic", "reference", "vllm", "grouped_mm"], False
    return ["cpu", "triton", "reference", "grouped_mm"], False


def _memory_cap(args, device: torch.device) -> float:
    if args.max_weight_gb is not None:
        return args.max_weight_gb * 2**30
    if device.type == "cuda":
        return 0.4 * torch.cuda.get_device_properties(device).total_memory
    try:
        import os

        return 0.4 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 * 2**30


def _availability(name: str, device: torch.device, explicit: bool, flops: float, args) -> tuple[str, str] | None:
    if getattr(args, "weights", "same") == "fp8" and name in NO_FP8:
        return "n/a", "no fp8 variant"
    if name in BASELINES:
        return None
    avail = dspark_kernels.backends("fused_moe")
    base = "triton" if name.startswith("triton-") else name
    if base == "triton" and device.type == "cpu":
        if not explicit:
            return "skipped", "Triton interpreter on CPU: far too slow to mean anything (--backend triton forces it)"
        if not avail["triton"]:
            return "n/a", "Triton on CPU needs TRITON_INTERPRET=1"
    if base == "cpu" and device.type != "cpu":
        return "n/a", "cpu backend runs on CPU tensors (use --device cpu)"
    if not avail.get(base, False):
        return "n/a", "backend not available here (no triton)"
    if device.type == "cpu" and flops > args.flop_cap:
        return "skipped", f"{flops:.2g} FLOPs > --flop-cap {args.flop_cap:.0e} on CPU"
    return None


def run(args, ctx) -> list[dict]:
    device = ctx.device
    presets, ms = plan(args, device)
    names, explicit = select_backends(args, device)
    dtype = DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    fp8 = getattr(args, "weights", "same") == "fp8"
    ceiling = ctx.ceiling_GBps()
    cases: list[dict] = []
    progress = ctx.progress(len(presets) * len(ms), NAME)
    for preset in presets:
        group = preset.label(dtype_name(dtype) + (" fp8-w128" if fp8 else ""))
        weight_bytes = preset.experts * preset.expert_bytes(elem, fp8)
        if weight_bytes > _memory_cap(args, device):
            for m in ms:
                progress.step(f"{group} M={m}")
                cases.append(new_case(op=NAME, group=group, preset=preset.name, batch=m, dtype=args.dtype,
                                      backend="*", status="skipped",
                                      note=f"weights {weight_bytes / 2**30:.1f} GiB exceed the memory cap "
                                           f"(--max-weight-gb)"))
            continue
        weights = make_weights(preset, dtype, device, args.seed, fp8)
        for m in ms:
            progress.step(f"{group} M={m}")
            try:
                cases += _run_case(args, ctx, preset, group, weights, m, names, explicit, dtype, elem, ceiling)
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                cases.append(new_case(op=NAME, group=group, preset=preset.name, batch=m, dtype=args.dtype,
                                      backend="*", status="error", note=_short(exc)))
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    return cases


def _run_case(args, ctx, preset: Preset, group: str, weights, m: int, names: list[str], explicit: bool,
              dtype: torch.dtype, elem: int, ceiling: float | None) -> list[dict]:
    device = ctx.device
    copies = GPU_ROUTINGS if device.type == "cuda" else 1
    tokens = [make_tokens(preset, m, dtype, device, args.seed * 1000 + m * 10 + i) for i in range(copies)]
    touched = sum(touched_experts(t["topk_ids"], preset.experts) for t in tokens) / copies
    flops = 2.0 * m * preset.top_k * 3 * preset.hidden * preset.inter
    nbytes = int(touched * preset.expert_bytes(elem, len(weights) == 4) + 2 * m * preset.hidden * elem + 8 * m * preset.top_k)
    base = dict(op=NAME, group=group, preset=preset.name, batch=m, gamma=None, dtype=args.dtype, mode="uniform",
                bytes=nbytes, experts_touched=touched, flops=flops)

    ref_out = None
    if device.type == "cuda" or flops <= args.flop_cap:
        ref_out = own_runner("reference")(weights, tokens[0])

    cases = []
    for name in names:
        case = new_case(**base, backend=name)
        cases.append(case)
        why = _availability(name, device, explicit, flops, args)
        if why is not None:
            case["status"], case["note"] = why
            continue
        try:
            if name in OWN:
                fn = own_runner(name)
            elif name == "vllm":
                fn = vllm_runner(device)
            else:
                fn = grouped_mm_runner(device)
            out = fn(weights, tokens[0])
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Unavailable as exc:
            case["status"], case["note"] = "n/a", str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - reported in the table, the sweep goes on
            status = "error" if name in OWN else "n/a"
            case["status"], case["note"] = status, _short(exc)
            continue
        notes = [f"{touched:.0f} experts"]
        if ref_out is not None and name != "reference":
            err = rel_err(out, ref_out)
            if name in OWN:
                case["correct"] = err <= TOLERANCE
            notes.append(f"err {err:.1e}")
        try:
            t = _time(ctx, name, fn, weights, tokens)
        except Exception as exc:  # noqa: BLE001
            case["status"], case["note"] = "error" if name in OWN else "n/a", "timing: " + _short(exc)
            continue
        tflops = flops / t.median_s / 1e12
        notes.append(f"{tflops:.3g} TFLOP/s")
        case.update(status="ok", note="; ".join(notes), median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, n=t.n,
                    method=t.method, copies=t.copies, tflops=tflops)
        case["GBps"] = nbytes / t.median_s / 1e9
        case["pct_ceiling"] = 100.0 * case["GBps"] / ceiling if ceiling else None

    add_speedups(cases, baselines=("reference",))
    return cases


def _time(ctx, name: str, fn, weights, tokens: list[dict]) -> timing.Timing:
    if ctx.device.type == "cuda" and name != "reference":
        return timing.time_cuda(lambda i: fn(weights, tokens[i]), copies=len(tokens), repeat=ctx.repeat,
                                max_time=ctx.max_time, graph=ctx.graph)

    def sync_call(i):
        out = fn(weights, tokens[i])
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    if name == "reference":
        return timing.time_cpu(sync_call, copies=len(tokens), repeat=ctx.repeat, max_time=ctx.max_time, warmup=0,
                               min_repeat=2)
    return timing.time_cpu(sync_call, copies=len(tokens), repeat=ctx.repeat, max_time=ctx.max_time)
