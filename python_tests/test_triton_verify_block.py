"""Fast exact-equality smoke tests of the Triton verify_block against the reference.

Small shapes: without a GPU they run under TRITON_INTERPRET=1 (conftest.py), fp32 /
fp16 only (the interpreter gets bf16 wrong); with a GPU they run the compiled
kernels on CUDA tensors, bf16 included. Outputs are poisoned before the call so an
element the kernels do not write cannot pass. The main backend sweep is in
test_verify_block.py; this file covers the Triton-specific paths (several
vocabulary chunks and splits, the 4-bit and 8-bit threshold searches, strided
rows and columns).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # conftest.py does the same; kept for running this file alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dspark_kernels  # noqa: E402
from dspark_kernels.reference.verify_block import verify_block as ref_verify_block  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = pytest.mark.skipif(not dspark_kernels.backends("verify_block")["triton"], reason="triton is not available")


def _build(num_draft, vocab, *, dtype=torch.float32, draft="point", sampling=True, greedy_mix=False, top_k=False,
           top_p=False, pad=0.2, strided=False, strided_draft=False, neginf=0.0, ties=False, p_eq_q=False,
           big_seeds=False, extra_width=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = len(num_draft)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(num_draft, dtype=torch.int32), 0)
    n_total = int(cu[-1])
    rows = torch.tensor([int(cu[b]) + b + i for b in range(batch) for i in range(num_draft[b])], dtype=torch.int64)
    if ties:
        target = torch.randint(-2, 3, (n_total + batch, vocab), generator=g).float()
    else:
        target = torch.randn(n_total + batch, vocab, generator=g) * 3.0
    drafts = torch.randint(0, vocab, (n_total,), generator=g)
    # Half the drafts are the target's argmax, so that blocks are partly accepted.
    take = torch.rand(n_total, generator=g) < 0.5
    if n_total:
        drafts = torch.where(take, target[rows].argmax(-1), drafts)
        drafts[torch.rand(n_total, generator=g) < pad] = -1
    if neginf:
        target[torch.rand(target.shape, generator=g) < neginf] = float("-inf")
    kwargs = {}
    if draft == "logits":
        q = target[rows].clone() if p_eq_q else target[rows] + torch.randn(n_total, vocab, generator=g) * 0.7
        if ties:
            q = torch.randint(-2, 3, (n_total, vocab), generator=g).float()
        q = q.to(dtype)
        if strided_draft:  # column stride 3
            wide = torch.zeros(n_total, 3 * vocab, dtype=dtype)
            wide[:, ::3] = q
            q = wide[:, ::3]
        kwargs["draft_logits"] = q
    elif draft == "probs":
        q = torch.softmax(torch.randn(n_total, vocab, generator=g) * 2.0, -1)
        q[torch.rand(q.shape, generator=g) < 0.1] = 0.0
        q = q.to(dtype)
        if strided_draft:  # column-major
            q = q.t().contiguous().t()
        kwargs["draft_probs"] = q
    target = target.to(dtype)
    if strided:  # row stride 2V + 3, column stride 2
        wide = torch.zeros(n_total + batch, 2 * vocab + 3, dtype=dtype)
        wide[:, 1:2 * vocab + 1:2] = target
        target = wide[:, 1:2 * vocab + 1:2]
    if sampling:
        temp = torch.rand(batch, generator=g) * 1.5 + 0.3
        if greedy_mix:
            temp[torch.rand(batch, generator=g) < 0.3] = 0.0
        kwargs["temperature"] = temp
    if top_k:
        kwargs["top_k"] = torch.randint(-1, vocab + 2, (batch,), generator=g).to(torch.int32)
    if top_p:
        choices = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])
        kwargs["top_p"] = choices[torch.randint(0, len(choices), (batch,), generator=g)]
    if big_seeds:
        kwargs["seed"] = torch.tensor([-1, 2**63 - 1, -(2**63), 0, 7, -7, 2**32][:batch], dtype=torch.int64)
        kwargs["offset"] = torch.tensor([2**32 - 1, 2**32 - 2, 2**63 - 9, 0, 2**31, 5, 2**40][:batch],
                                        dtype=torch.int64)
    else:
        kwargs["seed"] = torch.randint(-(2**62), 2**62, (batch,), generator=g)
        kwargs["offset"] = torch.randint(0, 2**40, (batch,), generator=g)
    max_n = max(num_draft) if num_draft else 0
    return target, drafts, cu, kwargs, max_n + extra_width


def _positional(target, drafts, cu, kwargs, width, device):
    def mv(t):
        if not isinstance(t, torch.Tensor) or t.device.type == device:
            return t
        out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)  # keep the strides
        out.copy_(t)
        return out

    return (mv(target), mv(drafts), mv(cu), mv(kwargs.get("draft_logits")), mv(kwargs.get("draft_probs")),
            mv(kwargs.get("temperature")), mv(kwargs.get("top_k")), mv(kwargs.get("top_p")),
            mv(kwargs["seed"]), mv(kwargs["offset"]), width)


CASES = {
    "greedy_v1": dict(num_draft=[0], vocab=1, sampling=False),
    "greedy_v7": dict(num_draft=[2, 0, 4], vocab=7, sampling=False),
    "greedy_ties_fp16": dict(num_draft=[3, 1, 0, 5, 2, 4, 1], vocab=1000, sampling=False, ties=True,
                             dtype=torch.float16),
    "point_v2": dict(num_draft=[3, 0, 2], vocab=2),
    "point_v129_fp16_pad": dict(num_draft=[4, 0, 2, 1, 3, 0, 4], vocab=129, dtype=torch.float16, pad=0.3,
                                greedy_mix=True),
    "logits_v7_strided": dict(num_draft=[3, 2, 0], vocab=7, draft="logits", strided=True),
    "logits_v1000_fp16": dict(num_draft=[2, 4, 1], vocab=1000, draft="logits", dtype=torch.float16),
    "probs_v129": dict(num_draft=[3, 0, 4], vocab=129, draft="probs"),
    "probs_v1": dict(num_draft=[2], vocab=1, draft="probs"),
    "topk_point_v129": dict(num_draft=[3, 1, 4], vocab=129, top_k=True),
    "topp_point_v129_fp16": dict(num_draft=[2, 4, 0], vocab=129, top_p=True, dtype=torch.float16),
    "topk_topp_logits_v129": dict(num_draft=[4, 2, 3], vocab=129, draft="logits", top_k=True, top_p=True,
                                  greedy_mix=True),
    "topk_topp_probs_v7_fp16": dict(num_draft=[1, 3, 0, 2, 4, 2, 1], vocab=7, draft="probs", top_k=True,
                                    top_p=True, dtype=torch.float16),
    "ties_topk_topp_logits_v7": dict(num_draft=[3, 2, 4], vocab=7, draft="logits", top_k=True, top_p=True,
                                     ties=True),
    "neginf_topk_topp_logits_v129": dict(num_draft=[3, 3, 1], vocab=129, draft="logits", top_k=True,
                                         top_p=True, neginf=0.3),
    "p_eq_q_topk_logits_v129": dict(num_draft=[4, 2, 3], vocab=129, draft="logits", top_k=True, p_eq_q=True),
    "strided_draft_logits_v129": dict(num_draft=[2, 3, 2], vocab=129, draft="logits", strided_draft=True,
                                      top_p=True),
    "strided_draft_probs_v129": dict(num_draft=[2, 3, 2], vocab=129, draft="probs", strided_draft=True),
    "big_seeds_offsets_v7": dict(num_draft=[3, 3, 3], vocab=7, draft="logits", big_seeds=True),
    "wide_output_v7": dict(num_draft=[1, 0, 2], vocab=7, extra_width=3, greedy_mix=True),
}

# Force several vocabulary chunks, several splits and the GPU's 4-bit threshold search.
CHUNKED = {
    "chunked_topk_topp_logits_v50": (dict(num_draft=[2, 1], vocab=50, draft="logits", top_k=True, top_p=True),
                                      dict(_block=16, _num_splits_override=3, _radix_bits=4)),
    "chunked_greedy_v1000": (dict(num_draft=[3, 0, 4], vocab=1000, sampling=False, ties=True),
                             dict(_block=64, _num_splits_override=4)),
    "chunked_probs_v100": (dict(num_draft=[3, 1], vocab=100, draft="probs", top_p=True, greedy_mix=True),
                           dict(_block=32, _num_splits_override=5, _radix_bits=4)),
    "chunked_point_neginf_v40": (dict(num_draft=[2, 3], vocab=40, neginf=0.5, top_k=True),
                                  dict(_block=16, _num_splits_override=2, _radix_bits=2)),
}


@pytest.fixture
def poisoned(monkeypatch):
    """Output allocations filled with a sentinel: every element must be written by a kernel."""
    from dspark_kernels.triton import verify_block as tvb

    monkeypatch.setattr(tvb, "_alloc_int32",
                        lambda shape, device: torch.full(shape, -7777, dtype=torch.int32, device=device))
    return tvb


def _check(tvb, case, seed=0, **tuning):
    target, drafts, cu, kwargs, width = _build(**case, seed=seed)
    expected = ref_verify_block(*_positional(target, drafts, cu, kwargs, width, "cpu"))
    got = tvb.verify_block(*_positional(target, drafts, cu, kwargs, width, DEVICE), **tuning)
    out, acc = got[0].cpu(), got[1].cpu()
    assert out.dtype == torch.int32 and acc.dtype == torch.int32
    assert out.shape == expected[0].shape and acc.shape == expected[1].shape
    assert torch.equal(out, expected[0]) and torch.equal(acc, expected[1]), (out, expected)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_equals_reference(poisoned, name):
    _check(poisoned, CASES[name])


@pytest.mark.parametrize("name", list(CHUNKED))
def test_triton_chunked_equals_reference(poisoned, name):
    case, tuning = CHUNKED[name]
    _check(poisoned, case, **tuning)


@pytest.mark.skipif(INTERPRETED, reason="the Triton interpreter gets bf16 arithmetic wrong (triton #4972)")
def test_triton_bf16_equals_reference(poisoned):
    for name, case in (("logits", dict(num_draft=[3, 1, 4], vocab=1000, draft="logits", top_k=True, top_p=True)),
                       ("greedy", dict(num_draft=[2, 5], vocab=1000, sampling=False))):
        _check(poisoned, dict(case, dtype=torch.bfloat16))


def test_public_api_and_empty_batch():
    target, drafts, cu, kwargs, width = _build([2, 0, 3], 129, draft="logits", top_p=True)
    args = (target.to(DEVICE), drafts.to(DEVICE), cu.to(DEVICE))
    kw = {k: v.to(DEVICE) for k, v in kwargs.items()}
    got = dspark_kernels.verify_block(*args, **kw, max_num_draft=width, backend="triton")
    ref = dspark_kernels.verify_block(*args, **kw, max_num_draft=width, backend="reference")
    assert torch.equal(got[0].cpu(), ref[0].cpu()) and torch.equal(got[1].cpu(), ref[1].cpu())
    from dspark_kernels.triton.verify_block import verify_block as tvb

    empty = torch.zeros(1, 5, device=DEVICE)  # B = 1 with no drafts: only the bonus row
    zeros64 = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    out, acc = tvb(empty, torch.zeros(0, dtype=torch.int64, device=DEVICE), torch.zeros(2, dtype=torch.int32,
                   device=DEVICE), None, None, None, None, None, zeros64, zeros64, 0)
    assert out.cpu().tolist() == [[0]] and acc.cpu().tolist() == [0]
    none = tvb(torch.zeros(0, 5, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE),
               torch.zeros(1, dtype=torch.int32, device=DEVICE), None, None, None, None, None,
               torch.zeros(0, dtype=torch.int64, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE), 4)
    assert none[0].shape == (0, 5) and none[1].shape == (0,)
