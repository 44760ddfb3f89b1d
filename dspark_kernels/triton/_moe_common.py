"""Launch configurations of the MoE Triton kernels: a heuristic, tuned JSON files, their tuner's I/O.

A config is a dict ``{"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}``
and optionally ``"persistent"`` (bool: the schedule, see below; absent = chosen by
``prefers_persistent``). For ``fused_moe`` one config serves both GEMMs (as in
vLLM): ``BLOCK_M`` is also the ``moe_align`` block, GEMM1 computes ``BLOCK_N / 2``
gate and ``BLOCK_N / 2`` up columns per tile (``BLOCK_N`` columns of ``w13``), GEMM2
``BLOCK_N`` output columns.

Schedules of the grouped GEMMs (``fused_moe``'s two, ``grouped_gemm``):

* grid: one program per (row tile, N tile) of an upper bound on the row tiles that
  can exist; programs past the real ones (read on the device) return at once;
* persistent: ``persistent_programs`` programs (at most SMs × the programs one SM
  holds), each looping over ``tile = pid, pid + P, …`` below the real number of
  tiles, which the kernel derives on the device (no host sync). Only tiles of
  experts that have rows exist, so the launch is a fixed, small grid and the work
  is the touched (expert, N tile) pairs.

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
SMEM_PER_SM = 228 * 1024  # when the device does not say (H100/H200)
MAX_PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 3  # the interpreter runs programs one after another: a few, so each loops
PERSISTENT_ROWS_PER_EXPERT = 16  # the verify regime (BLOCK_M 16): see prefers_persistent
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
            table[int(key)] = _normalise(cfg)
    return table or None


def _normalise(cfg: dict) -> dict:
    """The config's known keys, as ints (``persistent`` as a bool, only where given)."""
    out = {k: int(cfg[k]) for k in CONFIG_KEYS}
    if cfg.get("persistent") is not None:
        out["persistent"] = bool(cfg["persistent"])
    return out


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


def _for_dtype(cfg: dict, dtype: torch.dtype) -> dict:
    """A heuristic config adjusted to the operand dtype: fp32 tiles half as deep in K, and
    no more pipeline stages than shared memory holds."""
    if dtype == torch.float32:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
    return fit_stages(cfg, torch.empty((), dtype=dtype).element_size())


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
    return _for_dtype(cfg, dtype)


def prefers_persistent(rows_per_expert: float) -> bool:
    """The schedule without ``"persistent"`` in the config: persistent in the verify regime
    (at most ``PERSISTENT_ROWS_PER_EXPERT`` rows per expert on average, where the
    heuristic takes BLOCK_M = 16): there a GEMM lasts microseconds, and the grid's
    programs that find no tile (its bound counts a partial block for every expert
    the batch could touch) and the launch of one program per tile are a visible part
    of it, while a persistent launch is a fixed few hundred programs that only visit
    the tiles that exist. At large M nearly every program of the grid has a tile and
    the hardware scheduler balances them as well as a loop. Not yet measured on a
    GPU: the tuner times both schedules and records the faster."""
    return rows_per_expert <= PERSISTENT_ROWS_PER_EXPERT


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(index: int) -> tuple[int, int]:
    """(streaming multiprocessors, shared memory bytes per SM) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, int(getattr(props, "shared_memory_per_multiprocessor", 0) or SMEM_PER_SM)


def persistent_programs(work_items: int, cfg: dict, elem_bytes: int, device: torch.device | str | None = None,
                        b_tiles: int = 1) -> int:
    """Programs of a persistent launch: ``min(work_items, SMs × programs per SM)``.

    Programs per SM: as many as the shared memory of the pipelined tiles allows
    (``num_stages × (A [BM, BK] + b_tiles · B [BK, BN])``), 1 to ``MAX_PROGRAMS_PER_SM``;
    more would only queue behind the resident ones. ``INTERPRETER_PROGRAMS`` under
    the Triton interpreter (so that the tests see programs loop over several tiles).
    """
    if interpreting() or not torch.cuda.is_available():
        return max(1, min(work_items, INTERPRETER_PROGRAMS))
    index = torch.device(device).index if device is not None else None
    sms, smem = _cuda_sm_count(torch.cuda.current_device() if index is None else index)
    per_stage = (cfg["BLOCK_M"] * cfg["BLOCK_K"] + b_tiles * cfg["BLOCK_K"] * cfg["BLOCK_N"]) * elem_bytes
    per_sm = max(1, min(MAX_PROGRAMS_PER_SM, smem // max(per_stage * cfg["num_stages"], 1)))
    return max(1, min(work_items, sms * per_sm))


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
    return _for_dtype(cfg, dtype)


def check_config(cfg: dict, who: str) -> dict:
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{who}: config is missing {missing}, got {cfg}")
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = int(cfg[k])
        if v < 16 or v & (v - 1):
            raise ValueError(f"{who}: config {k} must be a power of two >= 16, got {v}")
    if cfg.get("persistent") not in (None, True, False):
        raise ValueError(f"{who}: config persistent must be a bool or None, got {cfg['persistent']!r}")
    return _normalise(cfg)


def write_tuned(path: str, table: dict[int, dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({str(m): _normalise(c) for m, c in sorted(table.items())}, f, indent=1)
        f.write("\n")
    _load_tuned.cache_clear()
    return path


def schedule_for(cfg: dict, rows: int, num_experts: int) -> bool:
    """Persistent or not: the config's ``"persistent"`` if it has one, else the heuristic."""
    persistent = cfg.get("persistent")
    return prefers_persistent(rows / max(num_experts, 1)) if persistent is None else bool(persistent)


def gemm_grid(persistent: bool, row_blocks: int, n_tiles: int, cfg: dict, elem_bytes: int,
              device: torch.device | str | None) -> tuple[int, ...]:
    """The launch grid of one MoE GEMM over ``row_blocks × n_tiles`` tiles."""
    if persistent:
        return (persistent_programs(row_blocks * n_tiles, cfg, elem_bytes, device),)
    return (row_blocks, n_tiles)
