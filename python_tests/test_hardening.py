"""Edge cases found by fuzzing the public functions: the reference's answer on every
backend, or an error that names the op and the argument (issue "every input, every
backend"). The C++ integer limits are in test_cpp_hardening.py / test_fuzz_cpp_limits.py,
non-finite sampling input in test_nonfinite.py."""

from __future__ import annotations

import pytest
import torch

import dspark_kernels as dk

from conftest import available_backends

CPU_BACKENDS = ["reference"] + [b for b in available_backends() if b != "cuda"]


def _verify_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 11, generator=g), torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([0, 2, 3])


def _draft_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 11, generator=g), torch.tensor([1, 2])


# --------------------------------------------------------------------------- Python scalars name the argument


@pytest.mark.parametrize("fn", ["verify_block", "draft_sample_block"])
@pytest.mark.parametrize("name,value", [("temperature", "hot"), ("temperature", True), ("top_p", [0.5]),
                                        ("top_k", 2.5), ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", "s"),
                                        ("offset", 2**63), ("offset", 1.5)])
def test_python_scalars_name_the_argument(fn, name, value):
    args = _verify_inputs() if fn == "verify_block" else _draft_inputs()
    with pytest.raises(ValueError, match=rf"{fn}: {name} must be"):
        getattr(dk, fn)(*args, **{name: value})


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_huge_python_top_k_is_off(backend):
    t, d, cu = _verify_inputs()
    want = dk.verify_block(t, d, cu, temperature=1.0, seed=3, backend="reference")
    got = dk.verify_block(t, d, cu, temperature=1.0, top_k=2**40, seed=3, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    base, anchor = _draft_inputs()
    want = dk.draft_sample_block(base, anchor, temperature=1.0, seed=3, backend="reference")
    got = dk.draft_sample_block(base, anchor, temperature=1.0, top_k=-(2**40), seed=3, backend=backend)
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seed_above_2_63_is_the_same_bits(backend):
    t, d, cu = _verify_inputs()
    got = dk.verify_block(t, d, cu, temperature=1.0, seed=2**63 + 5, backend=backend)
    want = dk.verify_block(t, d, cu, temperature=1.0, seed=torch.tensor([-(2**63) + 5] * 2), backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("offset", [2**63 - 1, 2**63 - 2, -(2**63)])
def test_offsets_near_the_int64_limits_wrap(backend, offset):
    """Positions offset + i wrap modulo 2^64 on every backend (no error, no overflow)."""
    t, d, cu = _verify_inputs()
    want = dk.verify_block(t, d, cu, temperature=1.0, seed=9, offset=offset, backend="reference")
    got = dk.verify_block(t, d, cu, temperature=1.0, seed=9, offset=offset, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    base, anchor = _draft_inputs()
    want = dk.draft_sample_block(base, anchor, temperature=1.0, seed=9, offset=offset, backend="reference")
    got = dk.draft_sample_block(base, anchor, temperature=1.0, seed=9, offset=offset, backend=backend)
    assert torch.equal(got[0], want[0])


def test_wild_offsets_never_size_the_output():
    """max_num_draft=None reads cu_num_draft: offsets are checked before they size anything
    (they used to ask for a 51 GB output)."""
    t = torch.randn(8, 11)
    cu = torch.tensor([0, 2**32 + 2, 2**32 + 2, 5])
    with pytest.raises(ValueError, match="cu_num_draft"):
        dk.verify_block(t, torch.zeros(5, dtype=torch.int32), cu)


@pytest.mark.parametrize("max_num_draft", [-1, 2**31 - 1, 2**63 - 1])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_max_num_draft_range(backend, max_num_draft):
    t, d, cu = _verify_inputs()
    with pytest.raises((ValueError, RuntimeError), match="max_num_draft"):
        dk.verify_block(t, d, cu, max_num_draft=max_num_draft, backend=backend)


# --------------------------------------------------------------------------- schema types, meta tensors


@pytest.mark.parametrize("backend", [None] + CPU_BACKENDS)
def test_bool_is_not_an_int(backend):
    with pytest.raises(ValueError, match="moe_align: num_experts must be an int"):
        dk.moe_align(torch.tensor([[0, 1]]), True, 4, backend=backend)


def test_schema_types_are_checked_before_dispatch():
    with pytest.raises(ValueError, match="kv_commit: page_size must be an int"):
        dk.kv_commit([torch.zeros(2, 4, 1)], torch.zeros(1, 1, dtype=torch.int32), 4.0, torch.zeros(1),
                     torch.zeros(1, 1), torch.zeros(1))
    with pytest.raises(ValueError, match="random_words: salt must be an int"):
        dk.random_words(torch.tensor([1]), torch.tensor([1]), torch.tensor([1]), 2**64)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_meta_tensors_on_named_backends_are_refused(backend):
    meta = torch.zeros(3, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="meta"):
        dk.random_words(meta, meta, meta, 5, backend=backend)
    ids = torch.zeros(2, 2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="meta"):
        dk.moe_align(ids, 3, 4, backend=backend)


def test_meta_tensors_through_the_op_get_shapes():
    meta = torch.zeros(3, dtype=torch.int64, device="meta")
    assert dk.random_words(meta, meta, meta, 5).shape == (3,)


# --------------------------------------------------------------------------- random_words index range


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("index", [-1, 2**32, 2**40 + 3])
def test_random_words_index_outside_uint32_is_an_error(backend, index):
    with pytest.raises((ValueError, RuntimeError), match="index"):
        dk.random_words(torch.tensor([1, 2]), torch.tensor([0, 5]), torch.tensor([0, index]), 7, backend=backend)


def test_random_words_gpu_rule_is_minus_one():
    """Without a check (GPU tensors, no DSPARK_DEBUG) an index outside [0, 2^32) gives -1."""
    from dspark_kernels.reference.random_words import random_words as ref

    got = ref(torch.tensor([1, 2, 3]), torch.tensor([0, 5, 6]), torch.tensor([-1, 2**32, 4]), 7)
    assert got[:2].tolist() == [-1, -1] and got[2] >= 0


# --------------------------------------------------------------------------- float dtypes, -1 slots, invisible slots


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_topk_weights_and_sinks(backend):
    g = torch.Generator().manual_seed(2)
    x, w13, w2 = torch.randn(3, 4, generator=g), torch.randn(2, 6, 4, generator=g), torch.randn(2, 4, 3, generator=g)
    ids, tw = torch.tensor([[0, 1], [1, -1], [0, 0]]), torch.rand(3, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dk.fused_moe(x, w13, w2, tw, ids, backend=backend),
                               dk.fused_moe(x, w13, w2, tw.float(), ids, backend="reference"), rtol=1e-4, atol=1e-5)
    q, kb, vb = torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    kc, vc = torch.randn(2, 16, 2, 8, generator=g), torch.randn(2, 16, 2, 8, generator=g)
    cu, lens, sinks = torch.tensor([0, 2, 3]), torch.tensor([5, 20]), torch.randn(4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        dk.draft_block_attention(q, kb, vb, kc, vc, cu, lens, sinks=sinks, max_block_len=2, backend=backend),
        dk.draft_block_attention(q, kb, vb, kc, vc, cu, lens, sinks=sinks.float(), max_block_len=2,
                                 backend="reference"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_slot_with_nan_weight_contributes_nothing(backend):
    g = torch.Generator().manual_seed(3)
    x, w13, w2 = torch.randn(2, 4, generator=g), torch.randn(2, 6, 4, generator=g), torch.randn(2, 4, 3, generator=g)
    ids = torch.tensor([[0, -1], [1, 0]])
    tw = torch.tensor([[0.5, float("nan")], [0.3, 0.7]])
    out = dk.fused_moe(x, w13, w2, tw, ids, backend=backend)
    assert torch.isfinite(out).all()
    alone = dk.fused_moe(x[:1], w13, w2, tw[:1, :1], ids[:1, :1], backend="reference")
    torch.testing.assert_close(out[:1], alone, rtol=1e-5, atol=1e-6)


def _attention_case(seed):
    g = torch.Generator().manual_seed(seed)
    # B = 2 requests (blocks of 2 and 1 rows), H = 4 query heads on Hkv = 2 kv heads, D = 8, W = 16
    q, kb, vb = torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    kc, vc = torch.randn(2, 16, 2, 8, generator=g), torch.randn(2, 16, 2, 8, generator=g)
    return q, kb, vb, kc, vc, torch.tensor([0, 2, 3]), torch.tensor([5, 9]), torch.randn(4, generator=g)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["q", "k_block_neg_inf", "v_block_inf", "k_ctx_nan", "v_ctx_neg_inf", "sink_nan",
                                   "sink_pos_inf"])
def test_attention_nonfinite_input_makes_exactly_the_rows_that_read_it_nan(backend, where):
    """docs/attention.md "Non-finite input": row (i, h) is NaN iff it reads a NaN / inf
    (q[i, h]; a visible key / value or a block row of kv head h // 2; sinks[h]). Before the
    contract the reference hid a -inf score, returned inf for an inf value, and SDPA
    turned NaN rows into numbers; every other row must still equal the finite answer."""
    q, kb, vb, kc, vc, cu, lens, sinks = _attention_case(5)
    clean = dk.draft_block_attention(q, kb, vb, kc, vc, cu, lens, sinks=sinks, max_block_len=2, backend="reference")
    nan_rows = torch.zeros(3, 4, dtype=torch.bool)       # [token, head]
    if where == "q":
        q[1, 2, 3] = float("inf")
        nan_rows[1, 2] = True
    elif where == "k_block_neg_inf":                      # request 0, kv head 1: a -inf score would drop the key
        kb[1, 1, :] = float("-inf")
        nan_rows[0:2, 2:4] = True
    elif where == "v_block_inf":                          # request 1 (row 2), kv head 0
        vb[2, 0, 5] = float("inf")
        nan_rows[2, 0:2] = True
    elif where == "k_ctx_nan":                            # request 1 sees positions 0..8: slot 8 is visible
        kc[1, 8, 0, 0] = float("nan")
        nan_rows[2, 0:2] = True
    elif where == "v_ctx_neg_inf":                        # request 0 sees slots 0..4
        vc[0, 4, 1, 7] = float("-inf")
        nan_rows[0:2, 2:4] = True
    elif where == "sink_nan":
        sinks[1] = float("nan")
        nan_rows[:, 1] = True
    else:
        sinks[3] = float("inf")
        nan_rows[:, 3] = True
    out = dk.draft_block_attention(q, kb, vb, kc, vc, cu, lens, sinks=sinks, max_block_len=2, backend=backend)
    assert torch.equal(out.isnan().all(-1), nan_rows), out.isnan().all(-1)
    assert not out[~nan_rows].isnan().any()
    torch.testing.assert_close(out[~nan_rows], clean[~nan_rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_minus_inf_sink_is_no_sink(backend):
    q, kb, vb, kc, vc, cu, lens, sinks = _attention_case(6)
    sinks[:] = float("-inf")
    out = dk.draft_block_attention(q, kb, vb, kc, vc, cu, lens, sinks=sinks, max_block_len=2, backend=backend)
    want = dk.draft_block_attention(q, kb, vb, kc, vc, cu, lens, max_block_len=2, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_invisible_window_slots_are_never_read(backend):
    g = torch.Generator().manual_seed(4)
    q, kb, vb = torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    kc, vc = torch.randn(2, 16, 2, 8, generator=g), torch.randn(2, 16, 2, 8, generator=g)
    kc[:, 9:], vc[:, 9:] = float("nan"), float("inf")        # not yet written (torch.empty)
    cu, lens = torch.tensor([0, 2, 3]), torch.tensor([5, 9])
    out = dk.draft_block_attention(q, kb, vb, kc, vc, cu, lens, max_block_len=2, backend=backend)
    want = dk.draft_block_attention(q, kb, vb, kc[:, :9].contiguous(), vc[:, :9].contiguous(), cu, lens,
                                    max_block_len=2, window=16, backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
