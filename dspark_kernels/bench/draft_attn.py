"""`dspark-bench draft-attn`: draft_block_attention vs the reference and eager SDPA.

Cases: preset x γ x batch B x backend, shapes of the drafters (docs/attention.md):

* ``v4-mqa``     DeepSeek-V4 drafter: MQA, H=64 query heads, Hkv=1, D=512, W=128, sinks;
* ``qwen3-gqa``  a Qwen3-like GQA drafter: H=32, Hkv=8, D=128, W=128, sinks;
* ``quick`` (--quick) H=4, Hkv=1, D=64, W=16 (tiny CPU shapes for CI).

Every request drafts γ tokens (γ ∈ {5, 7, 15} by default) and has a context of
``W .. 4W`` tokens (the steady state: a full window that has wrapped around; with
--quick ``0 .. 2W`` so empty and partial windows appear too).

Backends: ``triton`` (the GPU kernel; on CPU only with ``--backend triton``,
through the interpreter), ``cpu`` (PyTorch SDPA in fp32), ``reference`` (float64
loops; only up to ``--reference-cap`` (request, head) pairs) and ``eager``: the
batched, padded ``scaled_dot_product_attention`` an engine without this op would
write, in the inputs' dtype on their device (``x eager`` is the ratio to it).

Correctness, once per case before timing: each backend's rows of the first two
requests against the float64 reference with FlashAttention's rule (error at most
twice eager's error in the same dtype, plus 1e-6 / 1e-3 / 8e-3 for fp32 / fp16 / bf16).

Work and traffic (``GB/s`` and ``%ceil`` use the bytes)::

    FLOPs     = 4 · H · D · Σ_b n_b · (n_vis,b + n_b)              QKᵀ and PV
    bytes_min = s · D · (2·T·H + 2·T·Hkv + 2·Hkv·Σ_b n_vis,b)     q, out; block K/V; visible context K/V
              + 4·(B + 1) + 4·B + 4·H                              offsets, lengths, sinks

with ``T = Σ_b n_b``, ``s`` the element size. The note gives GFLOP/s and the
percentage of the measured matmul peak of the device in the same dtype
(``JSON: flops, gflops, pct_flop_ceiling, flop_ceiling``); at these shapes the op
is bandwidth bound (arithmetic intensity ~ γ·H/Hkv FLOP per context byte), so
``%ceil`` (bytes) is the figure of merit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import dspark_kernels

from . import timing
from .presets import DTYPES
from .report import add_speedups, new_case

NAME = "draft-attn"
HELP = "draft_block_attention: the drafter's block attention vs the reference and eager SDPA"

PRESETS = {  # name -> (H, Hkv, D, W)
    "v4-mqa": (64, 1, 512, 128),
    "qwen3-gqa": (32, 8, 128, 128),
}
QUICK_PRESET = ("quick", (4, 1, 64, 16))
DEFAULT_GAMMAS = (5, 7, 15)
DEFAULT_BATCHES = (1, 16, 128)
QUICK_GAMMAS = (5,)
QUICK_BATCHES = (1, 4)
OWN = ("cuda", "triton", "cpu", "reference")
ALL_BACKENDS = OWN + ("eager",)
REFERENCE_CAP = 256
EPS = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 8e-3}
CHECK_REQUESTS = 2


@dataclass(frozen=True)
class Group:
    preset: str
    heads: int
    kv_heads: int
    head_dim: int
    window: int
    gamma: int
    dtype: str
    sinks: bool

    def label(self) -> str:
        return (f"{self.preset} H={self.heads} Hkv={self.kv_heads} D={self.head_dim} W={self.window} "
                f"γ={self.gamma} {self.dtype}{'' if self.sinks else ' no-sinks'}")


def add_arguments(p) -> None:
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), metavar="NAME",
                   help=f"shape presets (default: all): {', '.join(f'{k}=H,Hkv,D,W {v}' for k, v in PRESETS.items())}")
    p.add_argument("--batch", type=int, nargs="+", metavar="B", help=f"batch sizes (default {list(DEFAULT_BATCHES)})")
    p.add_argument("--gamma", type=int, nargs="+", metavar="G", help=f"block lengths (default {list(DEFAULT_GAMMAS)})")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default fp32 on CPU, bf16 on GPU")
    p.add_argument("--no-sinks", action="store_true", help="without attention sinks")
    p.add_argument("--backend", nargs="+", choices=ALL_BACKENDS, metavar="NAME",
                   help=f"implementations to time: {', '.join(ALL_BACKENDS)} (default: every one that runs here)")
    p.add_argument("--reference-cap", type=int, default=REFERENCE_CAP,
                   help="time the reference only when B*H is at most this (default %(default)d)")


def plan(args, device: torch.device) -> tuple[list[Group], list[int]]:
    if args.quick:
        presets = [QUICK_PRESET]
        gammas, batches = list(args.gamma or QUICK_GAMMAS), list(args.batch or QUICK_BATCHES)
    else:
        presets = [(p, PRESETS[p]) for p in (args.preset or list(PRESETS))]
        gammas, batches = list(args.gamma or DEFAULT_GAMMAS), list(args.batch or DEFAULT_BATCHES)
    dtypes = list(args.dtype or (["bf16"] if device.type == "cuda" else ["fp32"]))
    groups = [Group(name, *shape, gamma, dt, not args.no_sinks)
              for name, shape in presets for gamma in gammas for dt in dtypes]
    return groups, sorted(set(batches))


# --------------------------------------------------------------------------- inputs


def make_inputs(group: Group, batch: int, device: torch.device, seed: int, quick: bool) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    H, Hkv, D, W, g = group.heads, group.kv_heads, group.head_dim, group.window, group.gamma
    T = batch * g
    dtype = DTYPES[group.dtype]
    lo, hi = (0, 2 * W) if quick else (W, 4 * W)
    ctx_lens = torch.randint(lo, hi + 1, (batch,), generator=gen, dtype=torch.int32)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    inp = {
        "q": rnd(T, H, D, scale=2.0), "k_block": rnd(T, Hkv, D), "v_block": rnd(T, Hkv, D),
        "k_ctx": rnd(batch, W, Hkv, D), "v_ctx": rnd(batch, W, Hkv, D),
        "cu_block": (torch.arange(batch + 1, dtype=torch.int32) * g).to(device),
        "ctx_lens": ctx_lens.to(device),
        "sinks": (torch.randn(H, generator=gen) * 2.0).to(device) if group.sinks else None,
    }
    n_vis = ctx_lens.clamp(max=W).to(torch.int64)
    s = torch.empty((), dtype=dtype).element_size()
    inp["flops"] = 4.0 * H * D * float((g * (n_vis + g)).sum())
    inp["bytes"] = int(s * D * (2 * T * H + 2 * T * Hkv + 2 * Hkv * int(n_vis.sum())) + 4 * (batch + 1) + 4 * batch
                       + (4 * H if group.sinks else 0))
    inp["max_block_len"] = g
    return inp


_BIG = ("q", "k_block", "v_block", "k_ctx", "v_ctx")


def rotate(inp: dict, copies: int) -> list[dict]:
    out = [inp]
    for _ in range(copies - 1):
        out.append(dict(inp, **{k: inp[k].clone() for k in _BIG}))
    return out


def head_slice(inp: dict, requests: int) -> dict:
    """The first `requests` requests (results do not depend on the batch's composition)."""
    cu = inp["cu_block"]
    t = int(cu[requests])
    s = {k: inp[k][:t] for k in ("q", "k_block", "v_block")}
    s.update({k: inp[k][:requests] for k in ("k_ctx", "v_ctx", "ctx_lens")})
    s["cu_block"] = cu[: requests + 1]
    s["sinks"] = inp["sinks"]
    return s


_ARGS = ("q", "k_block", "v_block", "k_ctx", "v_ctx", "cu_block", "ctx_lens")


def own_runner(name: str):
    def run(inp: dict):
        return dspark_kernels.draft_block_attention(*(inp[k] for k in _ARGS), sinks=inp["sinks"],
                                                    max_block_len=inp["max_block_len"], backend=name)
    return run


def eager_runner(inp: dict):
    from ..cpu.draft_block_attention import draft_block_attention as padded_sdpa

    return padded_sdpa(*(inp[k] for k in _ARGS), inp["sinks"], compute_dtype=None)


def _error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    return (out.cpu().double() - ref64).abs().max().item() if out.numel() else 0.0


# --------------------------------------------------------------------------- matmul ceiling

_FLOP_CEILINGS: dict[tuple, float] = {}


def flop_ceiling(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """Measured dense matmul FLOP/s of the device in `dtype` (cached per run)."""
    key = (str(device), dtype, quick)
    if key not in _FLOP_CEILINGS:
        n = (512 if quick else 2048) if device.type == "cpu" else (2048 if quick else 8192)
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        if device.type == "cuda":
            t = timing.time_cuda(lambda _i: a @ b, repeat=10, graph="off").median_s
        else:
            if dtype != torch.float32:  # CPU half matmuls are emulated: use fp32's peak as the ceiling
                a, b = a.float(), b.float()
            t = timing.time_cpu(lambda _i: a @ b, repeat=3 if quick else 5).median_s
        _FLOP_CEILINGS[key] = 2.0 * n**3 / t
    return _FLOP_CEILINGS[key]


# --------------------------------------------------------------------------- runner


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:160]


def select_backends(args, device: torch.device) -> tuple[list[str], bool]:
    if args.backend:
        return list(dict.fromkeys(args.backend)), True
    if device.type == "cuda":
        return ["triton", "reference", "eager"], False
    return ["cpu", "triton", "reference", "eager"], False


def _availability(name: str, device: torch.device, explicit: bool, group: Group, batch: int,
                  reference_cap: int) -> tuple[str, str] | None:
    if name == "eager":
        return None
    avail = dspark_kernels.backends("draft_block_attention")
    if name == "cuda":
        return "n/a", "no CUDA C++ kernel for this op: Triton is its GPU backend"
    if name == "triton" and device.type == "cpu":
        if not explicit:
            return "skipped", "Triton interpreter on CPU: far too slow to mean anything (--backend triton forces it)"
        if not avail["triton"]:
            return "n/a", "Triton on CPU needs TRITON_INTERPRET=1"
    if name == "cpu" and device.type != "cpu":
        return "n/a", "cpu backend runs on CPU tensors (use --device cpu)"
    if not avail.get(name, False):
        return "n/a", "backend not available here (no triton)"
    if name == "reference" and batch * group.heads > reference_cap:
        return "skipped", f"reference too slow: B*H = {batch * group.heads} > {reference_cap}"
    return None


def run(args, ctx) -> list[dict]:
    device = ctx.device
    groups, batches = plan(args, device)
    names, explicit = select_backends(args, device)
    ceiling = ctx.ceiling_GBps()
    cases: list[dict] = []
    progress = ctx.progress(len(groups) * len(batches), NAME)
    seed = args.seed
    for group in groups:
        for batch in batches:
            progress.step(f"{group.label()} B={batch}")
            seed += 1
            try:
                cases += _run_case(args, ctx, group, batch, names, explicit, ceiling, seed)
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                cases.append(new_case(op=NAME, group=group.label(), preset=group.preset, batch=batch,
                                      gamma=group.gamma, dtype=group.dtype, backend="*", status="error",
                                      note=_short(exc)))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    progress.close()
    return cases


def _run_case(args, ctx, group: Group, batch: int, names: list[str], explicit: bool, ceiling: float | None,
              seed: int) -> list[dict]:
    device = ctx.device
    inp = make_inputs(group, batch, device, seed, args.quick)
    dtype = DTYPES[group.dtype]
    peak = flop_ceiling(device, dtype, args.quick)
    base = dict(op=NAME, group=group.label(), preset=group.preset, batch=batch, gamma=group.gamma,
                dtype=group.dtype, mode="sinks" if group.sinks else "no-sinks", bytes=inp["bytes"],
                flops=inp["flops"], flop_ceiling=peak, heads=group.heads, kv_heads=group.kv_heads,
                head_dim=group.head_dim, window=group.window)

    # ---- correctness yardstick: the float64 reference and eager's error on the first requests
    check_n = min(batch, CHECK_REQUESTS)
    sl = head_slice(inp, check_n)
    t_check = int(inp["cu_block"][check_n])
    from ..reference.draft_block_attention import draft_block_attention as reference_impl

    ref64 = reference_impl(*(sl[k] for k in _ARGS), sl["sinks"], out_dtype=torch.float64).cpu()
    eager_err = _error(eager_runner(inp)[:t_check], ref64)
    tol = 2 * eager_err + EPS[group.dtype]

    copies = timing.rotation_copies(sum(inp[k].numel() * inp[k].element_size() for k in _BIG), device)
    inputs = rotate(inp, copies)

    cases: list[dict] = []
    for name in names:
        case = new_case(**base, backend=name)
        cases.append(case)
        why = _availability(name, device, explicit, group, batch, args.reference_cap)
        if why is not None:
            case["status"], case["note"] = why
            continue
        fn = eager_runner if name == "eager" else own_runner(name)
        try:
            out = fn(inp)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported in the table, the sweep goes on
            case["status"], case["note"] = "error", _short(exc)
            continue
        err = _error(out[:t_check], ref64)
        notes = [f"err {err:.1e}"]
        if name != "eager":
            case["correct"] = bool(err <= tol)
            notes[0] += f" (tol {tol:.1e})"
        try:
            t = timing.time_backend(ctx, name, fn, inputs)
        except Exception as exc:  # noqa: BLE001
            case["status"], case["note"] = "error", "timing: " + _short(exc)
            continue
        gflops = inp["flops"] / t.median_s / 1e9
        notes.append(f"{gflops:.3g} GFLOP/s ({100 * gflops * 1e9 / peak:.2g}% of matmul)")
        case.update(status="ok", note="; ".join(notes), median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, n=t.n,
                    method=t.method, copies=t.copies, gflops=gflops, pct_flop_ceiling=100 * gflops * 1e9 / peak,
                    error=err, tolerance=tol)
        case["GBps"] = inp["bytes"] / t.median_s / 1e9
        case["pct_ceiling"] = 100.0 * case["GBps"] / ceiling if ceiling else None

    add_speedups(cases)
    return cases



