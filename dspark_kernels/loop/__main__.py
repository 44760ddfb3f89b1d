"""The main job: speculative decoding of a trained byte-level model on our fused ops.

    python -m dspark_kernels.loop [--gamma 7] [--batch 1 8] [--temperature 0 1] [--repeats 3]
                                  [--schedule static|dspark] [--max-new-tokens 64] [--device cpu|cuda]
                                  [--method token|block] [--tree [--tree-branch 2] [--tree-siblings top-k|sample]]
                                  [--retrain] [--tp P]

Loads the target and the drafter shipped with the package (trained by
``python -m dspark_kernels.loop.train`` on the Python standard library's source;
``--retrain`` trains them again here), then, for every batch size and
temperature, generates from held-out prompts on the same target with plain
autoregressive decoding and with DSpark speculative decoding (draft → schedule →
verify → commit), ``--repeats`` times each. It prints the text, the acceptance
length τ, tokens per second of both (median), the drafter's cost against the
target's, where a step's time goes per op, and checks that greedy output is
identical in both runs and that the reference ops give the same tokens as the
fused ones.

``--method block`` verifies the chains with block verification; ``--tree`` drafts
a tree of depth γ instead (``--tree-branch K``: K children at each of the first two
levels, a chain after; ``K1,K2,…`` per level), verified in one target pass with
``verify_tree`` (static schedule; docs/loop.md#tree-mode); ``--tree-siblings sample``
draws a sampling request's children i.i.d. from the drafter instead of its top-K.

``--tp P`` runs the target's LM head vocabulary-parallel in P CPU processes (gloo):
each computes its columns of the logits and verifies on them with
``dspark_kernels.distributed``; the summary shows the same decoding at ``--tp 1``
(the same code path on one process) and checks that the tokens are identical
(loop/tp.py, docs/distributed.md).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .engine import OpTimers, Request, SpecDecoder
from .train import load_or_train
from .tree import TreeLayout, parse_branches


def held_out_prompts(held_out: torch.Tensor, count: int, length: int = 48) -> list[list[int]]:
    """``count`` prompts of about ``length`` bytes from held-out text, each starting at a line start."""
    data = held_out.tolist()
    prompts, step = [], max(1, (len(data) - 2 * length) // max(count, 1))
    for i in range(count):
        start = i * step
        while start < len(data) - length and (data[start - 1] != 10 if start else False):
            start += 1
        chunk = [b for b in data[start:start + length] if b != 0] or [10]
        prompts.append(chunk)
    return prompts


def show(tokens: list[int]) -> str:
    return bytes(tokens).decode("utf-8", errors="replace")


def spec_options(args, gamma) -> dict:
    """SpecDecoder's ``method`` / ``tree`` from the flags (``--tree``: a tree of depth γ)."""
    tree = TreeLayout.build(gamma, parse_branches(args.tree_branch)) if gamma and getattr(args, "tree", False) else None
    return dict(method=getattr(args, "method", "token"), tree=tree,
                tree_siblings=getattr(args, "tree_siblings", "top-k"))


def run(target, drafter, prompts, args, *, gamma, backend=None, sps=None, max_new=None, timers=None, tp=None):
    reqs = [Request(p, max_new_tokens=max_new or args.max_new_tokens, temperature=args.temperature, seed=1000 + i,
                    eos_id=0) for i, p in enumerate(prompts)]
    opts = spec_options(args, gamma)
    window = (opts["tree"].num_nodes if opts["tree"] is not None else gamma) + 1
    eng = SpecDecoder(target, drafter if gamma else None, gamma=gamma, schedule=args.schedule if gamma else "static",
                      sps=sps, backend=backend, max_batch=args.batch, page_size=16,
                      max_len=max(len(p) for p in prompts) + (max_new or args.max_new_tokens) + window,
                      timers=timers, tp=tp, **opts)
    dev = target.embed.weight.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    eng.generate(reqs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return reqs, time.perf_counter() - t0, eng


DRAFTER_REGIONS = ("drafter forward", "drafter context", "window_commit", "draft_sample_block")


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def measure(target, drafter, prompts, args, *, batch, temperature, sps):
    """Autoregressive and speculative decoding of ``prompts`` with ``batch`` slots, ``args.repeats`` times each
    (interleaved); returns the last runs' requests, the median times, and the speculative runs' op timers."""
    cfg = argparse.Namespace(**vars(args))
    cfg.batch, cfg.temperature = batch, temperature
    t_ar, t_spec = [], []
    timers_ar, timers_spec = OpTimers(enabled=True), OpTimers(enabled=True)
    # Warm-up (allocator, kernels, Triton compiles on GPU) at this batch size.
    run(target, drafter, prompts[:batch], cfg, gamma=args.gamma, sps=sps, max_new=8)
    run(target, drafter, prompts[:batch], cfg, gamma=0, max_new=8)
    for _ in range(args.repeats):
        ar, t, eng_ar = run(target, drafter, prompts, cfg, gamma=0, timers=timers_ar)
        t_ar.append(t)
        spec, t, eng = run(target, drafter, prompts, cfg, gamma=args.gamma, sps=sps, timers=timers_spec)
        t_spec.append(t)
    return dict(ar=ar, spec=spec, t_ar=_median(t_ar), t_spec=_median(t_spec), t_ar_all=sum(t_ar),
                t_spec_all=sum(t_spec), timers=timers_spec,
                timers_ar=timers_ar, steps=eng.num_steps, steps_ar=eng_ar.num_steps, repeats=args.repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dspark_kernels.loop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gamma", type=int, default=7, help="draft block size (default 7)")
    ap.add_argument("--schedule", choices=["dspark", "static"], default="static",
                    help="static: verify all γ drafts (default); dspark: schedule_verify_lens with a profiled table")
    ap.add_argument("--prompts", type=int, default=None,
                    help="held-out prompts per run (default: the batch size, at least 2)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="request slots, one run each (default 1 8)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0],
                    help="0 = greedy; one run each (default 0 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions, the median is shown (default 3)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--retrain", action="store_true", help="train the models now instead of loading the shipped ones")
    ap.add_argument("--show-text", action="store_true", help="print every prompt's text, not just the first")
    ap.add_argument("--no-reference-check", action="store_true",
                    help="skip re-running one prompt through the reference ops")
    ap.add_argument("--method", choices=["token", "block"], default="token",
                    help="chain verification: token-wise (default) or block verification")
    ap.add_argument("--tree", action="store_true",
                    help="draft a tree of depth γ, verify every node in one pass (verify_tree; static schedule)")
    ap.add_argument("--tree-branch", default="2", metavar="K",
                    help="children at each of the first two tree levels (default 2), or K1,K2,... per level")
    ap.add_argument("--tree-siblings", choices=["top-k", "sample"], default="top-k",
                    help="tree children: the drafter's top-K (point masses; default) or, for sampling, "
                         "i.i.d. draws verified against q")
    ap.add_argument("--tp", type=int, default=1, metavar="P",
                    help="vocabulary-parallel target LM head over P CPU processes (gloo); compared with --tp 1")
    args = ap.parse_args(argv)
    if args.tp > 1:
        from .tp import main_tp

        return main_tp(args)
    if args.tree:
        args.schedule = "static"       # every node of the tree is verified
        try:
            parse_branches(args.tree_branch)
        except ValueError as exc:
            ap.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)

    target, drafter, info = load_or_train(retrain=args.retrain)
    n_t = sum(p.numel() for p in target.parameters())
    n_d = sum(p.numel() for p in drafter.parameters())
    bpb = info.get("held_out_bpb")
    print(f"models: target {n_t / 1e6:.2f} M params ({target.cfg.n_layers} layers, d {target.cfg.d_model}, "
          f"{len(target.cfg.moe_layers)} MoE layers of {target.cfg.n_experts} experts top-{target.cfg.top_k}), "
          f"drafter {n_d / 1e6:.2f} M ({drafter.cfg.n_layers} layer{'s' if drafter.cfg.n_layers > 1 else ''}, "
          f"shares the target's embedding / LM head)")
    print("        " + (f"held-out {bpb:.3f} bits/byte, " if bpb is not None else
                         f"target loss {info['target_loss']:.3f} nats/byte, ")
          + (f"loaded from {info['cached']}" if info["cached"] else
             f"trained in {info['target_train_s'] + info['drafter_train_s']:.0f} s"))
    dev = torch.device(args.device)
    target.to(dev)
    drafter.to(dev)
    ok = True
    results = {}
    for batch in args.batch:
        count = args.prompts or max(batch, 2)
        prompts = held_out_prompts(info["held_out"], count)
        sps = None
        if args.schedule == "dspark":
            sps = SpecDecoder(target, drafter, gamma=args.gamma, max_batch=batch, page_size=16,
                              max_len=256).profile_sps(points=6, repeats=2)
        for temperature in args.temperature:
            r = measure(target, drafter, prompts, args, batch=batch, temperature=temperature, sps=sps)
            r["sps"] = sps
            results[batch, temperature] = r
            if batch == args.batch[0] and temperature == args.temperature[0]:
                for i, s in enumerate(r["spec"][: None if args.show_text else 1]):
                    print(f"\n--- prompt {i} (B = {batch}, T = {temperature:g}, speculative) " + "-" * 40)
                    print(show(s.prompt) + "\033[1m" + show(s.output) + "\033[0m" if sys.stdout.isatty()
                          else show(s.prompt) + "⟦" + show(s.output) + "⟧")

    print("\n=== summary " + "=" * 60)
    shape = spec_options(args, args.gamma)["tree"]
    mode = (f", tree {shape.branches} ({shape.num_nodes} nodes, {args.tree_siblings} siblings)" if shape is not None
            else f", method {args.method}")
    print(f"γ = {args.gamma}, schedule {args.schedule}{mode}, {args.max_new_tokens} new tokens per prompt, device {dev}, "
          f"{torch.get_num_threads()} threads; times: median of {args.repeats} runs")
    print(f"  {'B':>2s} {'T':>3s} {'prompts':>7s} {'τ':>5s} {'accepted':>9s} {'AR tok/s':>9s} {'spec tok/s':>10s} "
          f"{'speed-up':>8s} {'drafter/target':>14s}  greedy = AR")
    for (batch, temperature), r in results.items():
        n_ar = sum(len(q.output) for q in r["ar"])
        n_spec = sum(len(q.output) for q in r["spec"])
        req_steps = sum(q.steps for q in r["spec"])
        tau = n_spec / max(1, req_steps)
        acc = f"{sum(q.accepted for q in r['spec'])}/{sum(q.drafted for q in r['spec'])}"
        tm = r["timers"]
        drafter_s = sum(tm.total.get(k, 0.0) for k in DRAFTER_REGIONS)
        target_s = tm.total.get("target forward", 0.0)
        same = "-"
        if temperature <= 0:
            agree = [a.output == s.output for a, s in zip(r["ar"], r["spec"])]
            same = f"{'yes' if all(agree) else 'NO'} ({sum(agree)}/{len(agree)})"
            ok &= all(agree)
        r["tau"], r["speedup"] = tau, (n_spec / r["t_spec"]) / (n_ar / r["t_ar"])
        print(f"  {batch:2d} {temperature:3g} {len(r['spec']):7d} {tau:5.2f} {acc:>9s} {n_ar / r['t_ar']:9.1f} "
              f"{n_spec / r['t_spec']:10.1f} {r['speedup']:7.2f}x {drafter_s / max(target_s, 1e-12):14.3f}  {same}")
    greedy = [k for k in results if k[1] <= 0]
    if greedy:
        agree = [a.output == s.output for k in greedy for a, s in zip(results[k]["ar"], results[k]["spec"])]
        print(f"greedy output identical to autoregressive decoding: {'yes' if all(agree) else 'NO'} "
              f"({sum(agree)}/{len(agree)} prompts" + (f" over {len(greedy)} runs)" if len(greedy) > 1 else ")"))
    print("τ: tokens emitted per request per verify step; drafter/target: the drafter's time per step (forward, "
          "context projection, window_commit, draft_sample_block) over the target verify pass's")

    print("\nwhere the time goes: ms per batched step, mean over the runs (speculative; AR: the autoregressive runs)")
    keys = list(results)
    print(f"  {'region':24s} " + " ".join(f"{f'B={b} T={t:g}':>11s}" for b, t in keys))
    names = []
    for k in keys:
        for name in sorted(results[k]["timers"].total, key=lambda n: -results[k]["timers"].total[n]):
            if name not in names:
                names.append(name)
    per_step = lambda r, total: total * 1e3 / (r["steps"] * r["repeats"])  # noqa: E731
    for name in names:
        print(f"  {name:24s} " + " ".join(f"{per_step(results[k], results[k]['timers'].total.get(name, 0.0)):11.2f}"
                                          for k in keys))
    print(f"  {'host bookkeeping':24s} " + " ".join(
        f"{per_step(results[k], results[k]['t_spec_all'] - sum(results[k]['timers'].total.values())):11.2f}"
        for k in keys))
    print(f"  {'step (total)':24s} " + " ".join(
        f"{per_step(results[k], results[k]['t_spec_all']):11.2f}" for k in keys))
    print(f"  {'AR: target forward':24s} " + " ".join(
        f"{results[k]['timers_ar'].total.get('target forward', 0.0) * 1e3 / (results[k]['steps_ar'] * results[k]['repeats']):11.2f}"
        for k in keys))
    print(f"  {'AR: step (total)':24s} " + " ".join(
        f"{results[k]['t_ar_all'] * 1e3 / (results[k]['steps_ar'] * results[k]['repeats']):11.2f}" for k in keys))

    if not args.no_reference_check:
        cfg = argparse.Namespace(**vars(args))
        cfg.batch, cfg.temperature = args.batch[0], args.temperature[0]
        prompts = held_out_prompts(info["held_out"], 1)
        ref, _, _ = run(target, drafter, prompts, cfg, gamma=args.gamma, backend="reference", max_new=32,
                        sps=results[args.batch[0], args.temperature[0]].get("sps"))
        fused, _, _ = run(target, drafter, prompts, cfg, gamma=args.gamma, max_new=32)
        match = ref[0].output == fused[0].output
        print(f"\nreference ops vs fused ops on prompt 0 (32 tokens): {'identical' if match else 'DIFFERENT'}")
        ok &= match
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
