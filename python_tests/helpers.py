"""Input builders and independent (fp64, pure-Python) oracles shared by tests."""

from __future__ import annotations

import functools
import math
import os

import torch

import dspark_kernels


def make_verify_inputs(num_draft, vocab, *, dtype=torch.float32, seed=0, draft="point", temperature=None,
                       top_k=None, top_p=None, accept_bias=0.0, device="cpu"):
    """Random verify_block inputs for requests with `num_draft[b]` drafts.

    accept_bias > 0 raises the target logit of each draft token so that some
    drafts are accepted and rejections land mid-block.
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(num_draft)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(num_draft, dtype=torch.int32), 0)
    n_total = int(cu[-1])
    target = torch.randn(n_total + batch, vocab, generator=g) * 2.0
    drafts = torch.randint(0, vocab, (n_total,), generator=g, dtype=torch.int32)
    for b in range(batch):
        for i in range(num_draft[b]):
            target[int(cu[b]) + b + i, drafts[int(cu[b]) + i]] += accept_bias
    kwargs = {}
    if draft == "logits":
        kwargs["draft_logits"] = (target[_draft_rows(cu)] + torch.randn(n_total, vocab, generator=g)).to(dtype).to(device)
    elif draft == "probs":
        kwargs["draft_probs"] = torch.softmax(torch.randn(n_total, vocab, generator=g) * 2, -1).to(dtype).to(device)
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if value is not None:
            kwargs[name] = value.to(device) if isinstance(value, torch.Tensor) else value
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=g, dtype=torch.int64)
    offsets = torch.randint(0, 2**40, (batch,), generator=g, dtype=torch.int64)
    return (target.to(dtype).to(device), drafts.to(device), cu.to(device)), dict(
        kwargs, seed=seeds.to(device), offset=offsets.to(device))


def _draft_rows(cu):
    rows = []
    for b in range(cu.numel() - 1):
        rows += [int(cu[b]) + b + i for i in range(int(cu[b + 1] - cu[b]))]
    return torch.tensor(rows, dtype=torch.int64)


# ----------------------------------------------------------------------------
# fp64 oracle, written independently of dspark_kernels.reference


def softmax64(logits, temperature, top_k=0, top_p=1.0):
    """Filtered probabilities in fp64 by explicit sorting (the documented rules)."""
    s = [float(x) / temperature for x in logits]
    vocab = len(s)
    keep = [x > -math.inf for x in s]
    if 0 < top_k < vocab:
        kth = sorted(s, reverse=True)[top_k - 1]
        keep = [k and x >= kth for k, x in zip(keep, s)]
    if 0.0 < top_p < 1.0:
        m = max(x for x, k in zip(s, keep) if k)
        e = [math.exp(x - m) if k else 0.0 for x, k in zip(s, keep)]
        total = sum(e)
        keep = [k and sum(ew for xw, ew in zip(s, e) if xw > x) < top_p * total for k, x in zip(keep, s)]
    m = max(x for x, k in zip(s, keep) if k)
    e = [math.exp(x - m) if k else 0.0 for x, k in zip(s, keep)]
    z = sum(e)
    return [x / z for x in e]


CHI2_FALSE_ALARM = 1e-6


def chi2_check(samples, probs, label, false_alarm=CHI2_FALSE_ALARM):
    """Pearson χ² of integer samples against probabilities, at a fixed false-alarm rate;
    tokens of probability zero must never be drawn."""
    from scipy.stats import chi2

    probs = torch.as_tensor(probs, dtype=torch.float64)
    counts = torch.bincount(samples.to(torch.int64), minlength=probs.numel()).double()
    n = counts.sum()
    assert n > 1000, label
    zero = probs <= 0
    assert counts[zero].sum() == 0, f"{label}: drew tokens of probability zero"
    expected = probs[~zero] * n
    stat = float(((counts[~zero] - expected) ** 2 / expected).sum())
    dof = max(int((~zero).sum()) - 1, 1)
    limit = chi2.isf(false_alarm, dof)
    assert stat < limit, f"{label}: chi2 = {stat:.1f} >= {limit:.1f} (dof {dof}, n {int(n)})"


@functools.cache
def interpreter_reads_fp8_nan() -> bool:
    """Whether Triton's interpreter reads the e4m3fn NaN byte 0x7f as NaN.

    It does not (triton 3.8 and 3.9: 0x7f converts to 480.0, the IEEE-style e4m3
    reading, and a dot with it is finite), while the GPU's cvt / fp8 MMA give NaN, as
    torch does. So under the interpreter the Triton backend is left out of fp8 cases
    that hold a NaN byte (the reference and cpu still run them; the GPU run covers
    Triton); the probe re-enables them once the interpreter is fixed."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not dspark_kernels.backends("fused_moe").get("triton"):
        return True
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, o_ptr):
        tl.store(o_ptr, tl.load(x_ptr).to(tl.float32))

    x = torch.tensor([0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn)
    o = torch.zeros(1)
    _probe[(1,)](x, o)
    return bool(o.isnan().item())
