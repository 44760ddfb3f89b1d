"""Small sample inputs for every registered op, as ``torch.ops.dspark.<op>`` takes them.

Each entry builds fresh tensors (mutating ops change theirs) with only the op's
required arguments plus the keywords it needs. ``test_registry.py`` checks that
every declared op has one, so a new op cannot skip the registry tests.
Also run as a script (``python registry_samples.py``) by the subprocess tests: it
calls every op through ``torch.ops.dspark`` and compares with the reference.
"""

from __future__ import annotations

import sys

import torch


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _i32(x):
    return torch.tensor(x, dtype=torch.int32)


def verify_block():
    g = _g(1)
    # q of the 3 drafts read in place from 4 stored rows (draft_index), min-p on request 0
    return (torch.randn(5, 11, generator=g), _i32([1, 2, 3]), _i32([0, 2, 3])), dict(
        draft_logits=torch.randn(4, 11, generator=g), temperature=torch.tensor([1.0, 0.0]),
        seed=torch.tensor([11, 12]), offset=torch.tensor([0, 5]), max_num_draft=2,
        min_p=torch.tensor([0.1, 0.0]), draft_index=_i32([3, 0, 0]))


def random_words():
    return (torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2**40]), torch.tensor([0, 5, 9]), 0x41434350), {}


def schedule_verify_lens():
    g = _g(2)
    return (torch.rand(3, 4, generator=g), torch.linspace(100.0, 40.0, 16)), {}


def draft_sample_block():
    g = _g(3)
    return (torch.randn(2, 3, 11, generator=g), _i32([1, 2])), dict(
        temperature=torch.tensor([1.0, 0.0]), seed=torch.tensor([5, 6]), offset=torch.tensor([3, 4]))


def kv_commit():
    g = _g(4)
    caches = [torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 1, generator=g).half()]
    return (caches, _i32([[0, 1], [2, 3]]), 2, _i32([1, 1]), _i32([[0, 2, -1], [0, 1, 2]]), _i32([2, 3])), {}


def kv_release_pages():
    return (_i32([[0, 1, 2], [3, 4, 5]]), _i32([1, 4]), _i32([5, 6]), 2, torch.ones(6, dtype=torch.int32)), {}


def window_commit():
    g = _g(5)
    return (torch.zeros(2, 3, 4), torch.randn(3, 4, generator=g), _i32([0, 2, 3]), _i32([0, 1, 5]),
            torch.tensor([True, False, True])), {}


def state_select():
    g = _g(6)
    return (torch.randn(2, 3, 4, generator=g), _i32([1, -1]), torch.zeros(2, 4)), {}


def moe_align():
    return (_i32([[0, 1], [1, -1], [2, 0]]), 3, 2), {}


def grouped_gemm():
    g = _g(7)
    return (torch.randn(5, 4, generator=g), torch.randn(2, 3, 4, generator=g), _i32([0, 2, 4])), {}


def grouped_gemm_out():
    (a, w, offs), _ = grouped_gemm()
    return (a, w, offs), dict(out=torch.full((5, 3), float("nan")))


def grouped_gemm_masked():
    g = _g(8)
    return (torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g), _i32([1, 3])), {}


def fused_moe():
    g = _g(9)
    return (torch.randn(3, 4, generator=g), torch.randn(2, 6, 4, generator=g), torch.randn(2, 4, 3, generator=g),
            torch.rand(3, 2, generator=g), _i32([[0, 1], [1, 0], [0, -1]])), {}


def draft_block_attention():
    g = _g(10)
    return (torch.randn(3, 2, 4, generator=g), torch.randn(3, 1, 4, generator=g), torch.randn(3, 1, 4, generator=g),
            torch.randn(2, 5, 1, 4, generator=g), torch.randn(2, 5, 1, 4, generator=g), _i32([0, 2, 3]),
            _i32([3, 7])), dict(max_block_len=2)


def verify_tree():
    g = _g(11)
    # request 0: root -> {0, 1}, 1 -> {2}; request 1: a single node
    return (torch.randn(6, 11, generator=g), _i32([1, 2, 3, 4]), _i32([-1, -1, 1, -1]), _i32([0, 3, 4])), dict(
        temperature=torch.tensor([1.0, 0.0]), seed=torch.tensor([11, 12]), offset=torch.tensor([0, 5]),
        max_depth=2, min_p=torch.tensor([0.05, 0.0]))


def token_logprobs():
    g = _g(12)
    return (torch.randn(4, 11, generator=g), _i32([[1, 2, -1], [3, 0, 4]]), _i32([[0, 1, -1], [3, 2, -1]])), dict(
        temperature=torch.tensor([0.8, 0.0]), top_k=_i32([3, 0]), min_p=torch.tensor([0.0, 0.2]))


SAMPLES = {name: fn for name, fn in list(globals().items())
           if callable(fn) and not name.startswith("_") and name not in ("annotations",) and
           getattr(fn, "__module__", None) == __name__}


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def sample(op: str, device: str = "cpu"):
    args, kwargs = SAMPLES[op]()
    return tuple(_to(a, device) for a in args), {k: _to(v, device) for k, v in kwargs.items()}


def outputs(op: str, args, kwargs, result) -> list[torch.Tensor]:
    """What a call produced: its returned tensors, then every argument it may write."""
    from dspark_kernels._registry import REGISTRY

    spec = REGISTRY[op]
    ordered = spec.ordered(args, kwargs)
    out = [result] if isinstance(result, torch.Tensor) else [r for r in (result or ()) if r is not None]
    for a, value in zip(spec.arguments, ordered):
        if a.alias_info is not None and a.alias_info.is_write:
            out.extend(value if isinstance(value, list) else [value])
    return [t.cpu() for t in out]


def assert_same(op: str, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want), (op, len(got), len(want))
    for g, w in zip(got, want):
        if g.dtype.is_floating_point:
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-4, atol=1e-5, equal_nan=True,
                                       msg=lambda m: f"{op}: {m}")
        else:
            assert torch.equal(g, w), f"{op}: {g} != {w}"


def reference_outputs(op: str, device: str = "cpu") -> list[torch.Tensor]:
    from dspark_kernels._registry import REGISTRY

    spec = REGISTRY[op]
    args, kwargs = sample(op, device)
    result = spec.run_checked("reference", spec.ordered(args, kwargs))
    return outputs(op, args, kwargs, result)


def main() -> int:
    """Every op through torch.ops.dspark on CPU tensors == its reference."""
    import dspark_kernels  # noqa: F401
    from dspark_kernels import _backend

    print(f"extension loaded: {_backend.HAS_EXTENSION}")
    failed = 0
    for op in SAMPLES:
        args, kwargs = sample(op)
        try:
            got = outputs(op, args, kwargs, getattr(torch.ops.dspark, op)(*args, **kwargs))
            assert_same(op, got, reference_outputs(op))
            print(f"{op}: ok")
        except Exception as exc:  # report every op, then fail
            failed += 1
            print(f"{op}: FAILED {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
