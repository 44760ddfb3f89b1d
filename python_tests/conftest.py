"""Test configuration shared by every test file.

Without a GPU, Triton kernels run on the CPU through the interpreter: the
variable must be set before triton is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dspark_kernels  # noqa: E402


def available_backends(include_reference: bool = False) -> list[str]:
    names = [b for b, ok in dspark_kernels.backends("verify_block").items() if ok]
    return names if include_reference else [b for b in names if b != "reference"]


def backend_device(backend: str) -> str:
    if backend in ("cuda", "nvrtc") or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
