"""The Quick start's main job (first version): a draft/verify loop on our ops.

A small bigram "target" language model (a fixed random logits table over a
64-token vocabulary) and a drafter that is a noisy copy of it. Every step each
request drafts a block of gamma tokens from the drafter, verify_block accepts a
prefix losslessly and emits one more token, and the loop continues from there.
It prints the acceptance length tau (tokens per target step), checks that the
tokens the loop generated follow the target's own bigram distribution (χ²), and
ends with a short verify_block benchmark table.

    python -m dspark_kernels.demo [--requests 256] [--gamma 5] [--steps 12] [--no-bench]
"""

from __future__ import annotations

import argparse
import time

import torch

import dspark_kernels as dk


def run_loop(requests: int, gamma: int, steps: int, vocab: int = 64, seed: int = 0, backend: str | None = None):
    g = torch.Generator().manual_seed(seed)
    target_table = torch.randn(vocab, vocab, generator=g) * 2.0  # logits of x_{t+1} given x_t
    draft_table = target_table + 0.6 * torch.randn(vocab, vocab, generator=g)
    temperature = torch.ones(requests)
    seeds = torch.randint(0, 2**62, (requests,), generator=g)
    last = torch.randint(0, vocab, (requests,), generator=g)
    position = torch.zeros(requests, dtype=torch.int64)
    pairs = []  # (previous token, generated token) for the χ² check
    emitted_total, target_steps = 0, 0
    t0 = time.perf_counter()
    for _ in range(steps):
        # Draft a block autoregressively from the drafter (plain torch sampling:
        # the drafter's own stream; verify_block's streams are separate).
        drafts, prev = [], last
        for _k in range(gamma):
            x = torch.multinomial(torch.softmax(draft_table[prev], -1), 1, generator=g).squeeze(1)
            drafts.append(x)
            prev = x
        drafts = torch.stack(drafts, 1)  # [R, gamma]
        contexts = torch.cat([last[:, None], drafts], 1)  # the token each target row conditions on
        target_logits = target_table[contexts].reshape(-1, vocab)  # [R * (gamma + 1), V]
        draft_logits = draft_table[contexts[:, :gamma]].reshape(-1, vocab)
        cu = torch.arange(0, requests * gamma + 1, gamma, dtype=torch.int32)
        out, accepted = dk.verify_block(target_logits, drafts.reshape(-1).int(), cu, draft_logits=draft_logits,
                                        temperature=temperature, seed=seeds, offset=position, max_num_draft=gamma,
                                        backend=backend)
        for r in range(requests):
            n = int(accepted[r]) + 1
            toks = out[r, :n].long()
            prevs = torch.cat([last[r : r + 1], toks[:-1]])
            pairs.append(torch.stack([prevs, toks], 1))
            last[r] = toks[-1]
            position[r] += n
            emitted_total += n
        target_steps += requests
    elapsed = time.perf_counter() - t0
    return target_table, torch.cat(pairs), emitted_total / target_steps, emitted_total / elapsed


def chi2_against_target(target_table: torch.Tensor, pairs: torch.Tensor) -> tuple[float, float]:
    """Pooled χ² of generated bigrams against the target's conditionals; returns (stat, 1e-6 limit)."""
    from math import sqrt

    vocab = target_table.shape[0]
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(len(pairs), dtype=torch.float64), accumulate=True)
    probs = torch.softmax(target_table.double(), -1)
    expected = counts.sum(1, keepdim=True) * probs
    mask = expected > 5  # the usual validity rule for χ² cells
    stat = float(((counts - expected) ** 2 / expected)[mask].sum())
    dof = int(mask.sum()) - int((counts.sum(1) > 0).sum())
    limit = dof + 4.9 * sqrt(2 * dof)  # ≈ the 1e-6 upper tail for large dof
    return stat, limit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args(argv)

    print(f"dspark_kernels {dk.__version__}: backends {dk.backends()}")
    table, pairs, tau, tps = run_loop(args.requests, args.gamma, args.steps)
    stat, limit = chi2_against_target(table, pairs)
    print(f"draft/verify loop: {args.requests} requests, gamma={args.gamma}, {args.steps} target steps")
    print(f"  acceptance length tau = {tau:.2f} tokens per target step (1.00 without speculation)")
    print(f"  {len(pairs)} tokens generated, {tps:,.0f} tokens/s through verify_block on the CPU")
    if stat < limit:
        print(f"  the generated bigrams follow the target distribution: chi2 = {stat:.0f} < {limit:.0f}")
    else:
        print(f"  the generated bigrams DO NOT follow the target distribution: chi2 = {stat:.0f} >= {limit:.0f}")
    if not args.no_bench:
        from .bench.__main__ import main as bench_main

        print()
        bench_main(["verify", "--quick"])
    return 0 if stat < limit else 1


if __name__ == "__main__":
    raise SystemExit(main())
