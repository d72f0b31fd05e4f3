"""scripts/score_slices.py: a finished run's best checkpoint scored again, on the whole test set and two slices."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, read_metrics, run_cli

SCRIPT = str(REPO / "scripts" / "score_slices.py")


def test_scores_a_run_as_it_was_tested_and_splits_the_test_set(tmp_path, subset_run, subset_root):
    run_dir, _, _ = subset_run
    out = tmp_path / "slices.json"
    result = subprocess.run([sys.executable, SCRIPT, "--split", "300", "--data-root", str(subset_root),
                             "--out", str(out), str(run_dir)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())["runs"]
    n_test = sum(row["n"])
    assert row["n"][0] == 300 and n_test == 1017  # the subset's test images
    # the same checkpoint, config and images as the run's own test: the same accuracy, to one image
    assert row["test_acc"] == pytest.approx(read_metrics(run_dir)["test_acc"], abs=1.01 / n_test)
    assert row["test_acc"] == pytest.approx((300 * row["first"] + 717 * row["rest"]) / n_test)
    assert f"| {run_dir} | {100 * row['test_acc']:.2f} | {100 * row['first']:.2f} |" in result.stdout


def test_refuses_a_folder_that_is_not_a_finished_run_and_a_split_outside_the_test_set(tmp_path, subset_run):
    result = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f"{tmp_path}: not a finished run folder" in result.stderr
    run_dir, _, _ = subset_run
    result = subprocess.run([sys.executable, SCRIPT, "--split", "5000", str(run_dir)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1 and "--split 5000: must be between 1 and 1016" in result.stderr


def test_scores_with_the_runs_test_time_views(tmp_path):
    """A run tested with flips and shifted views is re-scored with them (made-up data: seconds, not minutes)."""
    run_dir = tmp_path / "run"
    result = run_cli("data=synthetic", "data.noise=1.2", "trainer.max_epochs=1", "test_flips=true", "test_shift=1",
                     "callbacks=plain", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["test_acc"] != metrics["test_acc_no_tta"]  # the views change the figure, so ignoring them shows
    result = subprocess.run([sys.executable, SCRIPT, "--split", "100", str(run_dir)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"| {run_dir} | {100 * metrics['test_acc']:.2f} |" in result.stdout


def test_test_checkpoint_last_scores_the_final_weights_and_score_slices_follows(tmp_path):
    """test_checkpoint=last tests the weights training ended with (last.ckpt), not the best-val/acc checkpoint.

    callbacks.model_checkpoint.mode=min makes 'best' the epoch with the lowest val/acc (the first, on data learnt in
    a few steps), so the two checkpoints are different weights with different test figures."""
    run_dir = tmp_path / "run"
    result = run_cli("data=synthetic", "data.noise=1.2", "trainer.max_epochs=3", "test_checkpoint=last",
                     "callbacks=plain", "callbacks.model_checkpoint.mode=min", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["tested_checkpoint"] == "last" and metrics["best_checkpoint"] == "checkpoints/best.ckpt"
    scores = {}
    for which in ("best", "last", None):
        out = tmp_path / f"{which}.json"
        args = [sys.executable, SCRIPT, "--split", "100", "--out", str(out), str(run_dir)]
        result = subprocess.run(args + (["--checkpoint", which] if which else []), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        (row,) = json.loads(out.read_text())["runs"]
        scores[which] = (row["checkpoint"], row["test_acc"])
    n_test = 1000  # data=synthetic's test set
    assert scores["last"][0] == "last.ckpt" and scores["best"][0] == "best.ckpt"
    assert scores[None] == scores["last"]  # by default the checkpoint the run's own test scored
    assert metrics["test_acc"] == pytest.approx(scores["last"][1], abs=1.01 / n_test)
    assert abs(scores["best"][1] - scores["last"][1]) > 5 / n_test  # so testing the wrong one would show


def test_without_a_best_checkpoint_the_last_weights_are_tested_and_said_to_be(tmp_path):
    """~callbacks.model_checkpoint leaves only last.ckpt: test_checkpoint=best cannot be honoured, and the run says
    what it tested instead of passing last.ckpt off as the best one."""
    run_dir = tmp_path / "run"
    result = run_cli("data=synthetic", "trainer.max_epochs=1", "callbacks=plain", "~callbacks.model_checkpoint",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["tested_checkpoint"] == "last" and metrics["best_checkpoint"] is None
    assert metrics["best_val_acc"] is None
    assert "no checkpoint keeps the best val/acc" in (run_dir / "train.log").read_text()
    assert "(last checkpoint; best val/acc none kept," in result.stdout
