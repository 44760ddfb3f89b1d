"""Every public op's docstring carries a runnable ``>>>`` example, and it runs."""

from __future__ import annotations

import doctest
import importlib

import pytest

import dspark_kernels as dk
from dspark_kernels._registry import REGISTRY

MODULES = ["verification", "randomness", "drafting", "kv", "moe", "attention",
           "integrations.vllm", "integrations.sglang", "integrations.flashinfer"]
# Ops reached through another public function's argument rather than their own.
NOT_PUBLIC = {"grouped_gemm_out": "grouped_gemm(out=...)"}


@pytest.mark.parametrize("module", MODULES)
def test_examples_run(module):
    mod = importlib.import_module(f"dspark_kernels.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result


@pytest.mark.parametrize("op", sorted(REGISTRY))
def test_every_public_op_has_an_example(op):
    if op in NOT_PUBLIC:
        return
    assert ">>>" in (getattr(dk, op).__doc__ or ""), f"dspark_kernels.{op} needs a >>> example"
