"""The ``dspark-bench`` command: benchmarks of the dspark ops (docs/performance.md).

    dspark-bench verify [--preset NAME ...] [--batch B ...] [--quick] [--json PATH] [--plot PATH]
    dspark-bench all [--quick] [--json PATH] [--plot PATH] [--record]
    python -m dspark_kernels.bench ...

Adding a subcommand is one new module in this package that defines

    NAME = "myop"                       # the subcommand's name
    HELP = "one line for --help"
    def add_arguments(parser): ...      # its own flags (the common ones are already there)
    def run(args, ctx) -> list[dict]:   # the cases, built with report.new_case(...)

Optional, for a subcommand whose results need columns of their own (``loop``)::

    TABLE_HEADER = [...]; def table_row(case) -> list[str]   # its block of the table
    def plot_group(ax_left, ax_right, cases): ...            # its row of the plot
    ALL_DEFAULTS = {"quick": True}                           # what `all` overrides

Modules are found by ``subcommands()`` (any module here with ``NAME`` and ``run``);
``dspark-bench all`` runs each with its defaults (and ``ALL_DEFAULTS``). ``ctx`` is a ``BenchContext``:
the device, the measured copy ceilings, timing settings and a progress factory.
Infrastructure lives in ``timing`` (timers, ceilings), ``report`` (JSON, table,
plot, progress), ``presets`` and ``baselines``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .report import Progress

_INFRASTRUCTURE = {"__main__", "timing", "report", "presets", "baselines"}


def subcommands() -> dict[str, ModuleType]:
    """Every benchmark subcommand module of this package, by NAME (sorted)."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _INFRASTRUCTURE or info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "NAME") and callable(getattr(mod, "run", None)):
            found[mod.NAME] = mod
    return dict(sorted(found.items()))


@dataclass
class BenchContext:
    device: torch.device
    ceilings: dict = field(default_factory=dict)  # {"cpu": {...}, "gpu": {...} | None}
    repeat: int | None = None                     # fixed number of timed calls (None: adaptive)
    max_time: float = 1.0                         # seconds of timed calls per measurement
    graph: str = "auto"                           # CUDA graphs: auto | on | off
    quiet: bool = False

    def ceiling_GBps(self) -> float | None:
        c = self.ceilings.get("gpu" if self.device.type == "cuda" else "cpu")
        return c["GBps"] if c else None

    def progress(self, total: int, desc: str) -> Progress:
        return Progress(total, desc, self.quiet)


__all__ = ["BenchContext", "subcommands"]
