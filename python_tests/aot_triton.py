"""Ahead-of-time Triton compilation for the aot_compile_*.py scripts (no GPU needed).

One place for the part they share: compile a kernel for a target through Triton's
full lowering (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) and
report its shared memory, registers and stack from ``cuobjdump -res-usage``. The
scripts decide the signatures, constexprs and alignment attributes (they model
the JIT's run-time specialisations differently) and how much stack counts as a spill.
TRITON_INTERPRET must be unset before triton is imported.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_and_measure(target, fn, sig: dict, consts: dict, attrs: dict, warps: int, stages: int,
                        max_stack_bytes: int, max_error_chars: int = 3000) -> tuple[bool, str]:
    """(ok, info): ok is False on a compile error or more than ``max_stack_bytes`` of stack."""
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                           options=dict(num_warps=warps, num_stages=stages))
    except Exception as exc:  # noqa: BLE001 - reported per kernel
        return False, f"{type(exc).__name__}: {str(exc)[:max_error_chars]}"
    info = f"shared {k.metadata.shared} B"
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", res)
        if m:
            info += f", {m.group(1)} registers, stack {m.group(2)} B"
            if int(m.group(2)) > max_stack_bytes:
                return False, info + " (spills)"
    return True, info


def main(description: str, jobs, compile_one, argv=None) -> int:
    """The scripts' command line: compile every job ``(label, kernel, *args)`` with
    ``compile_one(target, kernel, *args)`` for ``--arch``; exit 1 if one fails."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--only", help="compile only kernels whose label contains this")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for label, fn, *rest in jobs():
        if args.only and args.only not in label:
            continue
        ok, info = compile_one(target, fn, *rest)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {label}: {info}", flush=True)
    print(f"{'all compiled' if not failed else f'{failed} failed'} for sm_{args.arch}")
    return 1 if failed else 0
