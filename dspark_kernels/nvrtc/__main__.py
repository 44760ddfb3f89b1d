"""``python -m dspark_kernels.nvrtc compile --arch sm_90a [--arch sm_100a] [--no-cache] [--program NAME ...] [--jobs N]``

Compiles every NVRTC program for each architecture (no GPU needed: NVRTC emits the
cubin itself), prints each kernel's registers, stack, spills and shared memory
(from ptxas's verbose report in the NVRTC log), and exits non-zero if a program
does not compile or a kernel spills.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import _compiler, _programs


def _demangle_short(lowered: dict[str, str], mangled: str) -> str:
    for name, sym in lowered.items():
        if sym == mangled:
            return name.replace("dspark::", "")
    return mangled


def _compile_one(job):
    program, arch, use_cache = job
    try:
        return _compiler.compile_program(program, arch, use_cache=use_cache), None
    except _compiler.NvrtcError as exc:
        return None, str(exc)


def compile_all(archs: list[str], use_cache: bool, only: list[str] | None = None, jobs: int = 1,
                out=sys.stdout) -> int:
    major, minor = _compiler.nvrtc_version()
    print(f"NVRTC {major}.{minor}; cache {_compiler.cache_dir() if use_cache else '(off)'}", file=out)
    failures = 0
    for arch in archs:
        programs = [p for p in _programs.all_programs() if not only or p.name in only]
        if only and len(programs) != len(set(only)):
            known = [p.name for p in _programs.all_programs()]
            raise SystemExit(f"unknown program in {only}; programs: {known}")
        start = time.perf_counter()
        kernels = 0
        print(f"\n{arch}: {len(programs)} programs", file=out)
        print(f"  {'kernel':<58} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6}", file=out)
        work = [(p, arch, use_cache) for p in programs]
        if jobs > 1:  # NVRTC compiles one program on one core: programs in parallel processes
            import concurrent.futures
            with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
                results = list(pool.map(_compile_one, work))
        else:
            results = [_compile_one(w) for w in work]
        for program, (c, error) in zip(programs, results):
            if error is not None:
                failures += 1
                print(f"  ERROR {program.name}: {error}", file=out)
                continue
            usage = _compiler.resource_usage(c.log)
            if not usage:
                failures += 1
                print(f"  ERROR {program.name}: no ptxas report in the NVRTC log", file=out)
            for u in usage:
                kernels += 1
                spill = u.spill_stores or u.spill_loads
                flag = "  SPILL" if spill else ""
                failures += 1 if spill else 0
                print(f"  {_demangle_short(c.lowered, u.kernel):<58} {u.registers:>4} {u.stack:>5} "
                      f"{u.spill_stores:>5}/{u.spill_loads:<5} {u.smem:>6}{flag}", file=out)
        print(f"  {kernels} kernels in {time.perf_counter() - start:.1f} s", file=out)
    print(f"\n{'FAILED: ' + str(failures) + ' error(s) or spill(s)' if failures else 'OK: no errors, no spills'}",
          file=out)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspark_kernels.nvrtc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile every kernel through NVRTC (no GPU needed)")
    comp.add_argument("--arch", action="append", required=True, help="sm_90a, sm_100a, ... (repeatable)")
    comp.add_argument("--no-cache", action="store_true", help="compile even when the cache holds the cubin")
    comp.add_argument("--program", action="append", help="only this program (repeatable), e.g. kv, verify_tree_F32_F32")
    comp.add_argument("--jobs", type=int, default=1, help="programs compiled in parallel (processes)")
    args = parser.parse_args(argv)
    try:
        return compile_all(args.arch, use_cache=not args.no_cache, only=args.program, jobs=max(1, args.jobs))
    except _compiler.NvrtcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
