"""scripts/benchmark.py and scripts/time_to_accuracy.py in --quick mode: one process measures each method and writes
a well-formed JSON. Their speeds are not checked here (a few batches on a shared CPU mean nothing); docs/performance.md has the figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


def test_quick_benchmark_writes_a_table_and_a_json_with_every_method(tmp_path, subset_root):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick", "--data-root",
                             str(subset_root), "--out", str(out)], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith(("CPU: ", "NVIDIA")) and report["quick"] is True
    assert set(report["results"]) == {"bare", "cifarlab", "tutorial"}
    for name, r in report["results"].items():
        assert r["train_img_per_s"] > 0 and r["eval_img_per_s"] > 0 and r["peak_mem_mib"] > 0, name
        assert len(r["train_img_per_s_by_epoch"]) == report["epochs"] == 2
    assert report["results"]["tutorial"]["batch_size"] == 64
    assert report["results"]["bare"]["batch_size"] == report["results"]["cifarlab"]["batch_size"] == 256
    r = report["results"]
    assert report["ratios"]["cifarlab/bare"] == pytest.approx(r["cifarlab"]["train_img_per_s"] / r["bare"]["train_img_per_s"])
    assert report["ratios"]["cifarlab/tutorial"] == pytest.approx(
        r["cifarlab"]["train_img_per_s"] / r["tutorial"]["train_img_per_s"])
    for name in ("| bare |", "| cifarlab |", "| tutorial |", "cifarlab/bare = "):
        assert name in result.stdout
    assert report["precision"] == "32-true" and report["channels_last"] is True  # the default config, on a CPU


def test_quick_time_to_accuracy_times_the_tutorial_and_stops_cifarlab_at_the_target(tmp_path, subset_root):
    out = tmp_path / "tta.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "time_to_accuracy.py"), "--quick", "--data-root",
                             str(subset_root), "--out", str(out)], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    tutorial, cifarlab = report["tutorial"], report["cifarlab"]
    assert report["target_test_acc"] == tutorial["test_acc"] == tutorial["epochs"][-1]["test_acc"]
    assert [e["epoch"] for e in tutorial["epochs"]] == [1, 2]
    assert tutorial["wall_s"] == tutorial["epochs"][-1]["wall_s"] > tutorial["epochs"][0]["wall_s"] > 0
    walls = [e["wall_s"] for e in cifarlab["epochs"]]
    assert walls == sorted(walls) and walls[0] > 0
    accs = [e["test_acc"] for e in cifarlab["epochs"]]
    if cifarlab["reached"]:  # stopped at the first epoch that reached the target
        assert accs[-1] >= report["target_test_acc"] > max(accs[:-1], default=-1)
        assert cifarlab["epoch"] == len(accs) and cifarlab["wall_s"] == walls[-1]
        assert report["ratio_wall_s"] == pytest.approx(cifarlab["wall_s"] / tutorial["wall_s"])
    else:
        assert len(accs) == cifarlab["max_epochs"] and max(accs) < report["target_test_acc"]
        assert report["ratio_wall_s"] is None
