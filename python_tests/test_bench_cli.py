"""The dspark-bench CLI on tiny CPU shapes: it runs, checks correctness, writes JSON and a plot.

No timing assertions: CI machines are small and shared.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_kernels.bench import subcommands
from dspark_kernels.bench.__main__ import main
from dspark_kernels.bench.report import CASE_KEYS, DOC_KEYS
from dspark_kernels.bench.verify import MODES

ROOT = Path(__file__).resolve().parents[1]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
FAST = ["--device", "cpu", "--quiet", "--max-time", "0.005", "--threads", "1"]


def _check_doc(doc: dict) -> None:
    for key in DOC_KEYS:
        assert key in doc, key
    assert doc["device"] == "cpu"
    assert doc["ceilings"]["cpu"]["GBps"] > 0
    assert doc["cases"], "no cases"
    for case in doc["cases"]:
        for key in CASE_KEYS:
            assert key in case, (key, case)
        assert case["status"] in ("ok", "skipped", "n/a", "error"), case
        assert case["status"] != "error", case
        assert case["correct"] is not False, case
        if case["status"] == "ok":
            assert case["median_s"] > 0 and case["p20_s"] <= case["median_s"] <= case["p80_s"]
            assert case["n"] >= 1 and case["bytes"] > 0 and case["GBps"] > 0
            assert case["pct_ceiling"] is not None
            if case["mean_accepted"] is not None:  # ops without an accept count (moe) leave it None
                assert 0 <= case["mean_accepted"] <= case["gamma"]


def test_verify_quick_json_and_plot(tmp_path):
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["verify", "--quick", "--json", str(js), "--plot", str(png), *FAST])
    assert rc == 0
    doc = json.loads(js.read_text())
    _check_doc(doc)
    cases = doc["cases"]
    assert {c["mode"] for c in cases} == set(MODES)
    assert {c["batch"] for c in cases} == {1, 4}
    assert {c["vocab"] for c in cases} == {1000}
    by_backend = {c["backend"] for c in cases}
    assert {"reference", "eager"} <= by_backend
    # the interpreter is not timed on CPU unless asked for, and the table says so
    assert all(c["status"] == "skipped" for c in cases if c["backend"] == "triton")
    timed = [c for c in cases if c["status"] == "ok"]
    assert any(c["backend"] == "eager" for c in timed) and any(c["backend"] == "reference" for c in timed)
    # own backends are checked against the reference; greedy eager must match exactly
    for c in timed:
        if c["backend"] == "cpu" or (c["backend"] == "eager" and c["mode"] == "greedy"):
            assert c["correct"] is True, c
        if c["backend"] == "eager":
            assert c["speedup_vs_eager"] == pytest.approx(1.0)
    if HAS_MATPLOTLIB:
        from matplotlib.image import imread

        image = imread(str(png))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    else:
        assert not png.exists()


def test_reference_cap_is_reported(tmp_path):
    js = tmp_path / "b.json"
    rc = main(["verify", "--vocab", "3000", "--batch", "2", "--gamma", "3", "--mode", "greedy",
               "--backend", "reference", "eager", "--reference-cap", "1000", "--json", str(js), *FAST])
    assert rc == 0
    cases = json.loads(js.read_text())["cases"]
    ref = [c for c in cases if c["backend"] == "reference"]
    assert ref and ref[0]["status"] == "skipped" and "reference too slow" in ref[0]["note"]
    eager = [c for c in cases if c["backend"] == "eager"][0]
    assert eager["status"] == "ok" and eager["speedup_vs_reference"] is None


def test_all_runs_every_subcommand(tmp_path):
    js = tmp_path / "all.json"
    assert main(["all", "--quick", "--json", str(js), *FAST]) == 0
    doc = json.loads(js.read_text())
    _check_doc(doc)
    assert {c["op"] for c in doc["cases"]} == set(subcommands())


def test_module_entry_point_and_results_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    help_out = subprocess.run([sys.executable, "-m", "dspark_kernels.bench", "--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0, help_out.stderr
    assert "verify" in help_out.stdout and "all" in help_out.stdout

    js = tmp_path / "run.json"
    run = subprocess.run([sys.executable, "-m", "dspark_kernels.bench", "verify", "--quick", "--mode", "greedy",
                          "--json", str(js), *FAST], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verify · quick V=1000" in run.stdout  # the plain-text table

    md = subprocess.run([sys.executable, str(ROOT / "bench" / "results_table.py"), str(js)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert md.returncode == 0, md.stderr
    assert "| verify |" in md.stdout and "cpu" in md.stdout


def test_commit_quick(tmp_path):
    """kv_commit bench: chains move no cache bytes, every backend's commit is checked."""
    js = tmp_path / "commit.json"
    assert main(["commit", "--quick", "--batch", "4", "--json", str(js), *FAST]) == 0
    doc = json.loads(js.read_text())
    _check_doc(doc)
    cases = doc["cases"]
    assert {c["mode"] for c in cases} == {"chain", "tree"}
    for c in cases:
        if c["status"] == "ok":
            assert c["correct"] is True, c
            assert (c["cache_bytes"] == 0) == (c["mode"] == "chain"), c
    assert any(c["backend"] == "eager" and c["status"] == "ok" for c in cases)
