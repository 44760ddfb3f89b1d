"""``python -m dspark_kernels.loop --tp P``: the main job with a vocabulary-parallel target head.

P CPU processes (gloo, ``distributed.launch.spawn``) each hold the whole model
(replicated) but compute only their columns of the target's LM head
(``Target.lm_head_columns``) and verify with ``dspark_kernels.distributed`` on those
columns: the logits are never gathered. The same requests then run in this process
through the same code at world size 1. Every rank's tokens must equal the world-1
tokens (greedy and sampled: the randomness contract makes the sharded race the same
race), and the table says so, with τ, tokens/s of both and the bytes each rank handed
to torch.distributed per verify step (counted).
"""

from __future__ import annotations

import argparse
import time

import torch

from .. import distributed
from .engine import VocabParallel


def _decode_all(args, target, drafter, info, tp_of) -> list[dict]:
    from .__main__ import held_out_prompts, run

    rows = []
    for batch in args.batch:
        prompts = held_out_prompts(info["held_out"], args.prompts or max(batch, 2))
        for temperature in args.temperature:
            cfg = argparse.Namespace(**vars(args))
            cfg.batch, cfg.temperature, cfg.schedule = batch, temperature, "static"
            tp = tp_of()
            run(target, drafter, prompts[:batch], cfg, gamma=args.gamma, max_new=8, tp=tp)  # warm-up
            times, outputs, steps = [], None, 0
            distributed.stats.reset()
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                reqs, _, eng = run(target, drafter, prompts, cfg, gamma=args.gamma, tp=tp)
                times.append(time.perf_counter() - t0)
                outputs, steps = [r.output for r in reqs], eng.num_steps
            tokens = sum(len(o) for o in outputs)
            req_steps = sum(r.steps for r in reqs)
            rows.append({"batch": batch, "temperature": temperature, "outputs": outputs,
                         "time": sorted(times)[len(times) // 2], "tokens": tokens, "tau": tokens / max(req_steps, 1),
                         "bytes_per_step": distributed.stats.bytes / max(steps * args.repeats, 1),
                         "collectives_per_step": distributed.stats.collectives / max(steps * args.repeats, 1)})
    return rows


def _worker(rank: int, world: int, args) -> list[dict]:
    from .train import load_or_train

    target, drafter, info = load_or_train(retrain=False)
    vocab = target.cfg.vocab_size
    return _decode_all(args, target, drafter, info, lambda: VocabParallel.split(vocab, rank, world))


def main_tp(args) -> int:
    from ..distributed.launch import spawn
    from .train import load_or_train

    world = args.tp
    target, drafter, info = load_or_train(retrain=args.retrain)
    vocab = target.cfg.vocab_size
    shards = [VocabParallel.split(vocab, r, world).columns for r in range(world)]
    print(f"--tp {world}: target LM head split by vocabulary over {world} gloo processes, columns {shards} of "
          f"{vocab}; 1 thread per process (and for the --tp 1 run)")
    args.retrain = False  # the workers load what this process trained or loaded
    per_rank = spawn(_worker, world, args, timeout_s=1800, threads=1)
    torch.set_num_threads(1)
    single = _decode_all(args, target, drafter, info, lambda: VocabParallel.split(vocab, 0, 1))
    ok = True
    print(f"\nγ = {args.gamma}, {args.max_new_tokens} new tokens per prompt, median of {args.repeats} runs")
    print(f"  {'B':>2s} {'T':>3s} {'τ':>5s} {f'tp{world} tok/s':>11s} {'tp1 tok/s':>10s} {'B/rank/step':>12s} "
          f"{'coll/step':>9s}  tokens = tp1 (every rank)")
    for j, one in enumerate(single):
        same = all(r[j]["outputs"] == one["outputs"] for r in per_rank)
        ok &= same
        mine = per_rank[0][j]
        print(f"  {one['batch']:2d} {one['temperature']:3g} {mine['tau']:5.2f} {mine['tokens'] / mine['time']:11.1f} "
              f"{one['tokens'] / one['time']:10.1f} {mine['bytes_per_step']:12,.0f} {mine['collectives_per_step']:9.1f}"
              f"  {'yes' if same else 'NO'}")
    print(f"tokens identical to --tp 1 on every rank: {'yes' if ok else 'NO'}")
    return 0 if ok else 1
