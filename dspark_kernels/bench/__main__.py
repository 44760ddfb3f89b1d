"""Entry point of ``dspark-bench`` / ``python -m dspark_kernels.bench``."""

from __future__ import annotations

import argparse
import sys

import torch

from . import BenchContext, report, subcommands, timing


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the inputs live (default: cuda when available, else cpu)")
    g.add_argument("--quick", action="store_true", help="tiny shapes for CI and tests (V=1000, B in {1, 4})")
    g.add_argument("--repeat", type=int, metavar="N", help="timed calls per measurement (default: adaptive)")
    g.add_argument("--max-time", type=float, metavar="S",
                   help="seconds of timed calls per measurement when --repeat is not given "
                        "(default 1.0 on CPU, 0.2 on GPU, 0.05 with --quick)")
    g.add_argument("--graph", choices=("auto", "on", "off"), default="auto",
                   help="CUDA-graph timing: auto = for calls under 1 ms (default)")
    g.add_argument("--seed", type=int, default=0, help="seed of the input generator")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")
    g.add_argument("--json", metavar="PATH", help="write the results as JSON")
    g.add_argument("--record", action="store_true", help="also write them under bench/results/ (docs/performance.md)")
    g.add_argument("--plot", metavar="PATH", help="PNG of time and %% of the copy ceiling vs batch size")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    return common


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    common = _common_parser()
    parser = argparse.ArgumentParser(prog="dspark-bench", description="Benchmarks of the dspark_kernels ops.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cmds = subcommands()
    for name, mod in cmds.items():
        mod.add_arguments(sub.add_parser(name, parents=[common], help=mod.HELP, description=mod.HELP))
    all_p = sub.add_parser("all", parents=[common], help="every subcommand with its defaults",
                           description=f"Run every subcommand ({', '.join(cmds)}) with its defaults "
                                       "(loop: its --quick case).")
    all_p.add_argument("--model", choices=("auto", "trained", "tiny"), default="auto",
                       help="models of `loop` (default auto: the cached trained ones, else the tiny untrained "
                            "ones; `all` never trains unless --model trained)")
    return parser, cmds


def _defaults_for(mod, common_args: argparse.Namespace) -> argparse.Namespace:
    """The subcommand's default arguments, with the options of `common_args` (the common ones and
    any of `all`'s own that the subcommand also has, e.g. --model), then its ``ALL_DEFAULTS``."""
    p = argparse.ArgumentParser(add_help=False, parents=[_common_parser()])
    mod.add_arguments(p)
    ns = p.parse_args([])
    for key in vars(_common_parser().parse_args([])):
        setattr(ns, key, getattr(common_args, key))
    for key, value in vars(common_args).items():
        if key != "command" and hasattr(ns, key):
            setattr(ns, key, value)
    for key, value in getattr(mod, "ALL_DEFAULTS", {}).items():
        setattr(ns, key, value)
    return ns


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dspark-bench: --device cuda but torch sees no CUDA device")
    return torch.device(name)


def measure_ceilings(device: torch.device, quick: bool) -> dict:
    ceilings = {"cpu": timing.cpu_copy_ceiling(32 * 2**20 if quick else 256 * 2**20), "gpu": None}
    if device.type == "cuda":
        ceilings["gpu"] = timing.gpu_copy_ceiling(2**28 if quick else 2**30)
    return ceilings


def main(argv: list[str] | None = None) -> int:
    parser, cmds = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    max_time = args.max_time if args.max_time is not None else (
        0.05 if args.quick else (0.2 if device.type == "cuda" else 1.0))
    runs = [(mod, _defaults_for(mod, args)) for mod in cmds.values()] if args.command == "all" else [
        (cmds[args.command], args)]

    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"dspark-bench: device {device}, measuring copy-bandwidth ceilings ...")
    ctx = BenchContext(device=device, ceilings=measure_ceilings(device, args.quick), repeat=args.repeat,
                       max_time=max_time, graph=args.graph, quiet=args.quiet)
    doc = report.environment(device)
    doc["ceilings"] = ctx.ceilings
    cases: list[dict] = []
    for mod, ns in runs:
        cases += mod.run(ns, ctx)
    doc["cases"] = cases

    own_rows = {m.NAME: (m.TABLE_HEADER, m.table_row) for m in cmds.values() if hasattr(m, "table_row")}
    print(report.format_table(cases, ctx.ceilings, own_rows))
    print(f"\n{doc['device']}: {doc['gpu_name'] or doc['cpu_name']}; torch {doc['torch']}, triton {doc['triton']}, "
          f"python {doc['python']}, {doc['threads']} threads, commit {(doc['commit'] or '?')[:9]}")
    if args.json:
        log(f"results written: {report.write_json(args.json, doc)}")
    if args.record:
        log(f"results recorded: {report.record(doc)}")
    if args.plot:
        log(report.plot(cases, args.plot, {m.NAME: m.plot_group for m in cmds.values() if hasattr(m, "plot_group")}))

    bad = [c for c in cases if c.get("correct") is False]
    own_errors = [c for c in cases if c.get("status") == "error" and c.get("backend") in ("cuda", "triton", "cpu",
                                                                                           "reference", "fused", "*")]
    for c in bad:
        print(f"MISMATCH: {c['op']} {c['group']} B={c['batch']} backend={c['backend']}", file=sys.stderr)
    for c in own_errors:
        print(f"ERROR: {c['op']} {c['group']} B={c['batch']} backend={c['backend']}: {c['note']}", file=sys.stderr)
    return 1 if bad or own_errors else 0


if __name__ == "__main__":
    sys.exit(main())
