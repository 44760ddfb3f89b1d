"""The random stream of docs/randomness.md: raw Philox words bit-identical on every backend.

Backends compared word for word on the same (seed, position, salt, index) tuples:
the PyTorch reference (dspark_kernels.reference.philox), the C++ op
(torch.ops.dspark.random_words, CPU and, with a GPU, CUDA) and the Triton helper
(dspark_kernels.triton.philox, under TRITON_INTERPRET=1 without a GPU; conftest.py
sets it before triton is imported). Plus the Random123 known-answer vectors for
philox4x32_10 and the (0, 1) uniform.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # conftest.py does the same; kept for running this file alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dspark_kernels  # noqa: E402  (registers torch.ops.dspark.*)
from dspark_kernels.reference import philox as ref  # noqa: E402

try:  # module-level kernels: a @triton.jit body may only reach globals of its module
    import triton
    import triton.language as tl

    from dspark_kernels.triton import philox as tp
except ImportError:  # the Triton tests skip
    triton = None

if triton is not None:

    @triton.jit
    def _kat_kernel(in_ptr, out_ptr):
        r = tl.arange(0, 4)
        c0 = tl.load(in_ptr + 0).to(tl.uint32)
        c1 = tl.load(in_ptr + 1).to(tl.uint32)
        c2 = tl.load(in_ptr + 2).to(tl.uint32)
        c3 = tl.load(in_ptr + 3).to(tl.uint32)
        k0 = tl.load(in_ptr + 4).to(tl.uint32)
        k1 = tl.load(in_ptr + 5).to(tl.uint32)
        w0, w1, w2, w3 = tp.philox4x32_10(c0, c1, c2, c3, k0, k1)
        w = tl.where(r == 0, w0, tl.where(r == 1, w1, tl.where(r == 2, w2, w3)))
        tl.store(out_ptr + r, w.to(tl.int64))

    @triton.jit
    def _uniform_kernel(w_ptr, u_ptr, g_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.uint32)
        tl.store(u_ptr + offs, tp.uniform_from_word(w), mask=mask)
        tl.store(g_ptr + offs, tp.gumbel_from_word(w), mask=mask)

SALTS = [ref.SALT_DRAFT, ref.SALT_ACCEPT, ref.SALT_RESAMPLE]
HAS_GPU = torch.cuda.is_available()

# Random123 known-answer vectors for philox4x32_10: (counter, key) -> words.
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _triton_philox():
    if triton is None or not dspark_kernels.backends("verify_block")["triton"]:
        pytest.skip("triton is not available (not installed, or no GPU and TRITON_INTERPRET unset)")
    return tp


def _triton_device():
    return "cuda" if HAS_GPU else "cpu"


def _cases(n_random: int = 400, seed: int = 0):
    """(seed, position, index) int64 tensors: edge values crossed, then random ones."""
    seeds = [0, 1, -1, 2**32 - 1, 2**32, 2**63 - 1, -(2**63), -(2**31), 0x243F6A88_85A308D3]
    positions = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 5, 2**63 - 1, -1, -(2**63)]
    indices = [0, 1, 2, 3, 4, 5, 7, 8, 2**31 - 1, 2**31, 2**32 - 4, 2**32 - 1]
    s, p, i = [], [], []
    for a in seeds:
        for b in positions:
            for c in indices:
                s.append(a)
                p.append(b)
                i.append(c)
    g = torch.Generator().manual_seed(seed)
    s_t = torch.cat([torch.tensor(s, dtype=torch.int64),
                     torch.randint(-(2**63), 2**63 - 1, (n_random,), generator=g, dtype=torch.int64)])
    p_t = torch.cat([torch.tensor(p, dtype=torch.int64),
                     torch.randint(-(2**63), 2**63 - 1, (n_random,), generator=g, dtype=torch.int64)])
    i_t = torch.cat([torch.tensor(i, dtype=torch.int64),
                     torch.randint(0, 2**32, (n_random,), generator=g, dtype=torch.int64)])
    return s_t, p_t, i_t


# --------------------------------------------------------------------------
# Known answers


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_reference_known_answers(ctr, key, expected):
    words = ref.philox4x32_10(*[torch.tensor([c]) for c in ctr], *[torch.tensor([k]) for k in key])
    assert [int(w[0]) for w in words] == list(expected)


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_cpp_known_answers(ctr, key, expected):
    """Through the contract: counter (index>>2, pos lo, pos hi, salt), key (seed lo, seed hi)."""
    seed = key[0] | (key[1] << 32)
    seed = seed - 2**64 if seed >= 2**63 else seed
    pos = ctr[1] | (ctr[2] << 32)
    pos = pos - 2**64 if pos >= 2**63 else pos
    index = torch.tensor([4 * ctr[0] + j for j in range(4)], dtype=torch.int64) if ctr[0] < 2**30 else None
    if index is None:
        pytest.skip("counter word 0 >= 2^30 is not reachable through a uint32 index")
    seeds = torch.full((4,), seed, dtype=torch.int64)
    positions = torch.full((4,), pos, dtype=torch.int64)
    words = torch.ops.dspark.random_words(seeds, positions, index, ctr[3])
    assert words.tolist() == list(expected)


def test_triton_known_answers():
    _triton_philox()
    dev = _triton_device()
    for ctr, key, expected in KAT:
        inp = torch.tensor(list(ctr) + list(key), dtype=torch.int64, device=dev)
        out = torch.empty(4, dtype=torch.int64, device=dev)
        _kat_kernel[(1,)](inp, out)
        assert out.cpu().tolist() == list(expected)


# --------------------------------------------------------------------------
# Bit-identical words across backends


@pytest.mark.parametrize("salt", SALTS + [0, 0xFFFFFFFF])
def test_cpp_cpu_words_equal_reference(salt):
    s, p, i = _cases()
    expected = ref.random_words(s, p, salt, i)
    got = torch.ops.dspark.random_words(s, p, i, salt)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)
    assert int(got.min()) >= 0 and int(got.max()) < 2**32


@pytest.mark.parametrize("salt", SALTS + [0, 0xFFFFFFFF])
def test_triton_words_equal_reference(salt):
    _triton_philox()
    s, p, i = _cases(n_random=200)
    expected = ref.random_words(s, p, salt, i)
    dev = _triton_device()
    got = tp.random_words(s.to(dev), p.to(dev), i.to(dev), salt).cpu()
    assert torch.equal(got, expected)


def test_triton_words_int32_inputs_and_empty():
    _triton_philox()
    dev = _triton_device()
    s = torch.tensor([-5, 7, 2**31 - 1], dtype=torch.int32)
    p = torch.tensor([0, 9, 2**31 - 1], dtype=torch.int32)
    i = torch.tensor([3, 0, 1000], dtype=torch.int32)
    got = tp.random_words(s.to(dev), p.to(dev), i.to(dev), ref.SALT_ACCEPT).cpu()
    assert torch.equal(got, ref.random_words(s.long(), p.long(), ref.SALT_ACCEPT, i.long()))
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    assert tp.random_words(empty, empty, empty, ref.SALT_DRAFT).numel() == 0


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("salt", SALTS)
def test_cuda_words_equal_reference(salt):
    s, p, i = _cases()
    expected = ref.random_words(s, p, salt, i)
    if torch._C._dispatch_has_kernel_for_dispatch_key("dspark::random_words", "CUDA"):
        got = torch.ops.dspark.random_words(s.cuda(), p.cuda(), i.cuda(), salt).cpu()
        assert torch.equal(got, expected)
    if dspark_kernels.backends("verify_block")["triton"]:
        from dspark_kernels.triton import philox as tp

        got = tp.random_words(s.cuda(), p.cuda(), i.cuda(), salt).cpu()
        assert torch.equal(got, expected)


def test_streams_are_distinct():
    """Salts, positions and seeds each change the words (no accidental aliasing)."""
    s, p, i = _cases(n_random=0)
    a = ref.random_words(s, p, ref.SALT_ACCEPT, i)
    assert not torch.equal(a, ref.random_words(s, p, ref.SALT_RESAMPLE, i))
    assert not torch.equal(a, ref.random_words(s, p + 1, ref.SALT_ACCEPT, i))
    assert not torch.equal(a, ref.random_words(s + 1, p, ref.SALT_ACCEPT, i))


# --------------------------------------------------------------------------
# Uniforms strictly inside (0, 1)

EDGE_WORDS = [0, 1, 511, 512, 513, 2**31, 2**32 - 513, 2**32 - 512, 2**32 - 2, 2**32 - 1]


def test_reference_uniform_open_interval():
    words = torch.tensor(EDGE_WORDS, dtype=torch.int64)
    u = ref.uniform_from_words(words)
    assert u.dtype == torch.float32
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert float(u[0]) == 2.0**-24 and float(u[-1]) == 1.0 - 2.0**-24
    assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())
    # many random words: still inside, and all exact multiples of 2^-24
    s, p, i = _cases()
    u = ref.uniform_from_words(ref.random_words(s, p, ref.SALT_ACCEPT, i))
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert bool(((u.double() * 2**24) % 2 == 1).all())


def test_triton_uniform_and_gumbel_match_reference():
    _triton_philox()
    s, p, i = _cases(n_random=0)
    words = torch.cat([torch.tensor(EDGE_WORDS, dtype=torch.int64), ref.random_words(s, p, ref.SALT_RESAMPLE, i)])
    words = words[:1024]
    dev = _triton_device()
    u = torch.empty(words.numel(), dtype=torch.float32, device=dev)
    g = torch.empty_like(u)
    _uniform_kernel[(1,)](words.to(dev), u, g, words.numel(), BLOCK=1024)
    u, g = u.cpu(), g.cpu()
    assert torch.equal(u, ref.uniform_from_words(words))  # exact: every value is representable
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert float(u[0]) == 2.0**-24 and float(u[len(EDGE_WORDS) - 1]) == 1.0 - 2.0**-24
    assert bool(torch.isfinite(g).all())
    # log is the platform's fp32 log: equal up to an ulp or two
    torch.testing.assert_close(g, -torch.log(-torch.log(ref.uniform_from_words(words))), rtol=1e-6, atol=1e-6)
