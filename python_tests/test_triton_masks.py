"""Every mask a Triton kernel passes to a load, store or atomic is a boolean tensor of
its pointer's shape, whatever Triton version runs the tests.

Triton 3.9's interpreter rejects any other mask ("mask has unsupported dtype"); 3.6 and
3.8 accept an int32 one, and that is what ``tensor_mask & scalar_condition`` becomes in
the interpreter (it splats the scalar with the dtype of the comparison's operands). So a
kernel with such a mask passes every test under an older Triton and fails every test
under the newest one (see dspark_kernels/triton/__init__.py). These tests run the
kernels of each Triton op once with every mask checked, so the CI run with the pinned
Triton catches such a mask too; .ci/triton_newest.sh also runs the interpreter suite
under the newest Triton. Interpreter only (skipped with a GPU).
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch

if not torch.cuda.is_available():  # conftest.py does the same; kept for running this file alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dspark_kernels as dk  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not dk.backends("verify_block")["triton"], reason="triton is not available"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter's masks"),
]


def _kernel_line() -> str:
    """file:line of the innermost dspark_kernels frame (the kernel source line)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "dspark_kernels" in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno}: {(frame.line or '').strip()}"
    return "?"


@pytest.fixture
def strict_masks(monkeypatch):
    """Checks every masked load / store / atomic of the interpreter; yields the list of
    bad masks (fails the test at teardown if it is not empty or nothing was checked)."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    bad, checked = [], [0]

    def check(kind, ptrs, mask):
        checked[0] += 1
        data = mask.data
        if not (isinstance(data, np.ndarray) and data.dtype == np.bool_ and data.shape == np.shape(ptrs.data)):
            bad.append(f"{kind} mask {getattr(data, 'dtype', type(data).__name__)} {np.shape(data)} for pointers "
                       f"{np.shape(ptrs.data)} at {_kernel_line()}")

    load, store, rmw = builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw

    def masked_load(self, ptrs, mask, *args, **kwargs):
        check("load", ptrs, mask)
        return load(self, ptrs, mask, *args, **kwargs)

    def masked_store(self, ptrs, value, mask, *args, **kwargs):
        check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *args, **kwargs)

    def atomic_rmw(self, op, ptr, value, mask, *args, **kwargs):
        check("atomic", ptr, mask)
        return rmw(self, op, ptr, value, mask, *args, **kwargs)

    monkeypatch.setattr(builder, "create_masked_load", masked_load)
    monkeypatch.setattr(builder, "create_masked_store", masked_store)
    monkeypatch.setattr(builder, "create_atomic_rmw", atomic_rmw)
    yield bad
    assert checked[0] > 0, "no mask was checked: the interpreter's builder API changed"
    assert not bad, "masks that are not boolean tensors of the pointers' shape:\n" + "\n".join(sorted(set(bad)))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("draft", ["point", "logits", "probs"])
def test_verify_block_masks(strict_masks, draft):
    """Greedy and sampling rows, top-k / top-p, a request without drafts (the emission race)."""
    g = _gen(1)
    num_draft, vocab = [2, 0, 3], 37
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    target = torch.randn(5 + 3, vocab, generator=g)
    drafts = torch.randint(0, vocab, (5,), generator=g, dtype=torch.int64)
    kw = dict(temperature=torch.tensor([0.0, 0.7, 1.3]), top_k=torch.tensor([0, 5, 0], dtype=torch.int32),
              top_p=torch.tensor([1.0, 0.9, 0.6]), seed=torch.tensor([3, 4, 5]), offset=torch.tensor([0, 7, 9]))
    if draft == "logits":
        kw["draft_logits"] = torch.randn(5, vocab, generator=g)
    elif draft == "probs":
        kw["draft_probs"] = torch.softmax(torch.randn(5, vocab, generator=g), -1)
    args = (target, drafts, cu)
    got = dk.verify_block(*args, **kw, max_num_draft=max(num_draft), backend="triton")
    want = dk.verify_block(*args, **kw, max_num_draft=max(num_draft), backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("markov", [False, True])
def test_draft_sample_block_masks(strict_masks, markov):
    """The race (split, filtered) and the Markov steps (x_prev from the anchor, then the tokens)."""
    g = _gen(2)
    batch, gamma, vocab, rank = 3, 3, 40, 4
    base = torch.randn(batch, gamma, vocab, generator=g)
    anchor = torch.randint(0, vocab, (batch,), generator=g, dtype=torch.int32)
    kw = dict(temperature=torch.tensor([0.0, 0.8, 1.2]), top_k=torch.tensor([0, 4, 0], dtype=torch.int32),
              top_p=torch.tensor([1.0, 1.0, 0.7]), seed=torch.tensor([1, 2, 3]), offset=torch.tensor([5, 6, 7]))
    if markov:
        kw.update(markov_w1=torch.randint(-2, 3, (vocab, rank), generator=g).float(),
                  markov_w2=torch.randint(-2, 3, (rank, vocab), generator=g).float())
    for filters in (True, False):
        call = kw if filters else {k: v for k, v in kw.items() if k not in ("top_k", "top_p")}
        got = dk.draft_sample_block(base, anchor, **call, backend="triton")
        want = dk.draft_sample_block(base, anchor, **call, backend="reference")
        assert torch.equal(got[0], want[0])


def test_moe_masks(strict_masks):
    """moe_align (all three paths), fused_moe (both schedules, padding slots) and the grouped GEMMs."""
    from dspark_kernels.triton.moe_align import moe_align as triton_align

    g = _gen(3)
    E, H, I, M, k = 5, 32, 16, 7, 2
    ids = torch.randint(0, E, (M, k), generator=g, dtype=torch.int32)
    ids[1] = -1
    ids[4, 1] = -1
    for mode in (0, 1, 2):
        if mode == 0:
            got = triton_align(ids, E, 16, _mode=0)
        else:
            big = torch.randint(0, E, (300, k), generator=g, dtype=torch.int32)
            got = triton_align(big, E, 16, _mode=mode)
        assert got[2].numel() == 1
    x = torch.randn(M, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.1
    w2 = torch.randn(E, H, I, generator=g) * 0.1
    tw = torch.rand(M, k, generator=g)
    out = dk.fused_moe(x, w13, w2, tw, ids, backend="triton")
    assert torch.allclose(out, dk.fused_moe(x, w13, w2, tw, ids, backend="reference"), atol=1e-5, rtol=1e-4)
    a = torch.randn(10, H, generator=g)
    w = torch.randn(E, 24, H, generator=g)
    offs = torch.tensor([0, 3, 3, 6, 9, 9], dtype=torch.int32)
    assert dk.grouped_gemm(a, w, offs, backend="triton").shape == (10, 24)
    am = torch.randn(E, 8, H, generator=g)
    assert dk.grouped_gemm_masked(am, w, torch.tensor([0, 3, 8, 1, 5]), backend="triton").shape == (E, 8, 24)


def test_schedule_attention_philox_masks(strict_masks):
    g = _gen(4)
    conf = torch.rand(4, 3, generator=g)
    sps = torch.linspace(1.0, 0.5, 12, dtype=torch.float64)
    for early in (True, False):
        got = dk.schedule_verify_lens(conf, sps, early_stop=early, backend="triton")
        want = dk.schedule_verify_lens(conf, sps, early_stop=early, backend="reference")
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    T, H, Hkv, D, B, W = 5, 4, 2, 16, 2, 6
    q, kb, vb = (torch.randn(T, n, D, generator=g) for n in (H, Hkv, Hkv))
    kc, vc = (torch.randn(B, W, Hkv, D, generator=g) for _ in range(2))
    cu, lens = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([3, 9], dtype=torch.int32)
    out = dk.draft_block_attention(q, kb, vb, kc, vc, cu, lens, sinks=torch.randn(H, generator=g), window=4,
                                   max_block_len=3, backend="triton")
    assert out.shape == (T, H, D) and torch.isfinite(out).all()
    from dspark_kernels.triton.philox import random_words

    words = random_words(torch.arange(6), torch.arange(6) * 3, torch.arange(6) + 100, 0x44524654)
    assert words.shape == (6,) and bool(((words >= 0) & (words < 2**32)).all())
