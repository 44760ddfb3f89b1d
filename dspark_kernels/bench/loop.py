"""`dspark-bench loop`: the whole draft → schedule → verify → commit loop, end to end.

Runs ``dspark_kernels.loop.SpecDecoder`` (the continuously batched engine on our
ops) and, on the same prompts in the same run, plain autoregressive decoding of
the same target through the same code (``gamma=0``). Cases: γ x batch size B x
schedule (``static``: verify all γ drafts; ``dspark``: ``schedule_verify_lens``
with a steps-per-second table measured by ``SpecDecoder.profile_sps`` just before)
x backend (``fused``: the ops' default dispatch; ``reference``: every op's
reference), plus one autoregressive (AR) case per B and backend.

Models (``--model``):

* ``trained``: ``dspark_kernels.loop.train.load_or_train`` (byte-level target
  and distilled drafter: the weights shipped with the package); prompts are B slices of 32–64 bytes
  of its held-out text at evenly spaced offsets (each starting after a newline);
* ``tiny``: small untrained random models built here (vocab 256, seeded by
  ``--seed``; tests use them, nothing is trained); prompts are random ids;
* ``auto``: the trained models if cached, else ``tiny``: never trains. ``dspark-bench
  all`` runs this subcommand with ``--model auto`` (``all --model`` overrides) and
  always with ``--quick``; the case's ``preset`` / ``model`` and its note say which
  models ran.

``--method block`` adds every chain case again with block verification
(``verify_block(method="block")``; schedule column ``static block``). ``--tree``
adds, per γ, the tree mode (loop/tree.py: a tree of depth γ, ``--tree-branch K``
children per node at each of the first two levels, a chain after; every node
verified in one target pass, ``verify_tree``; schedule column ``tree 2x2``) and the
static chain of the same number of verified tokens (γ = the tree's node count,
schedule column ``static γ=14``, for each ``--method``); the tree's note gives τ
and tokens/s against that chain and against the static chain of the same depth.
``--tree-siblings top-k sample`` picks how the tree's children are drafted (the
drafter's top-K, verified as point masses; or, for sampling, i.i.d. draws verified
against q: schedule column ``tree 2x2 sample``).

Every request generates exactly ``--max-new-tokens`` tokens (no EOS), so the
speculative and AR runs do the same work. Timing: the engine is built, one
``generate`` warms it up, then ``generate`` is timed (wall clock, CUDA
synchronised) ``--repeat`` times or as many as fit ``--max-time`` (1 to 10).

Columns and JSON fields (besides the common ones):

* ``τ`` (``tau``): tokens emitted per verify step, Σ len(output) / Σ steps;
* ``acc`` (``acceptance``): accepted drafts / drafts sent to verification;
* ``tok/s`` (``tokens_per_s``): Σ len(output) / median run time; ``AR tok/s``
  (``ar_tokens_per_s``) the same for the AR case; ``x AR`` (``speedup_vs_ar``)
  their ratio;
* ``identical``: greedy (``--temperature 0``) only: every request's speculative
  output equals its AR output token for token (also the case's ``correct``, so a
  difference is a MISMATCH and exit code 1); None when sampling;
* ``split``: percent of the run's wall time per region of the engine's
  ``OpTimers`` — ``tgt`` target forward (verify passes and prefill), ``drf``
  drafter forward, ``smp`` draft_sample_block (tree mode: the tree drafting),
  ``sch`` schedule_verify_lens, ``ver`` verify_block / verify_tree, ``kv`` kv_commit + kv_release_pages, ``ctx`` drafter
  context projection + window_commit, ``host`` the rest (Python bookkeeping,
  host/device copies). JSON: ``op_time_s`` (seconds per run, by the engine's
  region names, plus ``host``) and ``op_pct``. On the CPU the timers run in the
  timed runs (they only read the clock); on CUDA they synchronise around every
  region, so the split comes from one extra run after the timed ones;
* ``bytes`` / ``GB/s`` / ``%ceil``: model weights streamed: every target
  parameter once per target pass (decode steps and prefill) and the drafter's
  own parameters plus the shared embedding / LM head once per drafting step,
  over the median run time — the bound of a memory-bound decoder. The small
  models here fit in the caches, so ``%ceil`` can exceed 100.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from . import timing
from .report import fmt_time, new_case

NAME = "loop"
HELP = "the speculative decoding loop end to end (SpecDecoder): τ, tokens/s and speed-up over autoregressive"

# What `dspark-bench all` runs (applied after all's own options): the one small case.
ALL_DEFAULTS = {"quick": True}

DEFAULT_GAMMA = (3, 5, 7)
DEFAULT_BATCH = (1, 4, 16)
QUICK_GAMMA = (5,)
QUICK_BATCH = (2,)
SCHEDULES = ("static", "dspark")
BACKENDS = ("fused", "reference")
MODELS = ("trained", "tiny", "auto")
DEFAULT_MAX_NEW = 64
QUICK_MAX_NEW = 32
PROMPT_MIN, PROMPT_MAX = 32, 64

# JSON fields of every loop case besides report.CASE_KEYS (None where they do not apply)
LOOP_KEYS = ("model", "temperature", "max_new_tokens", "tokens", "steps", "tau", "drafted", "accepted_drafts",
             "acceptance", "tokens_per_s", "ar_tokens_per_s", "speedup_vs_ar", "identical", "op_time_s", "op_pct",
             "target_passes", "drafter_passes", "sps_profile_s", "verify_method", "tree_branches", "tree_nodes",
             "tree_siblings")

# engine region (OpTimers name) -> table abbreviation; "host" is the rest of the wall time
SPLIT = (("target forward", "tgt"), ("drafter forward", "drf"), ("draft_sample_block", "smp"),
         ("schedule_verify_lens", "sch"), ("verify_block", "ver"), ("kv_commit + release", "kv"),
         ("drafter context", "ctx"), ("window_commit", "ctx"), ("draft tree", "smp"), ("verify_tree", "ver"))
SPLIT_COLS = ("tgt", "drf", "smp", "sch", "ver", "kv", "ctx", "host")

# Tiny untrained models (`--model tiny`): vocab 256, a MoE layer, a 1-layer drafter.
TINY_TARGET = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, moe_layers=(1,),
                   n_experts=4, top_k=2, d_expert=32, hidden_layers=(0, 1))
TINY_DRAFTER = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, window=32, max_gamma=16,
                    markov_rank=8)


def add_arguments(p) -> None:
    p.add_argument("--gamma", type=int, nargs="+", metavar="G",
                   help=f"drafts per step (default {' '.join(map(str, DEFAULT_GAMMA))}; --quick {QUICK_GAMMA[0]})")
    p.add_argument("--batch", type=int, nargs="+", metavar="B",
                   help=f"concurrent requests (default {' '.join(map(str, DEFAULT_BATCH))}; --quick {QUICK_BATCH[0]})")
    p.add_argument("--schedule", nargs="+", choices=SCHEDULES, help="verify-length schedules (default both)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"tokens generated per request (default {DEFAULT_MAX_NEW}; --quick {QUICK_MAX_NEW})")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (default 0: greedy, and outputs are compared with AR)")
    p.add_argument("--backend", nargs="+", choices=BACKENDS,
                   help="ops of the engine: fused (default dispatch; default) and/or reference")
    p.add_argument("--method", nargs="+", choices=("token", "block"),
                   help="chain verification: token (default) and/or block (block verification)")
    p.add_argument("--tree", action="store_true",
                   help="add the tree mode (a tree of depth γ, verify_tree) and the chain of its node count")
    p.add_argument("--tree-branch", default="2", metavar="K",
                   help="tree children per node at each of the first two levels (default 2), or K1,K2,... per level")
    p.add_argument("--tree-siblings", nargs="+", choices=("top-k", "sample"),
                   help="tree children: the drafter's top-K (default) and/or i.i.d. samples verified against q")
    p.add_argument("--model", choices=MODELS, default="trained",
                   help="trained: load_or_train (trains once, minutes; default); tiny: small untrained random "
                        "models; auto: trained if cached, else tiny")


# --------------------------------------------------------------------------- models and prompts


def trained_cache_path():
    """Where ``load_or_train()`` keeps the default trained models; None if it cannot be told."""
    try:
        from dspark_kernels.loop import train

        corpus, _ = train.stdlib_corpus(train.TrainConfig().corpus_bytes)
        key = train._cache_key(train.TargetConfig(), train.DrafterConfig(), train.TrainConfig(), corpus)
        return train.cache_dir() / f"loop-{key}.pt"
    except Exception:  # noqa: BLE001 - a changed cache scheme just means "not known to be cached"
        return None


def resolve_model(model: str) -> tuple[str, str]:
    """(models to run: "trained" | "tiny", why) for ``--model``; ``auto`` never trains."""
    if model != "auto":
        return model, model
    from dspark_kernels.loop.train import WEIGHTS_DIR

    if (WEIGHTS_DIR / "settings.json").exists():
        return "trained", "auto: trained (the shipped weights)"
    path = trained_cache_path()
    if path is not None and path.exists():
        return "trained", f"auto: trained (cached {path.name})"
    return "tiny", "auto: tiny (trained models not cached; `dspark-bench loop` trains them once)"


def tiny_models(seed: int):
    from dspark_kernels.loop import Drafter, DrafterConfig, Target, TargetConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target = Target(TargetConfig(**TINY_TARGET))
        drafter = Drafter(DrafterConfig(**TINY_DRAFTER), target)
    return target.eval(), drafter.eval()


def make_prompts(batch: int, held_out: torch.Tensor | None, vocab: int, seed: int) -> list[list[int]]:
    """B prompts of 32–64 tokens: evenly spaced slices of ``held_out`` (each starting after a
    newline when one is near), or random ids in ``[1, vocab)`` when it is None."""
    lengths = [PROMPT_MIN + (7 * i) % (PROMPT_MAX - PROMPT_MIN + 1) for i in range(batch)]
    if held_out is None:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    text = held_out.to(torch.int64)
    span = text.numel() - PROMPT_MAX - 256
    if span <= 0:
        raise ValueError(f"held-out text too short for prompts ({text.numel()} tokens)")
    prompts = []
    for i, n in enumerate(lengths):
        start = (2 * i + 1) * span // (2 * batch)
        newline = (text[start:start + 256] == ord("\n")).nonzero()
        if newline.numel():
            start += int(newline[0]) + 1
        prompts.append(text[start:start + n].tolist())
    return prompts


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


# --------------------------------------------------------------------------- measurement


def _measure(build, prompts: list[list[int]], args, ctx) -> dict:
    """Warm up once, then time ``generate`` on fresh requests; the op split from the timers."""
    from dspark_kernels.loop import OpTimers, Request

    device = ctx.device
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def once(timed_regions: bool):
        timers = OpTimers(enabled=timed_regions)
        dec = build(timers)
        reqs = [Request(list(p), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        seed=args.seed * 1000 + i, eos_id=None) for i, p in enumerate(prompts)]
        sync()
        t0 = time.perf_counter()
        dec.generate(reqs)
        sync()
        return time.perf_counter() - t0, reqs, timers

    once(False)                                          # warm-up
    samples, totals = [], {}
    dt, reqs, timers = once(not cuda)
    samples.append(dt)
    n = timing._num_repeats(dt, ctx.max_time, ctx.repeat, 1, 10)
    runs = [timers]
    for _ in range(n - 1):
        dt, _reqs, timers = once(not cuda)
        samples.append(dt)
        runs.append(timers)
    if cuda:                                             # the timers synchronise: one run of their own
        wall, _reqs, timers = once(True)
        runs, walls = [timers], [wall]
    else:
        walls = samples
    for t in runs:
        for k, v in t.total.items():
            totals[k] = totals.get(k, 0.0) + v / len(runs)
    calls = dict(runs[0].calls)
    wall = sum(walls) / len(walls)
    op_time = dict(totals)
    op_time["host"] = max(0.0, wall - sum(totals.values()))
    return dict(timing=timing.summarize(samples, "cuda-sync-perf_counter" if cuda else "cpu-perf_counter"),
                requests=reqs, op_time_s=op_time, op_pct={k: 100.0 * v / wall for k, v in op_time.items()},
                calls=calls)


def _fill(case: dict, m: dict, weights: tuple[int, int], ctx) -> None:
    reqs, t = m["requests"], m["timing"]
    tokens = sum(len(r.output) for r in reqs)
    steps = sum(r.steps for r in reqs)
    drafted, accepted = sum(r.drafted for r in reqs), sum(r.accepted for r in reqs)
    target_bytes, drafter_bytes = weights
    nbytes = m["calls"].get("target forward", 0) * target_bytes + m["calls"].get("drafter forward", 0) * drafter_bytes
    case.update(status="ok", median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, n=t.n, method=t.method, copies=1,
                bytes=nbytes, GBps=nbytes / t.median_s / 1e9, tokens=tokens, steps=steps, tau=tokens / max(steps, 1),
                drafted=drafted, accepted_drafts=accepted, acceptance=accepted / drafted if drafted else None,
                mean_accepted=accepted / max(steps, 1) if case["gamma"] else None,
                tokens_per_s=tokens / t.median_s, op_time_s=m["op_time_s"], op_pct=m["op_pct"],
                target_passes=m["calls"].get("target forward"), drafter_passes=m["calls"].get("drafter forward"))
    ceiling = ctx.ceiling_GBps()
    case["pct_ceiling"] = 100.0 * case["GBps"] / ceiling if ceiling else None


def run(args, ctx) -> list[dict]:
    from dspark_kernels.loop import SpecDecoder

    device = ctx.device
    log = (lambda *a: None) if ctx.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    gammas = [g for g in (args.gamma or (QUICK_GAMMA if args.quick else DEFAULT_GAMMA)) if g > 0]
    batches = list(args.batch or (QUICK_BATCH if args.quick else DEFAULT_BATCH))
    schedules = list(dict.fromkeys(args.schedule or SCHEDULES))
    backends = list(dict.fromkeys(args.backend or ("fused",)))
    if args.max_new_tokens is None:
        args.max_new_tokens = QUICK_MAX_NEW if args.quick else DEFAULT_MAX_NEW
    greedy = args.temperature <= 0
    methods = list(dict.fromkeys(getattr(args, "method", None) or ("token",)))
    trees = {}
    if getattr(args, "tree", False):
        from dspark_kernels.loop.tree import TreeLayout, parse_branches

        try:
            branches = parse_branches(args.tree_branch)
        except ValueError as exc:
            raise SystemExit(f"dspark-bench loop: {exc}") from None
        trees = {g: TreeLayout.build(g, branches) for g in gammas}

    model, why = resolve_model(args.model)
    if model == "trained":
        from dspark_kernels.loop.train import load_or_train

        from dspark_kernels.loop.train import WEIGHTS_DIR

        path = trained_cache_path()
        if not (WEIGHTS_DIR / "settings.json").exists() and (path is None or not path.exists()):
            log("dspark-bench loop: the trained models are not cached: training them now (several minutes; "
                "--model tiny skips this)")
        target, drafter, info = load_or_train(log=log)
        held_out = info["held_out"]
    else:
        target, drafter = tiny_models(args.seed)
        held_out = None
    target, drafter = target.to(device), drafter.to(device)
    too_big = [g for g in gammas if g > drafter.cfg.max_gamma]
    if too_big:
        raise SystemExit(f"dspark-bench loop: --gamma {too_big} above the drafter's max_gamma {drafter.cfg.max_gamma}")
    vocab = target.cfg.vocab_size
    target_bytes = _param_bytes(target.parameters())
    embed = target.embed.weight
    drafter_bytes = _param_bytes(drafter.parameters()) + embed.numel() * embed.element_size()  # + the tied head
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(target.embed.weight.dtype)
    note_model = "" if why == model else why

    cases: list[dict] = []
    siblings = list(dict.fromkeys(getattr(args, "tree_siblings", None) or ("top-k",)))
    per_gamma = len(schedules) * len(methods) + (len(methods) + len(siblings) if trees else 0)
    progress = ctx.progress(len(batches) * len(backends) * (1 + len(gammas) * per_gamma), NAME)
    for backend in backends:
        engine_backend = None if backend == "fused" else backend
        for batch in batches:
            prompts = make_prompts(batch, held_out, vocab, args.seed)
            window = max([*gammas, *(t.num_nodes for t in trees.values())], default=0)
            max_len = max(map(len, prompts)) + args.max_new_tokens + window + 1
            base = dict(dict.fromkeys(LOOP_KEYS), op=NAME, preset=model, model=model, vocab=vocab, batch=batch,
                        dtype=dtype, backend=backend, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens)

            def build(gamma, schedule, sps, ops=engine_backend, batch=batch, max_len=max_len, method="token",
                      tree=None, tree_siblings="top-k"):
                return lambda timers: SpecDecoder(target, drafter if gamma else None, gamma=gamma,
                                                  schedule=schedule, sps=sps, backend=ops,
                                                  max_batch=batch, max_len=max_len, timers=timers,
                                                  method=method, tree=tree, tree_siblings=tree_siblings)

            def measure(case, builder, notes):
                """Time one speculative configuration into ``case`` and compare it with AR; False on error."""
                try:
                    m = _measure(builder, prompts, args, ctx)
                    _fill(case, m, (target_bytes, drafter_bytes), ctx)
                except Exception as exc:  # noqa: BLE001
                    case.update(status="error", note=f"{type(exc).__name__}: {exc}"[:160])
                    return False
                if m_ar is not None:
                    case["ar_tokens_per_s"] = ar["tokens_per_s"]
                    case["speedup_vs_ar"] = case["tokens_per_s"] / ar["tokens_per_s"]
                    if greedy:
                        same = [r.output == q.output for r, q in zip(m["requests"], m_ar["requests"])]
                        case["identical"] = case["correct"] = all(same)
                        if not all(same):
                            notes.append(f"{same.count(False)}/{len(same)} outputs differ from AR")
                    else:
                        notes.append(f"T={args.temperature:g}: sampled, not compared")
                else:
                    notes.append("no AR baseline (it failed)")
                case["note"] = "; ".join(notes) or None
                return True

            progress.step(f"{model} AR B={batch} {backend}")
            ar = new_case(**base, group=f"{model} autoregressive", gamma=0, mode="autoregressive",
                          note=note_model or None)
            cases.append(ar)
            try:
                m_ar = _measure(build(0, "static", None), prompts, args, ctx)
                _fill(ar, m_ar, (target_bytes, drafter_bytes), ctx)
                ar.update(ar_tokens_per_s=ar["tokens_per_s"], speedup_vs_ar=1.0)
            except Exception as exc:  # noqa: BLE001 - reported, the sweep goes on
                ar.update(status="error", note=f"{type(exc).__name__}: {exc}"[:160])
                m_ar = None
            for gamma in gammas:
                static_chain = {}                  # method -> the static chain case of depth γ
                for schedule in schedules:
                    for method in methods:
                        label = schedule if method == "token" else f"{schedule} {method}"
                        progress.step(f"{model} γ={gamma} {label} B={batch} {backend}")
                        case = new_case(**dict(base, group=f"{model} γ={gamma}", gamma=gamma, mode=label,
                                               verify_method=method))
                        cases.append(case)
                        notes = [note_model] if note_model else []
                        sps = None
                        if schedule == "dspark":
                            try:
                                t0 = time.perf_counter()
                                sps = build(gamma, "static", None)(None).profile_sps()
                            except Exception as exc:  # noqa: BLE001
                                case.update(status="error", note=f"{type(exc).__name__}: {exc}"[:160])
                                continue
                            case["sps_profile_s"] = time.perf_counter() - t0
                            notes.append(f"sps profiled in {case['sps_profile_s']:.1f} s")
                        if measure(case, build(gamma, schedule, sps, method=method), notes) and schedule == "static":
                            static_chain[method] = case
                if gamma in trees:
                    _tree_cases(cases, trees[gamma], gamma, base, model, note_model, methods, siblings, static_chain,
                                drafter.cfg.max_gamma, build, measure, progress, f"B={batch} {backend}")
    progress.close()
    return cases


def _tree_cases(cases, layout, gamma, base, model, note_model, methods, siblings, static_chain, max_gamma, build,
                measure, progress, where) -> None:
    """The tree mode of depth γ and the static chain of its node count; τ / tok/s notes against both chains."""
    n = layout.num_nodes
    shape = "x".join(map(str, layout.branches))
    same_nodes = {}
    for method in methods:
        label = f"static γ={n}" + ("" if method == "token" else f" {method}")
        progress.step(f"{model} γ={gamma} {label} {where}")
        case = new_case(**dict(base, group=f"{model} γ={gamma}", gamma=n, mode=label, verify_method=method))
        cases.append(case)
        if n > max_gamma:
            case.update(status="skipped", note=f"a chain of {n} drafts exceeds the drafter's max_gamma {max_gamma}")
            continue
        notes = [note_model] if note_model else []
        notes.append(f"the chain of the tree {shape}'s {n} verified tokens")
        if measure(case, build(n, "static", None, method=method), notes):
            same_nodes[method] = case
    for sib in siblings:
        label = f"tree {shape}" + ("" if sib == "top-k" else f" {sib}")
        progress.step(f"{model} γ={gamma} {label} {where}")
        case = new_case(**dict(base, group=f"{model} γ={gamma}", gamma=gamma, mode=label, verify_method="tree",
                               tree_branches=list(layout.branches), tree_nodes=n, tree_siblings=sib))
        cases.append(case)
        notes = [note_model] if note_model else []
        if not measure(case, build(gamma, "static", None, tree=layout, tree_siblings=sib), notes):
            continue
        parts = []
        for what, other in [*((f"chain γ={gamma}" + ("" if m == "token" else f" {m}"), c)
                              for m, c in static_chain.items()),
                            *((f"chain γ={n}" + ("" if m == "token" else f" {m}"), c) for m, c in same_nodes.items())]:
            parts.append(f"{what} τ {other['tau']:.2f}, x{case['tokens_per_s'] / other['tokens_per_s']:.2f} tok/s")
        summary = f"{n} nodes: τ {case['tau']:.2f}" + (" vs " + "; ".join(parts) if parts else "")
        case["note"] = f"{case['note']}; {summary}" if case["note"] else summary


# --------------------------------------------------------------------------- table and plot


TABLE_HEADER = ["B", "schedule", "backend", "τ", "acc", "tok/s", "AR tok/s", "x AR", "identical", "run",
                "split % " + "/".join(SPLIT_COLS), "note"]


def _split(case: dict) -> str:
    pct = case.get("op_pct") or {}
    cols = dict.fromkeys(SPLIT_COLS, 0.0)
    for name, value in pct.items():
        cols[dict(SPLIT).get(name, "host")] += value
    return "/".join(f"{v:.0f}" for v in cols.values())


def table_row(c: dict) -> list[str]:
    """One row of the loop's table (report.format_table calls it for this subcommand's cases)."""
    sched = "-" if c.get("mode") == "autoregressive" else str(c.get("mode"))
    if c.get("status") != "ok":
        return [str(c.get("batch")), sched, str(c.get("backend")), c.get("status", "?"), "", "", "", "", "", "",
                "", c.get("note") or ""]

    def f(x, spec, suffix=""):
        return "-" if x is None else f"{x:{spec}}{suffix}"

    identical = {True: "yes", False: "NO", None: "-"}[c.get("identical")]
    return [str(c.get("batch")), sched, str(c.get("backend")), f(c.get("tau"), ".2f"),
            f(None if c.get("acceptance") is None else 100 * c["acceptance"], ".0f", "%"),
            f(c.get("tokens_per_s"), ".0f"), f(c.get("ar_tokens_per_s"), ".0f"), f(c.get("speedup_vs_ar"), ".2f", "x"),
            identical, fmt_time(c.get("median_s")), _split(c), c.get("note") or ""]


def plot_group(ax_left, ax_right, items: list[dict]) -> None:
    """Tokens/s (and the AR baseline, dashed) and the speed-up over AR against B."""
    lines: dict[tuple, list[dict]] = {}
    for c in items:
        lines.setdefault((c["mode"], c["backend"]), []).append(c)
    for (mode, backend), cs in lines.items():
        cs = sorted(cs, key=lambda c: c["batch"])
        xs = [c["batch"] for c in cs]
        label = f"{mode} {backend}"
        ax_left.plot(xs, [c["tokens_per_s"] for c in cs], marker="o", label=label)
        if mode == "autoregressive":
            ax_right.plot(xs, [c["op_pct"].get("target forward", 0.0) for c in cs], marker="o",
                          label=f"target forward ({backend})")
            ax_right.plot(xs, [c["op_pct"].get("host", 0.0) for c in cs], marker="s", label=f"host ({backend})")
            ax_right.set_ylabel("% of run time")
            continue
        ax_right.plot(xs, [c["speedup_vs_ar"] if c.get("speedup_vs_ar") else math.nan for c in cs], marker="o",
                      label=f"{label} (τ {' '.join(format(c['tau'], '.1f') for c in cs)})")
        ax_right.axhline(1.0, color="gray", linewidth=0.8)
        ax_right.set_ylabel("speed-up over AR")
    ar: dict[str, dict[int, float]] = {}
    for c in items:
        if c["mode"] != "autoregressive" and c.get("ar_tokens_per_s"):
            ar.setdefault(c["backend"], {})[c["batch"]] = c["ar_tokens_per_s"]
    for backend, pts in ar.items():
        xs = sorted(pts)
        ax_left.plot(xs, [pts[x] for x in xs], linestyle="--", marker="x", color="gray", label=f"AR {backend}")
    for ax in (ax_left, ax_right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size B")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax_left.set_ylabel("tokens / s")
