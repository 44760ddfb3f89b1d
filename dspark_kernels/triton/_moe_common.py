"""Launch configurations of the MoE Triton kernels: a heuristic, tuned JSON files, their tuner's I/O.

A config is a dict ``{"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}``.
For ``fused_moe`` one config serves both GEMMs (as in vLLM): ``BLOCK_M`` is also
the ``moe_align`` block, GEMM1 computes ``BLOCK_N / 2`` gate and ``BLOCK_N / 2`` up
columns per tile (``BLOCK_N`` columns of ``w13``), GEMM2 ``BLOCK_N`` output columns.

Where a config comes from, first match wins:

1. ``config=`` passed to the Triton function (tests, the tuner);
2. a tuned file ``E={E},N={I},K={H},dtype={dtype},device={name}.json`` in
   ``$DSPARK_MOE_CONFIG_DIR`` or ``dspark_kernels/triton/moe_configs/``, mapping
   ``str(M)`` to a config; the entry with the nearest M is used (vLLM's rule; the
   tuner writes entries at non-power-of-two M such as ``B·(γ+1)``);
3. ``heuristic_config``: by the average number of slots per expert
   ``M·top_k / E`` (continuous in M, so ``M = 8, 24, 40 …`` need no entry of their
   own); ``BLOCK_M = 16`` while experts see a handful of rows each (the verify
   regime: weight streaming), larger tiles as the GEMMs become compute bound.
"""

from __future__ import annotations

import functools
import json
import os
import re

import torch

CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
SMEM_BUDGET = 192 * 1024  # bytes of shared memory a config may plan for (H100/H200: 227 KB)
_HERE = os.path.dirname(os.path.abspath(__file__))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
        dtype, str(dtype).replace("torch.", ""))


def device_name(device: torch.device | str | None = None) -> str:
    if interpreting() or not torch.cuda.is_available():
        return "interpreter"
    index = torch.device(device).index if device is not None else None
    return _cuda_device_name(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=16)
def _cuda_device_name(index: int) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(index)).strip("_")


def config_dir() -> str:
    return os.environ.get("DSPARK_MOE_CONFIG_DIR") or os.path.join(_HERE, "moe_configs")


def config_file_name(E: int, N: int, K: int, dtype: torch.dtype, device: str) -> str:
    """vLLM-style name: N = the intermediate size I (w2's last dim), K = the hidden size H."""
    return f"E={E},N={N},K={K},dtype={dtype_name(dtype)},device={device}.json"


@functools.lru_cache(maxsize=64)
def _load_tuned(path: str) -> dict[int, dict] | None:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    table = {}
    for key, cfg in raw.items():
        if key.isdigit() and all(k in cfg for k in CONFIG_KEYS):
            table[int(key)] = {k: int(cfg[k]) for k in CONFIG_KEYS}
    return table or None


def tuned_config(M: int, E: int, H: int, I: int, dtype: torch.dtype, device: str | None = None) -> dict | None:
    path = os.path.join(config_dir(), config_file_name(E, I, H, dtype, device or device_name()))
    table = _load_tuned(path)
    if not table:
        return None
    return dict(table[min(table, key=lambda m: (abs(m - M), m))])


def fit_stages(cfg: dict, elem_bytes: int) -> dict:
    """Lower num_stages until the pipelined tiles (A [BM, BK] + B [BK, BN]; GEMM1's gate
    and up halves together are one [BK, BN]) fit SMEM_BUDGET."""
    per_stage = (cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"]) * elem_bytes
    stages = max(1, min(cfg["num_stages"], SMEM_BUDGET // max(per_stage, 1)))
    return dict(cfg, num_stages=stages)


def heuristic_config(M: int, E: int, H: int, I: int, top_k: int, dtype: torch.dtype) -> dict:
    """The fused_moe config without a tuned file (see the module docstring)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=1, num_stages=1)  # few, large numpy steps
    rows = M * top_k / max(E, 1)  # average slots per expert
    if rows <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)
    elif rows <= 48:
        cfg = dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)
    elif rows <= 192:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if dtype == torch.float32:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
    return fit_stages(cfg, torch.empty((), dtype=dtype).element_size())


def fused_moe_config(M: int, E: int, H: int, I: int, top_k: int, dtype: torch.dtype) -> dict:
    cfg = None if interpreting() else tuned_config(M, E, H, I, dtype)
    return cfg or heuristic_config(M, E, H, I, top_k, dtype)


def grouped_gemm_config(T: int, E: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Heuristic for grouped_gemm: BLOCK_M by the average rows per group."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=1, num_stages=1)  # few, large numpy steps
    rows = T / max(E, 1)
    if rows <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)
    elif rows <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if dtype == torch.float32:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
    return fit_stages(cfg, torch.empty((), dtype=dtype).element_size())


def check_config(cfg: dict, who: str) -> dict:
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{who}: config is missing {missing}, got {cfg}")
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = int(cfg[k])
        if v < 16 or v & (v - 1):
            raise ValueError(f"{who}: config {k} must be a power of two >= 16, got {v}")
    return {k: int(cfg[k]) for k in CONFIG_KEYS}


def write_tuned(path: str, table: dict[int, dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({str(m): {k: int(c[k]) for k in CONFIG_KEYS} for m, c in sorted(table.items())}, f, indent=1)
        f.write("\n")
    _load_tuned.cache_clear()
    return path
