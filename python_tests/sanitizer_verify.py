"""A short verify_block run for compute-sanitizer (not a pytest file).

    compute-sanitizer --tool memcheck python3 python_tests/sanitizer_verify.py

Runs every GPU backend that is available (cuda, triton) on a few small, awkward
inputs (ragged blocks with n_b = 0, an odd vocabulary, strided logits, -1 and
out-of-range draft ids, top-k/top-p, each draft mode, fp32 and bf16) and compares
the integer outputs with the cpu backend (or the reference when the extension has
no CPU kernel). Prints one line per case and exits 1 on a mismatch, 0 otherwise
(also when no GPU backend is available: it says so).
"""

from __future__ import annotations

import sys

import torch

import dspark_kernels


def _cases():
    for vocab in (1000, 257):
        for dtype in (torch.float32, torch.bfloat16):
            for mode in ("greedy", "pointmass", "logits", "probs", "filtered"):
                yield vocab, dtype, mode


def _inputs(vocab, dtype, mode, device, seed):
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([0, 3, 7, 5])
    B, N = n.numel(), int(n.sum())
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(n, 0)
    wide = torch.randn(N + B, vocab + 13, generator=g) * 3
    target = wide[:, 5 : 5 + vocab]  # strided rows
    drafts = torch.randint(0, vocab, (N,), generator=g, dtype=torch.int32)
    top = torch.argmax(target[torch.arange(N) + torch.repeat_interleave(torch.arange(B), n)], -1)
    drafts = torch.where(torch.rand(N, generator=g) < 0.6, top.to(torch.int32), drafts)
    if N > 2:
        drafts[1] = -1
    kw = dict(seed=torch.arange(B, dtype=torch.int64) + seed, offset=torch.full((B,), 11, dtype=torch.int64),
              max_num_draft=7)
    if mode != "greedy":
        kw["temperature"] = torch.tensor([1.0, 0.7, 1.3, 0.0])
    if mode == "logits":
        kw["draft_logits"] = (target[: N] + 0.3 * torch.randn(N, vocab, generator=g)).to(dtype)
    if mode == "probs":
        kw["draft_probs"] = torch.softmax(torch.randn(N, vocab, generator=g), -1)
    if mode == "filtered":
        kw["top_k"] = torch.tensor([0, 50, 5, 1], dtype=torch.int32)
        kw["top_p"] = torch.tensor([0.9, 1.0, 0.5, 0.8])
    cpu = dict(target_logits=target.to(dtype), draft_tokens=drafts, cu_num_draft=cu, **kw)
    dev = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in cpu.items()}
    # keep the device logits strided too
    wide_dev = torch.zeros(N + B, vocab + 13, dtype=dtype, device=device)
    wide_dev[:, 5 : 5 + vocab] = dev["target_logits"]
    dev["target_logits"] = wide_dev[:, 5 : 5 + vocab]
    return cpu, dev


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitizer_verify: no CUDA device; nothing to check")
        return 0
    avail = dspark_kernels.backends("verify_block")
    gpu = [b for b in ("cuda", "triton") if avail.get(b)]
    check = "cpu" if avail.get("cpu") else "reference"
    if not gpu:
        print(f"sanitizer_verify: no GPU backend available ({avail}); nothing to check")
        return 0
    failures = 0
    for i, (vocab, dtype, mode) in enumerate(_cases()):
        cpu_in, dev_in = _inputs(vocab, dtype, mode, "cuda", 100 + i)
        want = dspark_kernels.verify_block(**cpu_in, backend=check)
        for backend in gpu:
            try:
                got = dspark_kernels.verify_block(**dev_in, backend=backend)
                torch.cuda.synchronize()
                ok = torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
                msg = "ok" if ok else "MISMATCH"
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                ok, msg = False, f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            failures += not ok
            print(f"{backend:6s} V={vocab:5d} {str(dtype).replace('torch.', ''):8s} {mode:9s} vs {check}: {msg}",
                  flush=True)
    print(f"sanitizer_verify: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
