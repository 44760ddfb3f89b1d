"""The main job: speculative decoding of a trained byte-level model on our fused ops.

    python -m dspark_kernels.loop [--gamma 5] [--schedule dspark|static] [--prompts 4]
                                  [--max-new-tokens 96] [--temperature 0] [--device cpu|cuda]
                                  [--method token|block] [--tree [--tree-branch 2] [--tree-siblings top-k|sample]]

Trains the target and the drafter on the Python standard library's source the
first time (a few minutes on 2 cores; cached after), then generates from
held-out prompts twice on the same target: plain autoregressive decoding, and
DSpark speculative decoding (draft → schedule → verify → commit). It prints the
text, the acceptance length τ, tokens per second of both, where the speculative
run's time goes per op, and checks that greedy output is identical in both runs
and that the reference ops give the same tokens as the fused ones.

``--method block`` verifies the chains with block verification; ``--tree`` drafts
a tree of depth γ instead (``--tree-branch K``: K children at each of the first two
levels, a chain after; ``K1,K2,…`` per level), verified in one target pass with
``verify_tree`` (static schedule; docs/loop.md#tree-mode); ``--tree-siblings sample``
draws a sampling request's children i.i.d. from the drafter instead of its top-K.
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


def run(target, drafter, prompts, args, *, gamma, backend=None, sps=None, max_new=None, timers=None):
    reqs = [Request(p, max_new_tokens=max_new or args.max_new_tokens, temperature=args.temperature, seed=1000 + i,
                    eos_id=0) for i, p in enumerate(prompts)]
    opts = spec_options(args, gamma)
    window = (opts["tree"].num_nodes if opts["tree"] is not None else gamma) + 1
    eng = SpecDecoder(target, drafter if gamma else None, gamma=gamma, schedule=args.schedule if gamma else "static",
                      sps=sps, backend=backend, max_batch=args.batch, page_size=16,
                      max_len=max(len(p) for p in prompts) + (max_new or args.max_new_tokens) + window,
                      timers=timers, **opts)
    dev = target.embed.weight.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    eng.generate(reqs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return reqs, time.perf_counter() - t0, eng


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dspark_kernels.loop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gamma", type=int, default=5, help="draft block size (default 5)")
    ap.add_argument("--schedule", choices=["dspark", "static"], default="dspark")
    ap.add_argument("--prompts", type=int, default=4, help="number of held-out prompts (default 4)")
    ap.add_argument("--batch", type=int, default=4, help="request slots (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--retrain", action="store_true", help="train again even if cached")
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
    args = ap.parse_args(argv)
    if args.tree:
        args.schedule = "static"       # every node of the tree is verified
        try:
            parse_branches(args.tree_branch)
        except ValueError as exc:
            ap.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)

    target, drafter, info = load_or_train(retrain=args.retrain)
    print(f"models: target {sum(p.numel() for p in target.parameters()) / 1e6:.2f} M params "
          f"({len(target.cfg.moe_layers)} MoE layers, {target.cfg.n_experts} experts top-{target.cfg.top_k}), "
          f"drafter {sum(p.numel() for p in drafter.parameters()) / 1e6:.2f} M; target loss "
          f"{info['target_loss']:.3f} nats/byte, " + (f"loaded from {info['cached']}" if info["cached"] else
                                                       f"trained in {info['target_train_s'] + info['drafter_train_s']:.0f} s"))
    dev = torch.device(args.device)
    target.to(dev)
    drafter.to(dev)
    prompts = held_out_prompts(info["held_out"], args.prompts)

    # Warm-up (allocator, kernels, Triton compiles on GPU), then the timed runs.
    run(target, drafter, prompts[:1], args, gamma=args.gamma, sps=torch.ones(args.batch * (args.gamma + 1) + 1),
        max_new=8)
    ar, t_ar, _ = run(target, drafter, prompts, args, gamma=0)
    sps, t_prof = None, 0.0
    if args.schedule == "dspark":
        t0 = time.perf_counter()
        sps = SpecDecoder(target, drafter, gamma=args.gamma, max_batch=args.batch, page_size=16,
                          max_len=256).profile_sps(points=6, repeats=2)
        t_prof = time.perf_counter() - t0
    timers = OpTimers(enabled=True)
    spec, t_spec, eng = run(target, drafter, prompts, args, gamma=args.gamma, sps=sps, timers=timers)

    for i, (a, s) in enumerate(zip(ar, spec)):
        print(f"\n--- prompt {i} " + "-" * 60)
        print(show(s.prompt) + "\033[1m" + show(s.output) + "\033[0m" if sys.stdout.isatty()
              else show(s.prompt) + "⟦" + show(s.output) + "⟧")
        print(f"    τ = {s.tau:.2f} tokens/step ({s.steps} steps, {s.accepted}/{s.drafted} drafts accepted)")

    n_ar, n_spec = sum(len(r.output) for r in ar), sum(len(r.output) for r in spec)
    steps = sum(r.steps for r in spec)
    tau = n_spec / max(1, steps)
    same = [a.output == s.output for a, s in zip(ar, spec)]
    print("\n=== summary " + "=" * 60)
    shape = spec_options(args, args.gamma)["tree"]
    mode = (f", tree {shape.branches} ({shape.num_nodes} nodes, {args.tree_siblings} siblings)" if shape is not None
            else f", method {args.method}")
    print(f"γ = {args.gamma}, schedule = {args.schedule}" + (f" (SPS table profiled in {t_prof:.1f} s)"
                                                             if sps is not None else "") + mode
          + f", temperature {args.temperature}, {len(prompts)} prompts, batch {args.batch}, device {dev}")
    print(f"acceptance length τ = {tau:.2f} tokens per verify step ({steps} request-steps, "
          f"{sum(r.accepted for r in spec)}/{sum(r.drafted for r in spec)} drafts accepted)")
    print(f"autoregressive : {n_ar:5d} tokens in {t_ar:6.2f} s = {n_ar / t_ar:7.1f} tokens/s  "
          f"({sum(r.steps for r in ar)} target passes)")
    print(f"speculative    : {n_spec:5d} tokens in {t_spec:6.2f} s = {n_spec / t_spec:7.1f} tokens/s  "
          f"({eng.num_steps} batched steps)  speed-up {n_spec / t_spec / (n_ar / t_ar):.2f}x")
    ok = True
    if args.temperature <= 0:
        print(f"greedy output identical to autoregressive decoding: {'yes' if all(same) else 'NO'} "
              f"({sum(same)}/{len(same)} prompts)")
        ok &= all(same)

    print("\nwhere the speculative run's time goes")
    print(f"  {'region':24s} {'total ms':>9s} {'share':>6s} {'calls':>6s} {'ms/call':>8s}")
    accounted = 0.0
    for name, total in sorted(timers.total.items(), key=lambda kv: -kv[1]):
        accounted += total
        print(f"  {name:24s} {total * 1e3:9.1f} {total / t_spec:6.1%} {timers.calls[name]:6d} "
              f"{total * 1e3 / timers.calls[name]:8.3f}")
    print(f"  {'host bookkeeping':24s} {(t_spec - accounted) * 1e3:9.1f} {(t_spec - accounted) / t_spec:6.1%}")

    if not args.no_reference_check:
        ref, _, _ = run(target, drafter, prompts[:1], args, gamma=args.gamma, sps=sps, backend="reference", max_new=32)
        fused, _, _ = run(target, drafter, prompts[:1], args, gamma=args.gamma, sps=sps, max_new=32)
        match = ref[0].output == fused[0].output
        print(f"\nreference ops vs fused ops on prompt 0 (32 tokens): {'identical' if match else 'DIFFERENT'}")
        ok &= match
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
