"""scripts/benchmark.py --quick: one process measures bare, cifarlab and tutorial, and writes a well-formed JSON.
Its speeds are not checked here (a few batches on a shared CPU mean nothing); docs/performance.md has the figures."""

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
