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


def test_loop_tiny_quick(tmp_path, capsys):
    """The end-to-end loop on tiny untrained models: speculative vs AR on the same prompts (never trains)."""
    from dspark_kernels.bench.loop import LOOP_KEYS, SPLIT_COLS

    js, png = tmp_path / "loop.json", tmp_path / "loop.png"
    rc = main(["loop", "--model", "tiny", "--quick", "--json", str(js), "--plot", str(png), *FAST])
    assert rc == 0
    table = capsys.readouterr().out
    assert "loop · tiny γ=5" in table and "loop · tiny autoregressive" in table
    assert "identical" in table and "/".join(SPLIT_COLS) in table
    doc = json.loads(js.read_text())
    _check_doc(doc)
    cases = doc["cases"]
    assert all(c["status"] == "ok" for c in cases), cases
    for c in cases:
        for key in LOOP_KEYS:
            assert key in c, (key, c)
        assert c["op"] == "loop" and c["preset"] == c["model"] == "tiny" and c["vocab"] == 256
        assert c["batch"] == 2 and c["max_new_tokens"] == 32
        assert c["tokens"] == 2 * 32 and c["tokens_per_s"] > 0 and c["ar_tokens_per_s"] > 0
        assert c["tau"] == pytest.approx(c["tokens"] / c["steps"])
        assert sum(c["op_pct"].values()) >= 100.0 - 1e-6  # the regions and the host rest cover the run
        assert c["op_time_s"]["target forward"] > 0
    ar = [c for c in cases if c["mode"] == "autoregressive"]
    spec = [c for c in cases if c["mode"] != "autoregressive"]
    assert len(ar) == 1 and ar[0]["gamma"] == 0 and ar[0]["tau"] == pytest.approx(1.0)
    assert {(c["gamma"], c["mode"]) for c in spec} == {(5, "static"), (5, "dspark")}
    for c in spec:
        assert 1.0 <= c["tau"] <= c["gamma"] + 1
        assert c["ar_tokens_per_s"] == ar[0]["tokens_per_s"]
        assert c["speedup_vs_ar"] == pytest.approx(c["tokens_per_s"] / c["ar_tokens_per_s"])
        assert c["identical"] is True and c["correct"] is True  # greedy: lossless means token for token
        assert c["op_time_s"]["drafter forward"] > 0 and c["drafter_passes"] > 0
    assert any("schedule_verify_lens" in c["op_time_s"] for c in spec if c["mode"] == "dspark")
    if HAS_MATPLOTLIB:
        from matplotlib.image import imread

        image = imread(str(png))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    else:
        assert not png.exists()


def test_verify_tree_quick(tmp_path):
    """`verify --tree`: the tree (verify_tree), the chain of its node count and the chain of its depth, one run."""
    js = tmp_path / "tree.json"
    rc = main(["verify", "--quick", "--tree", "--gamma", "3", "--batch", "4", "--backend", "cpu", "reference",
               "--mode", "greedy", "sample-pointmass", "sample-draft-logits", "--json", str(js), *FAST])
    assert rc == 0
    doc = json.loads(js.read_text())
    _check_doc(doc)
    cases = doc["cases"]
    for mode in ("greedy", "sample-pointmass", "sample-draft-logits"):
        mine = [c for c in cases if c["mode"] == mode]
        groups = {c["group"] for c in mine}
        assert f"quick V=1000 γ=3 fp32 {mode}" in groups
        assert f"quick V=1000 γ=10 fp32 {mode} (chain of the tree's 10 nodes)" in groups
        tree = [c for c in mine if c["group"] == f"quick V=1000 γ=3 fp32 {mode} tree 2x2 (10 nodes)"]
        assert {c["backend"] for c in tree} == {"cpu", "reference"}
        for c in tree:
            assert c["status"] == "ok" and c["tree_nodes"] == 10 and c["tree_branches"] == [2, 2]
            assert "vs chain γ=3" in c["note"] and "chain γ=10" in c["note"], c["note"]
            assert 0 <= c["mean_accepted"] <= 3
        assert [c["correct"] for c in tree if c["backend"] == "cpu"] == [True]   # = the reference, bit for bit


def test_loop_tree_and_block_quick(tmp_path, capsys):
    """`loop --tree --method token block` on tiny models: greedy output identical to AR in every mode."""
    js = tmp_path / "loop.json"
    rc = main(["loop", "--model", "tiny", "--quick", "--tree", "--method", "token", "block", "--gamma", "3",
               "--tree-siblings", "top-k", "sample", "--max-new-tokens", "12", "--json", str(js), *FAST])
    assert rc == 0
    assert "tree 2x2" in capsys.readouterr().out
    doc = json.loads(js.read_text())
    _check_doc(doc)
    spec = [c for c in doc["cases"] if c["mode"] != "autoregressive"]
    assert {c["mode"] for c in spec} == {"static", "static block", "dspark", "dspark block", "static γ=10",
                                        "static γ=10 block", "tree 2x2", "tree 2x2 sample"}
    for c in spec:
        assert c["status"] == "ok" and c["identical"] is True and c["correct"] is True, c
        assert 1.0 <= c["tau"] <= c["gamma"] + 1
    tree = [c for c in spec if c["mode"] == "tree 2x2"][0]
    assert tree["tree_nodes"] == 10 and tree["gamma"] == 3 and tree["verify_method"] == "tree"
    assert tree["tree_siblings"] == "top-k"
    assert "verify_tree" in tree["op_time_s"] and "draft tree" in tree["op_time_s"]
    for what in ("chain γ=3 τ", "chain γ=3 block τ", "chain γ=10 τ", "chain γ=10 block τ"):
        assert what in tree["note"], tree["note"]
    assert {c["verify_method"] for c in spec} == {"token", "block", "tree"}


def test_loop_auto_never_trains(tmp_path, monkeypatch):
    """`all` runs loop with --model auto and --quick: the shipped trained models, else cached ones,
    else tiny ones (never training)."""
    from dspark_kernels.bench import loop
    from dspark_kernels.bench.__main__ import _defaults_for, build_parser
    from dspark_kernels.loop import train

    model, why = loop.resolve_model("auto")
    assert model == "trained" and "shipped" in why
    monkeypatch.setattr(train, "WEIGHTS_DIR", tmp_path / "no-weights")   # a package without weights
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))  # an empty cache
    model, why = loop.resolve_model("auto")
    assert model == "tiny" and "not cached" in why
    assert loop.resolve_model("tiny") == ("tiny", "tiny")
    parser, _ = build_parser()
    ns = _defaults_for(loop, parser.parse_args(["all", "--model", "tiny"]))
    assert ns.model == "tiny" and ns.quick is True
    ns = _defaults_for(loop, parser.parse_args(["all"]))
    assert ns.model == "auto" and ns.quick is True
