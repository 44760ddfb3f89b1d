"""Regression tests for integer-limit bugs in the C++ CPU kernels (the issue tracker's
hardening list): each case crashed, overflowed (UBSan), wrapped or silently accepted
bad input before the fix. They call ``torch.ops.dspark.*`` directly, so they test
the C++ kernel's own checks, not the Python wrappers'. The reference cases run the
PyTorch spec (dspark_kernels/reference) on the same input.
"""

from __future__ import annotations

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.reference import kv as ref_kv
from dspark_kernels.reference import philox as ref_philox

HAS_CPU = dk.backends("kv_commit")["cpu"]
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")

I64_MAX = 2**63 - 1
I32_MAX = 2**31 - 1
ERRORS = (RuntimeError, ValueError)


# --------------------------------------------------------------------------- 1. kv_release_pages: huge new_len


@needs_cpu
@pytest.mark.parametrize("new_len,page_size", [(2**63 - 15, 16), (I64_MAX, 2), (I64_MAX, 1), (17, 4)])
def test_cpu_release_new_len_past_the_table_is_an_error(new_len, page_size):
    # was: a segfault (new_len + page_size - 1 overflowed, block_table read out of bounds),
    # or a bogus "double free ... block_table[0, -4611686018427387900]"
    table = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    rc = torch.ones(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"new_len\[0\] = .* past the block_table"):
        torch.ops.dspark.kv_release_pages(table, torch.tensor([new_len]), torch.tensor([3]), page_size, rc)
    assert rc.tolist() == [1, 1, 1, 1]


@needs_cpu
def test_cpu_release_num_pages_past_int32_is_an_error():
    # freed page ids are int32: a page id >= 2^31 would have been truncated (an expanded view, no memory)
    table = torch.tensor([[2**31]], dtype=torch.int64)
    rc = torch.ones(1, dtype=torch.int32).expand(2**31 + 1)
    with pytest.raises(RuntimeError, match=r"refcount has 2147483649 pages"):
        torch.ops.dspark.kv_release_pages(table, torch.tensor([0]), torch.tensor([1]), 1, rc)


# --------------------------------------------------------------------------- 2. signed overflow


@needs_cpu
@pytest.mark.parametrize("old_len", [I64_MAX, 2**62 + 1, 2])
def test_cpu_release_huge_page_size_is_valid(old_len):
    # was: "old_len past the block_table" (P * page_size overflowed to 0)
    table = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    rc = torch.ones(4, dtype=torch.int32)
    rc_ref = rc.clone()
    new, old = torch.tensor([1]), torch.tensor([old_len])
    freed, num = torch.ops.dspark.kv_release_pages(table, new, old, 2**62, rc)
    freed_ref, num_ref = ref_kv.kv_release_pages(table, new, old, 2**62, rc_ref)
    assert freed.tolist() == freed_ref.tolist() and num.tolist() == num_ref.tolist()
    assert rc.tolist() == rc_ref.tolist()
    assert freed.tolist()[0][0] == (1 if old_len > 2**62 else -1)


def _commit_args(committed_len, num_accept, path, P=4, page_size=2**30):
    table = torch.arange(P, dtype=torch.int32)[None].repeat(len(committed_len), 1)
    return ([], table, page_size, torch.tensor(committed_len, dtype=torch.int64),
            torch.tensor(path, dtype=torch.int64), torch.tensor(num_accept, dtype=torch.int32))


@needs_cpu
@pytest.mark.parametrize("committed_len,num_accept,path", [
    ([I64_MAX], [1], [[0, 1]]),       # was: committed_len + s overflowed (UBSan), a wrapped position in the message
    ([I64_MAX], [0], [[0, 1]]),       # was: accepted, new_len wrapped to -1
    ([I32_MAX], [1], [[0, 1]]),       # 5: was new_len = -2^31 (int32 wrap)
    ([I32_MAX - 1, 5], [2, 0], [[0, 1], [0, 1]]),
    ([2**32], [0], [[0, 1]]),
])
def test_cpu_commit_new_len_past_int32_is_an_error(committed_len, num_accept, path):
    with pytest.raises(RuntimeError, match=r"committed_len\[0\] = .*int32 new_len"):
        torch.ops.dspark.kv_commit(*_commit_args(committed_len, num_accept, path))


@needs_cpu
def test_cpu_commit_largest_new_len_is_exact():
    args = _commit_args([I32_MAX - 2], [2], [[0, 1]])
    assert torch.ops.dspark.kv_commit(*args).tolist() == [I32_MAX]
    assert ref_kv.kv_commit(*args).tolist() == [I32_MAX]


def test_reference_commit_new_len_saturates_instead_of_wrapping():
    args = _commit_args([I32_MAX, I64_MAX, -(2**63)], [1, 3, -1], [[0, 1]] * 3)
    assert ref_kv.kv_commit(*args).tolist() == [I32_MAX, I32_MAX, -(2**31)]


@needs_cpu
@pytest.mark.parametrize("committed_len", [I32_MAX - 3, 2**31 - 4])
def test_cpu_commit_path_entry_past_int64_is_an_error(committed_len):
    # committed_len + accept_path[b, j] with a huge entry: was a signed overflow
    args = _commit_args([committed_len], [2], [[0, I64_MAX]])
    with pytest.raises(RuntimeError, match=r"source position committed_len\[0\]"):
        torch.ops.dspark.kv_commit(*args)


def _verify(B, N, max_num_draft, V=11, cu=None, cu_dtype=torch.int64):
    cu = torch.tensor(cu if cu is not None else [0] * (B + 1), dtype=cu_dtype)
    return torch.ops.dspark.verify_block(torch.zeros(N + B, V), torch.zeros(N, dtype=torch.int64), cu,
                                         seed=torch.zeros(B, dtype=torch.int64),
                                         offset=torch.zeros(B, dtype=torch.int64), max_num_draft=max_num_draft)


@needs_cpu
@pytest.mark.parametrize("max_num_draft", [I64_MAX, 2**31 - 1, 2**40, -1])
def test_cpu_verify_block_max_num_draft_out_of_range_is_an_error(max_num_draft):
    # was: max_num_draft + 1 overflowed (UBSan) and torch complained about a negative dimension
    with pytest.raises(RuntimeError, match=r"verify_block: max_num_draft must be in \[0, 2\^31 - 2\]"):
        _verify(0, 0, max_num_draft)


@needs_cpu
def test_cpu_verify_block_largest_max_num_draft_is_accepted():
    out, num = _verify(0, 0, 2**31 - 2)
    assert out.shape == (0, 2**31 - 1) and num.shape == (0,)


# --------------------------------------------------------------------------- 3. verify_block: int64 cu narrowed


@needs_cpu
@pytest.mark.parametrize("cu", [
    [0, 2**32 + 2, 2**32 + 2, 5],   # the issue: ran as [0, 2, 2, 5]
    [0, -(2**32) + 2, 2, 5],
    [0, 2**63 - 1, 2, 5],
    [0, 2, 2**32 + 5, 5],
    [0, 2, 2, 2**32 + 5],
    [2**32, 2, 2, 5],
])
def test_cpu_verify_block_wide_cu_is_an_error(cu):
    with pytest.raises(RuntimeError, match=r"verify_block: cu_num_draft"):
        _verify(3, 5, 3, cu=cu)


@needs_cpu
def test_cpu_verify_block_int64_cu_in_range_matches_int32():
    a = _verify(3, 5, 3, cu=[0, 2, 2, 5])
    b = _verify(3, 5, 3, cu=[0, 2, 2, 5], cu_dtype=torch.int32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- 4. kv_commit: a kept slot overwritten


def _identity_conflict_case():
    cache = torch.arange(9 * 4, dtype=torch.int32).reshape(9, 4, 1)  # value = page * 4 + slot
    return ([cache], torch.tensor([[0, 8, 1], [2, 8, 3]], dtype=torch.int32), 4, torch.tensor([4, 4]),
            torch.tensor([[0, 3], [0, 1]]), torch.tensor([2, 2]))


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_commit_write_into_a_slot_another_request_keeps_is_an_error(impl):
    # request 1 keeps its token at page 8 slot 1 (an identity move); request 0 writes there.
    # was: accepted, and request 1's token became 35 (request 0's source) instead of 33
    if impl == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    args = _identity_conflict_case()
    fn = torch.ops.dspark.kv_commit if impl == "cpu" else ref_kv.kv_commit
    with pytest.raises(ERRORS, match=r"request 1 keeps its token at page 8 slot 1.*request 0"):
        fn(*args)
    assert args[0][0].flatten().tolist() == list(range(36))  # nothing written


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_commit_shared_kept_slots_without_writes_are_fine(impl):
    if impl == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    caches, table, ps, L, _path, n = _identity_conflict_case()
    fn = torch.ops.dspark.kv_commit if impl == "cpu" else ref_kv.kv_commit
    # both requests keep page 8 slots 0 and 1; request 0 also writes page 8 slot 2 (<- slot 3), which
    # request 1 neither keeps nor reads
    path = torch.tensor([[0, 1, 3], [0, 1, -1]])
    new_len = fn(caches, table, ps, L, path, torch.tensor([3, 2]))
    assert new_len.tolist() == [7, 6]
    expect = list(range(36))
    expect[8 * 4 + 2] = 8 * 4 + 3  # request 0: position 6 (page 8 slot 2) <- position 7 (page 8 slot 3)
    assert caches[0].flatten().tolist() == expect


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_commit_read_of_a_slot_another_request_writes_is_an_error(impl):
    if impl == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    caches, _table, ps, L, _path, _n = _identity_conflict_case()
    fn = torch.ops.dspark.kv_commit if impl == "cpu" else ref_kv.kv_commit
    table = torch.tensor([[0, 8, 1], [2, 3, 8]], dtype=torch.int32)
    # request 0 writes page 8 slot 1; request 1 reads it (its position 9) into its own page 3
    path = torch.tensor([[0, 3], [5, -1]])
    with pytest.raises(ERRORS, match=r"request 1 reads page 8 slot 1.*request 0"):
        fn(caches, table, ps, L, path, torch.tensor([2, 1]))
    assert caches[0].flatten().tolist() == list(range(36))


# --------------------------------------------------------------------------- 6. random_words: index range


@needs_cpu
@pytest.mark.parametrize("index", [-1, 2**32, 2**40 + 3, -(2**63), I64_MAX])
def test_cpu_random_words_index_outside_uint32_is_an_error(index):
    # was: truncated to uint32, giving words that differ from the reference
    idx = torch.tensor([0, index, 5])
    with pytest.raises(RuntimeError, match=r"index\[1\].*outside \[0, 2\^32\)"):
        torch.ops.dspark.random_words(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), idx, 7)


@needs_cpu
def test_cpu_random_words_limits_match_the_reference():
    index = torch.tensor([0, 1, 2, 3, 2**31 - 1, 2**31, 2**32 - 4, 2**32 - 1])
    seed = torch.tensor([0, -1, I64_MAX, -(2**63), 2**32, 1, 2**62, -5])
    position = torch.tensor([I64_MAX, -(2**63), -1, 0, 2**32 - 1, 2**32, 7, 2**62])
    for salt in (0, ref_philox.SALT_ACCEPT, 2**32 - 1):
        got = torch.ops.dspark.random_words(seed, position, index, salt)
        assert got.tolist() == ref_philox.random_words(seed, position, salt, index).tolist()
