"""`dspark-bench verify --tp P`: vocabulary-parallel verify_block against all-gather + verify_block.

P processes (gloo on CPU; one process per GPU with NCCL where several exist — this
module runs the CPU path) each hold a vocabulary shard of the same inputs as
``dspark-bench verify`` (``make_inputs``; shards as even as possible, so uneven when
P does not divide V). Two implementations on the same shards, in the same run:

* ``tp-shards``: ``dspark_kernels.distributed.verify_block`` on the shards;
* ``tp-gather``: what engines do today — all-gather the ``[N + B, V / P]`` target
  shards (and the draft rows, if any) to ``[N + B, V]`` on every rank, then
  ``dspark_kernels.verify_block`` (the default backend) on the gathered rows.

Time: median over calls of rank 0's wall time (each call starts after a barrier;
the collectives make every rank wait for the slowest). Bytes: what each rank hands
to torch.distributed per call (``distributed.stats``: payload of every all-reduce /
all-gather, counted at the call), for both implementations, including the layout
check's all-gather of ``tp-shards`` (CPU tensors check on every call). Check: both
return the same integers on every rank.
"""

from __future__ import annotations

import statistics
import time

import torch

from .report import new_case

TP_NAME = "verify"


def shard_bounds(vocab: int, world: int) -> list[tuple[int, int]]:
    """(start, width) per rank: the first ``vocab % world`` ranks get one more column."""
    base, extra = divmod(vocab, world)
    out, start = [], 0
    for r in range(world):
        w = base + (1 if r < extra else 0)
        out.append((start, w))
        start += w
    return out


def _worker(rank: int, world: int, jobs: list, repeat: int | None, max_time: float) -> list[dict]:
    import dspark_kernels as dk
    from dspark_kernels import distributed
    from dspark_kernels.distributed._comm import Comm

    from .verify import make_inputs

    comm = Comm()
    cpu = torch.device("cpu")
    results = []
    for group, batch, seed in jobs:
        inp = make_inputs(group, batch, cpu, seed)
        start, width = shard_bounds(group.vocab, world)[rank]
        local = {k: (inp[k][:, start:start + width].contiguous() if inp.get(k) is not None else None)
                 for k in ("target_logits", "draft_logits", "draft_probs")}
        common = dict(temperature=inp["temperature"], seed=inp["seed"], offset=inp["offset"],
                      max_num_draft=inp["max_num_draft"])

        def shards():
            return distributed.verify_block(local["target_logits"], inp["draft_tokens"], inp["cu_num_draft"],
                                            vocab_start=start, vocab_size=group.vocab,
                                            draft_logits=local["draft_logits"], draft_probs=local["draft_probs"],
                                            **common)

        def gather():
            full = {k: (torch.cat(list(comm.all_gather(v)), 1) if v is not None else None) for k, v in local.items()}
            return dk.verify_block(full["target_logits"], inp["draft_tokens"], inp["cu_num_draft"],
                                   draft_logits=full["draft_logits"], draft_probs=full["draft_probs"], **common)

        row = {"group": group, "batch": batch}
        outs = {}
        for name, fn in (("tp-shards", shards), ("tp-gather", gather)):
            distributed.stats.reset()
            outs[name] = fn()
            sent, collectives = distributed.stats.bytes, distributed.stats.collectives
            times = []
            deadline = time.perf_counter() + max_time
            n = 0
            while (repeat is None and (n < 3 or time.perf_counter() < deadline) and n < 50) or \
                    (repeat is not None and n < repeat):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                n += 1
            row[name] = {"median_s": statistics.median(times), "times": times, "bytes": sent,
                         "collectives": collectives}
        row["same"] = all(torch.equal(a, b) for a, b in zip(outs["tp-shards"], outs["tp-gather"]))
        row["mean_accepted"] = float(outs["tp-shards"][1].float().mean())
        results.append(row)
    return results


def run(args, ctx, groups, batches) -> list[dict]:
    from ..distributed.launch import spawn

    world = args.tp
    if world < 2:
        raise SystemExit("dspark-bench verify: --tp needs P >= 2")
    if ctx.device.type != "cpu":
        raise SystemExit("dspark-bench verify --tp runs gloo processes on the CPU: pass --device cpu")
    jobs, seed = [], args.seed
    for group in groups:
        if group.method != "token":
            continue
        for batch in batches:
            seed += 1
            jobs.append((group, batch, seed))
    threads = max(1, torch.get_num_threads() // world)
    per_rank = spawn(_worker, world, jobs, ctx.repeat, ctx.max_time, timeout_s=600 + 60 * len(jobs),
                     threads=threads)
    cases = []
    for j, row in enumerate(per_rank[0]):
        group, batch = row["group"], row["batch"]
        same = all(r[j]["same"] for r in per_rank)
        gather = row["tp-gather"]
        for name in ("tp-shards", "tp-gather"):
            m = row[name]
            times = sorted(m["times"])
            note = f"P={world}: {m['bytes']:,} B/rank/call in {m['collectives']} collectives"
            if name == "tp-shards":
                note += (f"; {gather['bytes'] / max(m['bytes'], 1):.0f}x fewer bytes, "
                         f"{gather['median_s'] / m['median_s']:.2f}x the speed of tp-gather")
            cases.append(new_case(op=TP_NAME, group=f"{group.label()} tp={world}", preset=group.preset,
                                  vocab=group.vocab, batch=batch, gamma=group.gamma, dtype=group.dtype,
                                  mode=group.mode, backend=name, status="ok", median_s=m["median_s"], n=len(times),
                                  p20_s=times[len(times) // 5], p80_s=times[(4 * len(times)) // 5],
                                  correct=same, mean_accepted=row["mean_accepted"], tp=world,
                                  bytes_per_rank=m["bytes"], collectives=m["collectives"], note=note))
    return cases
