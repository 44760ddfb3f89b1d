"""`dspark-bench schedule`: schedule_verify_lens (DSpark Algorithm 1) per backend.

Cases: requests R x drafts per request gamma x mode (lossless = ``early_stop=True``,
async = ``early_stop=False``). Confidences are drawn so that survival decays along
the block (``c = 1 - 0.4 u^2``, u uniform); the steps-per-second table is flat
(memory bound) up to a knee at ``2R`` verified tokens, then falls as ``1/B``, with
1% jitter, and reaches ``Bmax = R (gamma + 1)``. The table's ``acc`` column is the
mean verify length chosen.

Baselines: the reference (plain Python Algorithm 1) and ``eager``, a vectorised
PyTorch version an engine would write (cumprod, a stable sort, a cumulative sum in
fp64, an argmax / first-non-improvement search, bincount); it computes tau in
floating point rather than our fixed point, so its result is compared only as a
sanity check (they agree unless two Theta values tie to ~1e-12).

Bytes: confidences (fp32) + the table (fp32) + the outputs; the op is latency-bound
(a handful of launches), so GB/s only says how small it is.
"""

from __future__ import annotations

import torch

import dspark_kernels

from . import timing
from .report import add_speedups, new_case

NAME = "schedule"
HELP = "schedule_verify_lens: DSpark's prefix scheduler, vs the reference and eager PyTorch"

OWN = ("cuda", "triton", "cpu", "reference")
DEFAULT_R = (1, 16, 128, 512)
DEFAULT_GAMMA = (5, 7, 15)
QUICK_R = (1, 16)
QUICK_GAMMA = (5,)
MODES = ("lossless", "async")
REFERENCE_CAP = 4000  # candidates R * gamma above which the reference is not timed


def add_arguments(p) -> None:
    p.add_argument("--batch", type=int, nargs="+", metavar="R", help=f"requests (default {list(DEFAULT_R)})")
    p.add_argument("--gamma", type=int, nargs="+", metavar="G", help=f"drafts per request (default {list(DEFAULT_GAMMA)})")
    p.add_argument("--mode", nargs="+", choices=MODES, help="lossless and/or async (default both)")
    p.add_argument("--backend", nargs="+", choices=OWN + ("eager",), metavar="NAME",
                   help="implementations to time (default: every one that runs here)")


def make_inputs(num_req: int, gamma: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    conf = 1.0 - 0.4 * torch.rand(num_req, gamma, generator=g) ** 2
    bmax = num_req * (gamma + 1)
    b = torch.arange(bmax + 1, dtype=torch.float64)
    knee = 2.0 * num_req
    sps = 100.0 / torch.where(b <= knee, torch.ones_like(b), b / knee)
    sps = sps * (1 + 0.01 * torch.rand(bmax + 1, generator=g, dtype=torch.float64))
    return conf.to(device), sps.float().to(device)


def eager_schedule(confidence: torch.Tensor, sps: torch.Tensor, early_stop: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 in eager PyTorch (floating-point tau): what an engine would write."""
    num_req, gamma = confidence.shape
    n = num_req * gamma
    kmax = max(0, min(n, sps.shape[0] - 1 - num_req))
    a = torch.cumprod(confidence.float().clamp(0, 1), dim=1).flatten()
    order = torch.sort(a, descending=True, stable=True).indices  # ties: r then j ascending
    tau = num_req + torch.cumsum(a[order][:kmax].double(), 0)
    theta = torch.cat([torch.tensor([num_req], dtype=torch.float64, device=a.device), tau]) * \
        sps[num_req : num_req + kmax + 1].double()
    if early_stop:
        worse = torch.nonzero(theta[1:] <= theta[:-1])
        k = int(worse[0]) if worse.numel() else kmax
    else:
        k = int(torch.argmax(theta))
    lens = torch.bincount(order[:k] // gamma, minlength=num_req).to(torch.int32)
    cu = torch.zeros(num_req + 1, dtype=torch.int32, device=a.device)
    cu[1:] = torch.cumsum(lens, 0)
    return lens, cu


def _runner(name: str, early: bool):
    if name == "eager":
        return lambda c, s: eager_schedule(c, s, early)
    return lambda c, s: dspark_kernels.schedule_verify_lens(c, s, early_stop=early, backend=name)


def run(args, ctx) -> list[dict]:
    device = ctx.device
    rs = list(args.batch or (QUICK_R if args.quick else DEFAULT_R))
    gammas = list(args.gamma or (QUICK_GAMMA if args.quick else DEFAULT_GAMMA))
    modes = list(args.mode or MODES)
    if args.backend:
        names = list(dict.fromkeys(args.backend))
    else:
        names = ["cuda", "triton", "reference", "eager"] if device.type == "cuda" else ["cpu", "reference", "eager"]
    avail = dspark_kernels.backends("schedule_verify_lens")
    cases: list[dict] = []
    progress = ctx.progress(len(rs) * len(gammas) * len(modes), NAME)
    seed = args.seed
    for gamma in gammas:
        for mode in modes:
            early = mode == "lossless"
            group = f"γ={gamma} {mode}"
            for num_req in rs:
                progress.step(f"{group} R={num_req}")
                seed += 1
                conf, sps = make_inputs(num_req, gamma, device, seed)
                nbytes = conf.numel() * 4 + sps.numel() * 4 + (2 * num_req + 1) * 4
                base = dict(op=NAME, group=group, preset=None, vocab=None, batch=num_req, gamma=gamma, dtype="fp32",
                            mode=mode, bytes=nbytes)
                check, check_name = None, None
                if num_req * gamma <= REFERENCE_CAP:
                    check_name = "reference"
                elif avail["cpu"]:
                    check_name = "cpu"
                if check_name:
                    check = dspark_kernels.schedule_verify_lens(conf.cpu(), sps.cpu(), early_stop=early,
                                                               backend=check_name)
                group_cases = []
                for name in names:
                    case = new_case(**base, backend=name)
                    group_cases.append(case)
                    if name != "eager" and not avail.get(name, False):
                        case["status"], case["note"] = "n/a", "backend not available here"
                        continue
                    if name == "cpu" and device.type != "cpu" or name == "cuda" and device.type != "cuda":
                        case["status"], case["note"] = "n/a", f"needs {name} tensors"
                        continue
                    if name == "triton" and device.type == "cpu" and not args.backend:
                        case["status"], case["note"] = "skipped", "Triton interpreter on CPU (--backend triton forces it)"
                        continue
                    if name == "reference" and num_req * gamma > REFERENCE_CAP:
                        case["status"], case["note"] = "skipped", f"reference too slow: R*γ > {REFERENCE_CAP}"
                        continue
                    fn = _runner(name, early)
                    try:
                        out = fn(conf, sps)
                        case["mean_accepted"] = float(out[0].float().mean())
                        if check is not None and name != check_name:
                            case["correct"] = torch.equal(out[0].cpu(), check[0]) and torch.equal(out[1].cpu(),
                                                                                                  check[1])
                            case["note"] = f"= {check_name}"
                            if name == "eager":  # floating tau: a sanity check, not a contract
                                case["note"] = "float tau; " + ("same lens" if case["correct"] else "lens differ")
                                case["correct"] = None
                        if device.type == "cuda" and name != "reference":
                            t = timing.time_cuda(lambda _i: fn(conf, sps), repeat=ctx.repeat, max_time=ctx.max_time,
                                                 graph="off" if name == "eager" else ctx.graph)
                        else:
                            t = timing.time_cpu(lambda _i: fn(conf, sps), repeat=ctx.repeat, max_time=ctx.max_time,
                                                warmup=0 if name == "reference" else 1,
                                                min_repeat=2 if name == "reference" else 3)
                    except Exception as exc:  # noqa: BLE001 - reported, the sweep goes on
                        case["status"], case["note"] = "error", f"{type(exc).__name__}: {exc}"[:160]
                        continue
                    case.update(status="ok", median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, n=t.n,
                                method=t.method, copies=t.copies, GBps=nbytes / t.median_s / 1e9)
                    ceiling = ctx.ceiling_GBps()
                    case["pct_ceiling"] = 100.0 * case["GBps"] / ceiling if ceiling else None
                add_speedups(group_cases)
                cases += group_cases
    progress.close()
    return cases
