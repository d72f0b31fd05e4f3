"""scripts/recipe_trials.py: variants x seeds of experiment=best, each run's best and last checkpoints scored."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import REPO, read_metrics

pytestmark = pytest.mark.slow  # a tool (scripts/): ARGS="-m 'not slow'" leaves it out of make test


def test_runs_every_variant_and_seed_and_scores_both_checkpoints(tmp_path):
    out, runs = tmp_path / "trials.jsonl", tmp_path / "runs"
    # made-up data, one short epoch a run: seconds; at lr 0.05, since the recipe's 0.15, reached after a short warm-up,
    # sent one seed's loss to NaN on these images
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "recipe_trials.py"), "--data-root", str(tmp_path), "--out", str(out),
         "--runs", str(runs), "--seeds", "0-1", "--jobs", "2", "--extra",
         "data=synthetic data.n_train=800 data.n_test=500 trainer.max_epochs=1 optimizer.lr=0.05",
         "base", "ckbest=test_checkpoint=best,label_smoothing=0.0"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["name"], r["seed"]) for r in rows) == [("base", 0), ("base", 1), ("ckbest", 0), ("ckbest", 1)]
    n_test = 500  # data.n_test above
    for r in rows:
        assert r["rc"] == 0 and "error" not in r, r
        run_dir = runs / f"{r['name']}_s{r['seed']}"
        metrics = read_metrics(run_dir)
        assert metrics["seed"] == r["seed"] and metrics["data_source"] == "synthetic"
        # experiment=best tests its last checkpoint, the variant its best: the scorer agrees with each run's own test
        assert r["tested_checkpoint"] == metrics["tested_checkpoint"] == ("last" if r["name"] == "base" else "best")
        assert r["test_acc"] == pytest.approx(r[f"score_{r['tested_checkpoint']}"], abs=1.01 / n_test)
        assert 0 < r["score_best"] <= 1 and 0 < r["score_last"] <= 1
        assert OmegaConf.load(run_dir / "config.yaml").label_smoothing == (0.1 if r["name"] == "base" else 0.0)
    table = result.stdout[result.stdout.index("| variant |"):]
    for name in ("base", "ckbest"):
        cells = [c.strip() for c in next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
                 .strip("|").split("|")]
        mine = [r for r in rows if r["name"] == name]
        for column, key in ((3, "score_best"), (4, "score_last")):
            xs = [100 * r[key] for r in mine]
            assert cells[column] == f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}", (name, key)
        assert cells[1] == "2" and cells[2] == "0,1"


def test_summarize_counts_a_run_once_and_leaves_out_failed_and_stopped_ones(tmp_path):
    run = {"name": "a", "overrides": [], "rc": 0, "wall_s": 1.0}
    lines = [{**run, "seed": 0, "score_best": 0.80, "score_last": 0.81},
             {**run, "seed": 0, "score_best": 0.84, "score_last": 0.85},  # seed 0 again, appended later: this one
             {**run, "seed": 1, "score_best": 0.82, "score_last": 0.83},
             {**run, "seed": 2, "rc": 1, "error": "FileNotFoundError: metrics.json"},
             {**run, "seed": 3, "rc": -9, "error": "stopped at the deadline"}]
    out = tmp_path / "trials.jsonl"
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "recipe_trials.py"), "--summarize", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| a | 2 | 0,1 | 83.00 ± 1.41 | 84.00 ± 1.41 | +1.00 | 1 |" in result.stdout


def test_refuses_two_variants_of_one_name(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "recipe_trials.py"), "--data-root", ".", "--out",
                             str(tmp_path / "t.jsonl"), "a=seed=1", "a"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "two variants have the same name" in result.stderr
