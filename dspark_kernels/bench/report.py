"""Results of a benchmark run: environment, JSON writer, plain-text table, plot, progress.

A run's document (``--json PATH``, and ``bench/results/*.json`` with ``--record``)::

    {"device": "cpu" | "cuda", "cpu_name", "gpu_name", "torch", "triton", "python",
     "commit", "dirty", "date", "threads", "argv",
     "ceilings": {"cpu": {...GBps...}, "gpu": {...GBps...} | None},
     "cases": [ {"op", "group", "preset", "vocab", "batch", "gamma", "dtype", "mode",
                 "backend", "status", "note", "median_s", "p20_s", "p80_s", "n",
                 "method", "copies", "bytes", "bytes_lazy", "GBps", "pct_ceiling",
                 "speedup_vs_reference", "speedup_vs_eager", "mean_accepted",
                 "correct"}, ... ]}

``status`` is "ok" (timed), "skipped" (deliberately not run: too slow, not
meaningful), "n/a" (cannot run here) or "error"; ``note`` says why. Speed-ups are
``baseline_time / backend_time`` in the same run (None when the baseline was not
timed). Subcommands fill the op-specific keys; keys they do not use are None.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

CASE_KEYS = ("op", "group", "preset", "vocab", "batch", "gamma", "dtype", "mode", "backend", "status", "note",
             "median_s", "p20_s", "p80_s", "n", "method", "copies", "bytes", "bytes_lazy", "GBps", "pct_ceiling",
             "speedup_vs_reference", "speedup_vs_eager", "mean_accepted", "correct")
DOC_KEYS = ("device", "cpu_name", "gpu_name", "torch", "triton", "python", "commit", "date", "ceilings", "cases")


def new_case(**fields) -> dict:
    case = dict.fromkeys(CASE_KEYS)
    case.update(fields)
    return case


# --------------------------------------------------------------------------- environment


def repo_root() -> Path | None:
    """The checkout holding this package (None for an installed copy)."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "bench").is_dir() and (here / "dspark_kernels").is_dir() else None


def _git(*args: str) -> str | None:
    root = repo_root()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device.type,
        "cpu_name": cpu_name(),
        "gpu_name": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv[1:],
    }


# --------------------------------------------------------------------------- writers


def write_json(path: str | os.PathLike, doc: dict) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=_json_default)
        f.write("\n")
    return path


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def record(doc: dict) -> Path:
    """Write the run under bench/results/ (the checkout's, else ./bench/results)."""
    root = repo_root() or Path.cwd()
    hw = doc.get("gpu_name") if doc.get("device") == "cuda" else doc.get("cpu_name")
    slug = "".join(c if c.isalnum() else "-" for c in (hw or doc.get("device", "dev")).lower())
    slug = "-".join(p for p in slug.split("-") if p)[:40]
    stamp = doc["date"].replace(":", "").replace("-", "").replace("+0000", "Z")[:15]
    commit = (doc.get("commit") or "nocommit")[:9]
    return write_json(root / "bench" / "results" / f"{stamp}-{doc['device']}-{slug}-{commit}.json", doc)


# --------------------------------------------------------------------------- table


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def _fmt_spread(c: dict) -> str:
    if c.get("p20_s") is None:
        return "-"
    m = c["median_s"]
    return f"-{(m - c['p20_s']) / m * 100:.0f}/+{(c['p80_s'] - m) / m * 100:.0f}%" if m > 0 else "-"


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _render(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def format_table(cases: list[dict], ceilings: dict | None = None, custom: dict | None = None) -> str:
    """A plain-text table: one block per (op, group), rows per batch and backend.

    ``custom`` maps an op to ``(header, row_fn)`` for subcommands with columns of
    their own (``row_fn(case)`` returns the row's cells), e.g. ``loop``."""
    out: list[str] = []
    if ceilings:
        parts = [f"{k} {v['GBps']:.1f} GB/s ({v['kind']})" for k, v in ceilings.items() if v]
        out.append("copy-bandwidth ceilings: " + "; ".join(parts))
    groups: dict[tuple, list[dict]] = {}
    for c in cases:
        groups.setdefault((c.get("op"), c.get("group")), []).append(c)
    has_acc = any(c.get("mean_accepted") is not None for c in cases)
    header = ["B", "backend", "median", "p20/p80", "GB/s", "%ceil", "x ref", "x eager"]
    header += ["acc"] if has_acc else []
    header += ["check", "note"]
    for (op, group), items in groups.items():
        if custom and op in custom:
            own_header, row_fn = custom[op]
            out += ["", f"{op} · {group}", _render([row_fn(c) for c in items], list(own_header))]
            continue
        rows = []
        for c in items:
            ok = c.get("status") == "ok"
            check = {True: "ok", False: "MISMATCH", None: "-"}[c.get("correct")]
            row = [str(c.get("batch", "-")), str(c.get("backend")),
                   fmt_time(c.get("median_s")) if ok else c.get("status", "?"),
                   _fmt_spread(c) if ok else "",
                   _fmt(c.get("GBps"), ".1f") if ok else "",
                   _fmt(c.get("pct_ceiling"), ".1f", "%") if ok else "",
                   _fmt(c.get("speedup_vs_reference"), ".2f", "x") if ok else "",
                   _fmt(c.get("speedup_vs_eager"), ".2f", "x") if ok else ""]
            if has_acc:
                row.append(_fmt(c.get("mean_accepted"), ".2f"))
            row += [check, c.get("note") or ""]
            rows.append(row)
        out.append("")
        out.append(f"{op} · {group}")
        out.append(_render(rows, header))
    return "\n".join(out)


# --------------------------------------------------------------------------- plot


def plot(cases: list[dict], path: str | os.PathLike, custom: dict | None = None) -> str:
    """PNG: time and % of the copy ceiling against batch size, one line per backend.

    ``custom`` maps an op to ``fn(ax_left, ax_right, cases)`` that draws its groups' row instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib); {path} not written"
    groups: dict[tuple, list[dict]] = {}
    for c in cases:
        if c.get("status") == "ok" and c.get("median_s") is not None:
            groups.setdefault((c.get("op"), c.get("group")), []).append(c)
    n = max(1, len(groups))
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.8 * n + 0.6), squeeze=False)
    for row, ((op, group), items) in enumerate(groups.items()):
        ax_t, ax_p = axes[row]
        if custom and op in custom:
            custom[op](ax_t, ax_p, items)
            ax_t.set_title(f"{op} · {group}", fontsize=9)
            continue
        backends = list(dict.fromkeys(c["backend"] for c in items))
        for be in backends:
            pts = sorted((c["batch"], c["median_s"], c.get("pct_ceiling")) for c in items if c["backend"] == be)
            xs = [p[0] for p in pts]
            ax_t.plot(xs, [p[1] * 1e6 for p in pts], marker="o", label=be)
            if any(p[2] is not None for p in pts):
                ax_p.plot(xs, [p[2] if p[2] is not None else float("nan") for p in pts], marker="o", label=be)
        for ax in (ax_t, ax_p):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size B")
            ax.grid(True, alpha=0.3)
        ax_t.set_yscale("log")
        ax_t.set_ylabel("median time (µs)")
        ax_p.set_ylabel("% of copy ceiling")
        ax_t.set_title(f"{op} · {group}", fontsize=9)
        ax_p.set_title("bytes_min / time / measured copy GB/s", fontsize=9)
        ax_t.legend(fontsize=7)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no timed cases", ha="center", va="center")
    fig.tight_layout()
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"plot written: {path}"


# --------------------------------------------------------------------------- progress


class Progress:
    """tqdm on an interactive stderr when installed, else one counter line per step on stderr."""

    def __init__(self, total: int, desc: str, quiet: bool = False):
        self.total, self.desc, self.quiet, self.i = total, desc, quiet, 0
        self._bar = None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label: str) -> None:
        self.i += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        elif not self.quiet:
            print(f"[{self.desc} {self.i}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def add_speedups(cases: list[dict], baselines=("reference", "eager")) -> list[dict]:
    """Set ``speedup_vs_<b>`` = time of baseline backend ``b`` / the case's time on every
    timed case of one group (the same inputs in the same run); None without ``b``."""
    times = {c["backend"]: c["median_s"] for c in cases if c["status"] == "ok"}
    for c in cases:
        if c["status"] == "ok":
            for b in baselines:
                c[f"speedup_vs_{b}"] = times[b] / c["median_s"] if b in times else None
    return cases
