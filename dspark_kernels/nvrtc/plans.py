"""The launch plans of ``csrc/include/dspark/launch.h`` for the NVRTC launcher.

The constants are read from the header (``_source.constants()``), never copied;
the few formulas below are the header's functions line by line, and CI checks
that both agree for a table of shapes against the compiled extension
(``dspark_launch_plan`` in csrc/launch_plan.cpp; python_tests/test_nvrtc.py).

>>> verify_block_plan(B=2, N=6, V=5000, sampling=True, q_stats=False, with_filters=False, block=False)["num_splits"]
2
"""

from __future__ import annotations

import ctypes
import functools

from . import _source


@functools.cache
def C() -> dict[str, int]:
    """launch.h's constants, ``{"vb.kStatsThreads": 128, ...}``."""
    return _source.constants()


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def align_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def random_words_blocks(n: int) -> int:
    return min(ceil_div(n, C()["rw.kThreads"]), C()["rw.kMaxBlocks"])


def schedule_max_admit(R: int, gamma: int, bmax: int) -> int:  # schedule.h
    room, n = bmax - R, R * gamma
    return 0 if room <= 0 else min(room, n)


def schedule_workspace(R: int, gamma: int) -> dict[str, int]:
    n = R * gamma
    num_parts = ceil_div(n, C()["sched.kThreads"])
    slots, parts = max(n, 1), max(num_parts, 1)
    w = {"num_parts": num_parts, "keys": 0, "quant": slots * 8, "part_count": 2 * slots * 8,
         "part_theta": (2 * slots + parts) * 8, "rank": (2 * slots + 2 * parts) * 8}
    w["bytes"] = w["rank"] + slots * 4
    return w


@functools.cache
def record_sizes() -> tuple[int, int, int, int]:
    """sizeof(StatPartial), sizeof(RowFilter), sizeof(RaceDesc), sizeof(RacePartial) (mirrored from the header)."""
    return tuple(ctypes.sizeof(_source.struct(f"vb.{n}")) for n in ("StatPartial", "RowFilter", "RaceDesc",
                                                                      "RacePartial"))


def verify_block_plan(B: int, N: int, V: int, sampling: bool, q_stats: bool, with_filters: bool, block: bool,
                      sizes: tuple[int, int, int, int] | None = None) -> dict[str, int]:
    stat_partial, row_filter, race_desc, race_partial = sizes or record_sizes()
    c, align = C(), C()["vb.kWorkspaceAlign"]
    T = N + B
    p = {"num_splits": ceil_div(V, c["vb.kStatsSplit"]), "num_race_splits": ceil_div(V, c["vb.kRaceSplit"]),
         "stat_rows": T + (N if q_stats else 0)}
    partials_bytes = align_up(p["stat_rows"] * p["num_splits"] * stat_partial, align)
    filter_bytes = align_up(p["stat_rows"] * row_filter, align) if with_filters else 0
    desc_bytes = align_up(B * race_desc, align)
    race_bytes = align_up(B * p["num_race_splits"] * race_partial, align) if sampling else 0
    z_bytes = align_up(T * 8, align) if block else 0
    p["partials"] = 0
    p["row_filter"] = partials_bytes
    p["desc"] = p["row_filter"] + filter_bytes
    p["race_partials"] = p["desc"] + desc_bytes
    p["z"] = p["race_partials"] + race_bytes
    p["bytes"] = p["z"] + z_bytes
    return p


def verify_tree_workspace_floats(B: int, V: int, sampling: bool) -> int:
    return B * V if sampling else 1


def align16(x: int) -> int:
    return (x + 15) & ~15


@functools.cache
def move_size() -> int:
    return ctypes.sizeof(_source.struct("kv.Move"))


def commit_plan(W: int, max_row: int, move: int | None = None) -> dict[str, int]:
    move = move_size() if move is None else move
    c = C()

    def smem(tile):
        return align16(W * move) + W * tile

    tile = max(16, min(align16(max_row), c["kv.kCommitMaxTile"]))
    while smem(tile) > c["kv.kDefaultSmem"] and tile > 16:
        tile = max(16, (tile // 2) & ~15)
    return {"tile": tile, "smem": smem(tile), "tiles": max(1, ceil_div(max_row, tile))}


def release_blocks(B: int) -> int:
    return ceil_div(B, C()["kv.kReleaseWarps"])


def state_tiles(row_bytes: int) -> int:
    return ceil_div(row_bytes, C()["kv.kStateTile"])
