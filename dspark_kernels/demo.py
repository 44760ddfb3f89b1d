"""The Quick start's main job: the draft/verify loop on our fused ops, then a short benchmark.

    python -m dspark_kernels.demo [loop options…] [--no-bench]

1. ``python -m dspark_kernels.loop``: loads the byte-level MoE target and the DSpark
   drafter shipped with the package (trained on the Python standard library's
   source by ``python -m dspark_kernels.loop.train``), then decodes held-out prompts
   with and without speculation at B = 1 and 8, greedy and T = 1, printing the
   text, τ, tokens/s against autoregressive decoding, the drafter's cost against
   the target's and the time per op, and checking greedy output token for token.
2. ``dspark-bench verify --quick``: verify_block against the reference and eager
   PyTorch (and FlashInfer / vLLM when importable) on one real vocabulary size.
"""

from __future__ import annotations

import sys

import dspark_kernels as dk


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench = "--no-bench" not in argv
    argv = [a for a in argv if a != "--no-bench"]
    print(f"dspark_kernels {dk.__version__}: verify_block backends {dk.backends('verify_block')}")
    from .loop.__main__ import main as loop_main

    status = loop_main(argv)
    if bench:
        from .bench.__main__ import main as bench_main

        print()
        status |= bench_main(["verify", "--quick"])
    return status


if __name__ == "__main__":
    raise SystemExit(main())
