"""Model presets and default sweep values shared by the benchmark subcommands (docs/performance.md)."""

from __future__ import annotations

import torch

# name -> vocabulary size of the target model
VOCAB_PRESETS: dict[str, int] = {
    "qwen3-4b": 151936,
    "deepseek-v4": 129280,
    "gemma4-12b": 262144,
}

DEFAULT_GAMMA = 7
DEFAULT_BATCHES = (1, 16, 64)

# --quick: tiny shapes for CI and tests
QUICK_VOCAB = 1000
QUICK_BATCHES = (1, 4)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return str(dtype).replace("torch.", "")
