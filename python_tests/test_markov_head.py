"""The CPU Markov head (csrc/cpu/markov_head.h) equals the reference bit for bit.

The kernel cuts the vocabulary into strips of 64 columns and vectorises across them
while the sum over the rank keeps the reference's order (fp32 weights with unit stride:
panels read in place; fp16 / bf16 / strided weights: packed panels), so Gaussian weights (whose
sums depend on the order) must give identical fp32 logits and tokens: shapes on both
sides of a strip boundary, batches larger than a register block, fp16 / bf16 and
strided weights, strided base logits and non-finite weights."""

from __future__ import annotations

import math

import pytest
import torch

import dspark_kernels as dk

pytestmark = pytest.mark.skipif(not dk.backends("draft_sample_block").get("cpu"), reason="cpu backend not built")


def inputs(batch, gamma, vocab, rank, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, gamma, vocab, generator=g) * 2.0
    w1 = torch.randn(vocab, rank, generator=g) / math.sqrt(rank)
    w2 = torch.randn(rank, vocab, generator=g)
    temps = torch.tensor([[0.0, 1.0, 0.7][b % 3] for b in range(batch)])
    kw = dict(markov_w1=w1.to(dtype), markov_w2=w2.to(dtype), temperature=temps,
              seed=torch.arange(batch, dtype=torch.int64) * 7 + seed, offset=torch.arange(batch, dtype=torch.int64))
    anchor = torch.randint(0, vocab, (batch,), generator=g, dtype=torch.int32)
    return base.to(dtype), anchor, kw


def check(base, anchor, kw):
    ref_tok, ref_logits = dk.draft_sample_block(base, anchor, **kw, backend="reference")
    tok, logits = dk.draft_sample_block(base, anchor, **kw, backend="cpu")
    assert torch.equal(tok, ref_tok)
    # bit for bit, NaN included (equal_nan compares NaN positions; the bits of finite values must match)
    assert torch.equal(logits.view(torch.int32)[~logits.isnan()], ref_logits.view(torch.int32)[~ref_logits.isnan()])
    assert torch.equal(logits.isnan(), ref_logits.isnan())


@pytest.mark.parametrize("batch,gamma,vocab,rank", [
    (1, 1, 1, 1), (1, 3, 63, 7), (3, 2, 64, 33), (2, 2, 65, 16), (17, 2, 129, 9), (5, 3, 1000, 40), (1, 2, 4097, 3), (1, 2, 20000, 5), (2, 1, 16449, 6), (17, 1, 4000, 3),
])
def test_gaussian_weights_bit_identical(batch, gamma, vocab, rank):
    check(*inputs(batch, gamma, vocab, rank, seed=vocab + rank))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_bit_identical(dtype):
    check(*inputs(4, 3, 300, 24, seed=5, dtype=dtype))


def test_strided_weights_and_base():
    base, anchor, kw = inputs(6, 3, 200, 20, seed=9)
    kw["markov_w2"] = kw["markov_w2"].t().contiguous().t()               # column stride != 1
    kw["markov_w1"] = kw["markov_w1"].t().contiguous().t()
    base = base.transpose(0, 1).contiguous().transpose(0, 1)              # non-contiguous batch stride
    wide = torch.randn(6, 3, 400)
    check(base, anchor, kw)
    check(wide[..., ::2], anchor, kw)                                      # vocabulary stride 2


def test_non_finite_weights():
    base, anchor, kw = inputs(3, 3, 130, 8, seed=13)
    w2 = kw["markov_w2"].clone()
    w2[2, 5], w2[4, 70], w2[0, 129] = float("inf"), float("nan"), float("-inf")
    kw["markov_w2"] = w2
    base[1, 0, 64] = float("inf")
    check(base, anchor, kw)
