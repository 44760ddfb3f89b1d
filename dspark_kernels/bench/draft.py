"""`dspark-bench draft`: draft_sample_block per backend, against the reference and eager PyTorch.

Cases: vocabulary preset x gamma x batch B x mode, where mode is

* ``parallel``   no Markov head: all B * gamma rows sampled at once;
* ``markov``     the DSpark Markov head (r = 256): gamma sequential steps, each
                 ``l = base[:, k] + w1[x_prev] @ w2`` then a sample.

Rows are sampled at T = 1 (``--greedy`` for temperature None); logits are returned
(``return_logits=True``, what verify_block needs). Inputs: base logits N(0, 2^2)
with one peaked token per row, Markov weights N(0, 1/r) / N(0, 1) in the logits dtype
(fp32 on CPU, bf16 on GPU).

Baselines: the reference (a Python loop; timed only when ``B * gamma * V * (r or 1)``
is small), and ``eager``: the same computation in plain batched PyTorch (fp32
logits, ``torch.matmul`` for the correction, a Gumbel race with torch's generator);
its tokens differ (other random stream) and are not compared.

Correctness is checked on the first batch size of every group, on a one-request
slice, against the reference (tokens exactly; results do not depend on batch
composition), and every backend against the cpu backend on the whole batch when it
runs on CPU tensors.

Bytes (the fewest the op must move; ``GB/s`` and ``%ceil`` use this)::

    parallel: B·gamma·V·s_base            read the base logits
            + B·gamma·V·4                 write the fp32 logits
    markov:   the same, plus gamma·r·V·s_w  read w2 once per step (the floor of the
                                            Markov head: one pass over w2 per position)
"""

from __future__ import annotations

import math

import torch

import dspark_kernels

from . import timing
from .presets import DTYPES, VOCAB_PRESETS
from .report import add_speedups, new_case

NAME = "draft"
HELP = "draft_sample_block: block drafting with the DSpark Markov head, vs the reference and eager PyTorch"

OWN = ("cuda", "triton", "cpu", "reference")
DEFAULT_GAMMA = (5, 7, 15)
DEFAULT_BATCHES = (1, 16, 128)
MODES = ("parallel", "markov")
RANK = 256
QUICK_VOCAB = 1000
QUICK_BATCHES = (1, 4)
QUICK_GAMMA = (5,)
REFERENCE_CAP = 3e6  # B * gamma * V * max(r, 1) above which the reference is not timed


def add_arguments(p) -> None:
    p.add_argument("--preset", nargs="+", choices=sorted(VOCAB_PRESETS), metavar="NAME",
                   help=f"vocabulary presets (default: all): {', '.join(f'{k}={v}' for k, v in VOCAB_PRESETS.items())}")
    p.add_argument("--vocab", type=int, nargs="+", metavar="V", help="custom vocabulary sizes (added to --preset)")
    p.add_argument("--batch", type=int, nargs="+", metavar="B", help=f"batch sizes (default {list(DEFAULT_BATCHES)})")
    p.add_argument("--gamma", type=int, nargs="+", metavar="G", help=f"drafts per request (default {list(DEFAULT_GAMMA)})")
    p.add_argument("--mode", nargs="+", choices=MODES, help="parallel and/or markov (default both)")
    p.add_argument("--rank", type=int, default=RANK, help="Markov rank r (default %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="logits / weights dtype (default fp32 on CPU, bf16 on GPU)")
    p.add_argument("--greedy", action="store_true", help="temperature None (argmax) instead of T = 1")
    p.add_argument("--backend", nargs="+", choices=OWN + ("eager",), metavar="NAME",
                   help="implementations to time (default: every one that runs here)")
    p.add_argument("--reference-cap", type=float, default=REFERENCE_CAP,
                   help="time the reference only when B*γ*V*r is at most this (default %(default).0e)")


def make_inputs(batch, gamma, vocab, rank, markov, dtype, device, seed, greedy):
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(batch, gamma, vocab, generator=g, device=device) * 2.0
    peak = torch.randint(0, vocab, (batch, gamma), generator=g, device=device)
    base.scatter_(2, peak[..., None], math.log(vocab) + 2.0)
    inp = {
        "base_logits": base.to(dtype),
        "anchor": torch.randint(0, vocab, (batch,), generator=g, device=device, dtype=torch.int32),
        "markov_w1": (torch.randn(vocab, rank, generator=g, device=device) / math.sqrt(rank)).to(dtype)
        if markov else None,
        "markov_w2": torch.randn(rank, vocab, generator=g, device=device).to(dtype) if markov else None,
        "temperature": None if greedy else torch.ones(batch, device=device),
        "seed": torch.arange(batch, device=device, dtype=torch.int64) + 7919 * seed,
        "offset": torch.randint(0, 2**20, (batch,), generator=g, device=device, dtype=torch.int64),
    }
    return inp


def min_bytes(inp: dict) -> int:
    base = inp["base_logits"]
    n = base.numel() * (base.element_size() + 4)
    if inp["markov_w2"] is not None:
        n += base.shape[1] * inp["markov_w2"].numel() * inp["markov_w2"].element_size()
    return n


def eager_draft(inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain batched PyTorch: fp32 logits, torch.matmul for the Markov correction, a
    Gumbel race with torch's generator (greedy: argmax)."""
    base = inp["base_logits"]
    batch, gamma, vocab = base.shape
    temp = inp["temperature"]

    def sample(logits):
        if temp is None:
            return torch.argmax(logits, dim=-1)
        u = torch.rand_like(logits).clamp_(min=1e-20)
        return torch.argmax(logits / temp.view(-1, *([1] * (logits.dim() - 1))) - torch.log(-torch.log(u)), dim=-1)

    if inp["markov_w1"] is None:
        logits = base.float()
        return sample(logits).to(torch.int32), logits
    w1, w2 = inp["markov_w1"], inp["markov_w2"]
    out = torch.empty(batch, gamma, vocab, dtype=torch.float32, device=base.device)
    tokens = torch.empty(batch, gamma, dtype=torch.int32, device=base.device)
    prev = inp["anchor"].long()
    for k in range(gamma):
        logits = base[:, k].float() + (w1[prev] @ w2).float()
        out[:, k] = logits
        x = sample(logits)
        tokens[:, k] = x.to(torch.int32)
        prev = x
    return tokens, out


def own_runner(name: str):
    def run(inp):
        return dspark_kernels.draft_sample_block(
            inp["base_logits"], inp["anchor"], markov_w1=inp["markov_w1"], markov_w2=inp["markov_w2"],
            temperature=inp["temperature"], seed=inp["seed"], offset=inp["offset"], return_logits=True, backend=name)
    return run


def _slice(inp: dict) -> dict:
    s = dict(inp)
    for k in ("base_logits", "anchor", "temperature", "seed", "offset"):
        if inp[k] is not None:
            s[k] = inp[k][:1]
    return s


def _to_cpu(inp: dict) -> dict:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def run(args, ctx) -> list[dict]:
    device = ctx.device
    if args.quick:
        vocabs = [("quick", QUICK_VOCAB)]
        batches = list(args.batch or QUICK_BATCHES)
        gammas = list(args.gamma or QUICK_GAMMA)
        rank = min(args.rank, 32)
    else:
        vocabs = [(p, VOCAB_PRESETS[p]) for p in (args.preset or ([] if args.vocab else list(VOCAB_PRESETS)))]
        batches = list(args.batch or DEFAULT_BATCHES)
        gammas = list(args.gamma or DEFAULT_GAMMA)
        rank = args.rank
    vocabs += [(f"custom-{v}", v) for v in (args.vocab or [])]
    modes = list(args.mode or MODES)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    if args.backend:
        names, explicit = list(dict.fromkeys(args.backend)), True
    else:
        names = ["cuda", "triton", "reference", "eager"] if device.type == "cuda" else ["cpu", "reference", "eager"]
        explicit = False
    avail = dspark_kernels.backends("draft_sample_block")
    ceiling = ctx.ceiling_GBps()
    cases: list[dict] = []
    progress = ctx.progress(len(vocabs) * len(gammas) * len(modes) * len(batches), NAME)
    seed = args.seed
    for preset, vocab in vocabs:
        for gamma in gammas:
            for mode in modes:
                markov = mode == "markov"
                group = f"{preset} V={vocab} γ={gamma} {dtype_name} {mode}" + (f" r={rank}" if markov else "") + \
                    (" greedy" if args.greedy else "")
                for bi, batch in enumerate(sorted(set(batches))):
                    progress.step(f"{group} B={batch}")
                    seed += 1
                    try:
                        cases += _run_case(args, ctx, names, explicit, avail, ceiling, group, preset, vocab, gamma,
                                           mode, markov, rank, dtype, dtype_name, batch, seed, bi == 0)
                    except torch.cuda.OutOfMemoryError as exc:
                        torch.cuda.empty_cache()
                        cases.append(new_case(op=NAME, group=group, preset=preset, vocab=vocab, batch=batch,
                                              gamma=gamma, dtype=dtype_name, mode=mode, backend="*", status="error",
                                              note=str(exc)[:160]))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    progress.close()
    return cases


def _run_case(args, ctx, names, explicit, avail, ceiling, group, preset, vocab, gamma, mode, markov, rank, dtype,
              dtype_name, batch, seed, slice_check):
    device = ctx.device
    inp = make_inputs(batch, gamma, vocab, rank, markov, dtype, device, seed, args.greedy)
    nbytes = min_bytes(inp)
    base = dict(op=NAME, group=group, preset=preset, vocab=vocab, batch=batch, gamma=gamma, dtype=dtype_name,
                mode=mode, bytes=nbytes)
    work = batch * gamma * vocab * (rank if markov else 1)
    ref_slice = sl = None
    if slice_check:
        sl = _slice(inp)
        ref_slice = own_runner("reference")(_to_cpu(sl))
    full_check = own_runner("cpu")(_to_cpu(inp)) if avail["cpu"] and device.type == "cpu" else None
    cases = []
    for name in names:
        case = new_case(**base, backend=name)
        cases.append(case)
        if name != "eager" and not avail.get(name, False):
            case["status"], case["note"] = "n/a", "backend not available here"
            continue
        if (name == "cpu" and device.type != "cpu") or (name == "cuda" and device.type != "cuda"):
            case["status"], case["note"] = "n/a", f"needs {name} tensors"
            continue
        if name == "triton" and device.type == "cpu" and not explicit:
            case["status"], case["note"] = "skipped", "Triton interpreter on CPU (--backend triton forces it)"
            continue
        if name == "reference" and work > args.reference_cap:
            case["status"], case["note"] = "skipped", f"reference too slow: B*γ*V*r = {work:.2g} > {args.reference_cap:.0e}"
            continue
        fn = eager_draft if name == "eager" else own_runner(name)
        try:
            out = fn(inp)
            notes, checks = [], []
            if name != "eager":
                if full_check is not None and name != "cpu":
                    checks.append(torch.equal(out[0].cpu(), full_check[0]))
                    notes.append("= cpu")
                if ref_slice is not None and name != "reference":
                    got = fn(sl)
                    checks.append(torch.equal(got[0].cpu(), ref_slice[0]))
                    notes.append("= reference (1-request slice)")
            else:
                notes.append("torch RNG: not compared")
            case["correct"] = all(checks) if checks else None
            if device.type == "cuda" and name != "reference":
                t = timing.time_cuda(lambda _i: fn(inp), repeat=ctx.repeat, max_time=ctx.max_time, graph=ctx.graph)
            else:
                t = timing.time_cpu(lambda _i: fn(inp), repeat=ctx.repeat, max_time=ctx.max_time,
                                    warmup=0 if name == "reference" else 1, min_repeat=2 if name == "reference" else 3)
        except Exception as exc:  # noqa: BLE001 - reported, the sweep goes on
            case["status"], case["note"] = "error", f"{type(exc).__name__}: {exc}"[:160]
            continue
        case.update(status="ok", note="; ".join(notes), median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, n=t.n,
                    method=t.method, copies=t.copies, GBps=nbytes / t.median_s / 1e9)
        case["pct_ceiling"] = 100.0 * case["GBps"] / ceiling if ceiling else None
    add_speedups(cases)
    return cases
