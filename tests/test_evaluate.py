"""cifarlab-eval: a run's checkpoint scored again, with and without test-time views, on any CIFAR-10 folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cifarlab import build
from cifarlab.evaluate import checkpoint_file, run_config, run_precision, score, views
from cifarlab.module import CifarModule
from conftest import compose_config, read_metrics, run_cli

pytestmark = pytest.mark.slow  # trains end to end through the command line: make test runs it, test-fast does not

EVAL = Path(sys.executable).parent / "cifarlab-eval"


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EVAL), *args], capture_output=True, text=True, timeout=600)


def test_scores_a_run_as_it_was_tested_and_never_overwrites_an_earlier_eval(subset_run, subset_root, tmp_path):
    run_dir, _, _ = subset_run
    result = evaluate(str(run_dir), f"data.root={subset_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = sorted(run_dir.glob("eval*.json"))
    assert evals, result.stdout
    report = json.loads(evals[-1].read_text())
    n_test = report["n_test"]
    assert n_test == 1017 and report["data_source"] == "cifar10-copy:cifar10-subset"
    # the same checkpoint, config and images as the run's own test: the same accuracy, to one image
    assert report["test_acc_no_tta"] == pytest.approx(read_metrics(run_dir)["test_acc"], abs=1.01 / n_test)
    assert report["views"] == {"flips": True, "shift": 1}  # the run had none: scored with views as well
    assert report["precision"] == read_metrics(run_dir)["precision"]  # bf16 autocast where the run tested in it
    assert Path(report["checkpoint"]).name == "best.ckpt" and len(report["per_class"]) == 10
    assert sum(report["per_class_no_tta"].values()) / 10 == pytest.approx(report["test_acc_no_tta"], abs=0.05)
    assert f"test/acc {report['test_acc']:.4f} with test-time views" in result.stdout
    before = {p: p.read_bytes() for p in run_dir.glob("eval*.json")}
    again = evaluate(str(run_dir), f"data.root={subset_root}", "--no-flips", "--shift", "0", "--checkpoint", "last")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.read_bytes() for p in before} == before  # kept as they were
    (new,) = set(run_dir.glob("eval*.json")) - set(before)
    latest = json.loads(new.read_text())
    assert latest["views"] == {"flips": False, "shift": 0} and latest["test_acc"] == latest["test_acc_no_tta"]
    assert Path(latest["checkpoint"]).name == "last.ckpt"


@pytest.mark.parametrize("make,args,message", [
    (None, [], "no such folder"),
    ("empty", [], "not a cifarlab run folder (no config.yaml)"),
    ("run", ["--checkpoint", "nowhere.ckpt"], "nowhere.ckpt: no such file"),
    ("run", ["model.hidden=3"], "cifarlab-eval takes data.root=<folder> only"),
    ("run", ["--shift", "9"], "--shift 9: must be an int in [0, 8]"),
])
def test_refusals_are_one_line(tmp_path, make, args, message):
    folder = tmp_path / "run"
    if make == "empty":
        folder.mkdir()
    elif make == "run":
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(), resolve=True))
    result = evaluate(str(folder), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("eval*.json"))


def test_a_run_with_test_time_views_is_scored_with_them_and_without(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("data=synthetic", "data.noise=1.2", "trainer.max_epochs=1", "test_flips=true", "test_shift=1",
                     "callbacks=plain", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["test_acc"] != metrics["test_acc_no_tta"]  # the views change the figure, so ignoring them shows
    cfg = run_config(run_dir, None)  # cifarlab-eval's own functions, in this process: the run's own views by default
    assert views(cfg, None, None) == (True, 1) and views(cfg, False, None) == (False, 1)
    own = OmegaConf.merge(cfg, {"test_shift": 0})  # a run with flips alone is scored with flips alone
    none = OmegaConf.merge(cfg, {"test_shift": 0, "test_flips": False})  # a run with no views: flips and 1 px
    assert views(own, None, None) == (True, 0) and views(none, None, None) == (True, 1)
    report = score(cfg, checkpoint_file(run_dir, None), *views(cfg, None, None), run_precision(run_dir, cfg))
    assert report["views"] == {"flips": True, "shift": 1} and report["data_source"] == "synthetic"
    n_test = report["n_test"]
    assert report["test_acc"] == pytest.approx(metrics["test_acc"], abs=1.01 / n_test)
    assert report["test_acc_no_tta"] == pytest.approx(metrics["test_acc_no_tta"], abs=1.01 / n_test)
    # A Lightning user's way back to the module: its settings come from the checkpoint, the network is given
    ckpt = checkpoint_file(run_dir, None)
    module = CifarModule.load_from_checkpoint(ckpt, model=build.network(cfg.model), optimizer=None)
    assert (module.test_flips, module.test_shift, module.memory_format) == (True, 1, torch.channels_last)
    weights = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())


def test_test_checkpoint_last_tests_the_final_weights_and_eval_follows(tmp_path):
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
    for which in ("best", "last", None):  # in this process: cifarlab-eval's own functions, without its start-up
        ckpt = checkpoint_file(run_dir, which)
        cfg = run_config(run_dir, None)
        scores[which] = (ckpt.name, score(cfg, ckpt, False, 0, run_precision(run_dir, cfg))["test_acc"])
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
