"""A Lightning user's habits work here: their callbacks from the command line, the Trainer's own arguments, the
progress bar counting optimizer steps; and what every run reports as it goes (one line per epoch in train.log)."""

from __future__ import annotations

import json
import os
import re

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarlab import prepare, train
from conftest import REPO, compose_config, read_metrics, run_cli

pytestmark = pytest.mark.slow  # trains end to end through the command line: make test runs it, test-fast does not

# 1,000 training images of batch 100: 10 optimizer steps an epoch
SMALL = ["data=synthetic", "data.n_train=1100", "data.n_test=200", "data.val_size=100", "data.batch_size=100",
         "trainer.max_epochs=2"]


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_lightning_callbacks_from_the_command_line_work_at_the_defaults(tmp_path):
    """A LearningRateMonitor per step, an EMA of the weights and a ThroughputMonitor, added as a Lightning user adds
    them: each sees every optimizer step."""
    run_dir = tmp_path / "run"
    result = run_cli(*SMALL, "trainer.log_every_n_steps=1",
                     "+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor",
                     "+callbacks.lr.logging_interval=step",
                     "+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging",
                     "+callbacks.speed._target_=lightning.pytorch.callbacks.ThroughputMonitor",
                     "+callbacks.speed.batch_size_fn._target_=cifarlab.data.batches.images_in",
                     "+callbacks.speed.batch_size_fn._partial_=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(run_dir)
    steps = read_metrics(run_dir)["steps"]
    assert steps == 20
    (tag,) = [t for t in logged if t.startswith("lr-")]
    assert [s for s, _ in logged[tag]] == list(range(steps))  # one learning-rate point per optimizer step
    assert [v for _, v in logged[tag]] == [v for _, v in logged["train/lr"]]  # the rate each step used
    assert logged["train/samples"][-1][1] == steps * 100  # every image of every step counted, one step at a time
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert any("ema" in key.lower() for key in state["callbacks"]), list(state["callbacks"])  # the EMA's weights


def test_early_stopping_on_train_acc_from_the_command_line_stops_the_run(tmp_path):
    """Epoch metrics reach Lightning's callback_metrics: EarlyStopping can monitor train/acc as it can val/acc. At a
    learning rate of 1e-9 train/acc cannot gain 0.2 in an epoch, so patience 1 stops after the second epoch of 6."""
    run_dir = tmp_path / "run"
    result = run_cli(*SMALL, "trainer.max_epochs=6", "optimizer.lr=1e-9", "callbacks=plain",
                     "+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping",
                     "+callbacks.stop.monitor=train/acc", "+callbacks.stop.mode=max", "+callbacks.stop.patience=1",
                     "+callbacks.stop.min_delta=0.2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(run_dir)["epochs"] == 2
    assert [s for s, _ in scalars(run_dir)["train/acc"]] == [9, 19]  # once an epoch, at its last step


class ProgressTotal(L.Callback):
    def __init__(self):
        self.totals = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.totals.append((trainer.progress_bar_callback.total_train_batches, trainer.global_step))


def test_the_progress_bar_counts_the_epochs_optimizer_steps(tmp_path):
    probe = ProgressTotal()
    metrics = train.run(prepare.settle(compose_config(*SMALL, "threads=1")), tmp_path, extra_callbacks=[probe])
    assert metrics["steps"] == 20
    assert probe.totals == [(10, 10), (10, 20)]


# Test instrument, on PYTHONPATH when the process starts: counts CifarNet constructions, written at exit.
COUNT_MODELS = """
import atexit, os
from pathlib import Path
import cifarlab.model as m
count = [0]
init = m.CifarNet.__init__
def counting(self, *a, **k):
    count[0] += 1
    init(self, *a, **k)
m.CifarNet.__init__ = counting
atexit.register(lambda: Path(os.environ["COUNT_MODELS"]).write_text(str(count[0])))
"""


def test_a_run_builds_its_model_once(tmp_path, monkeypatch):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(COUNT_MODELS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "probe"), prepend=os.pathsep)
    monkeypatch.setenv("COUNT_MODELS", str(tmp_path / "count"))
    result = run_cli(*SMALL, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "count").read_text() == "1"  # checked, refused or trained: the same one model


EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+): train/loss (\d+\.\d{4}), val/loss (\d+\.\d{4}), val/acc (\d\.\d{4}), "
                        r"lr (\S+), (\d+\.\d) s$")


def test_each_epoch_writes_one_line_to_train_log_and_to_a_console_without_a_progress_bar(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*SMALL, "trainer.max_epochs=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # stdout: a pipe
    assert result.returncode == 0, result.stderr[-3000:]
    in_log = [EPOCH_LINE.search(line) for line in (run_dir / "train.log").read_text().splitlines()]
    lines = [m for m in in_log if m]
    assert [(int(m[1]), int(m[2])) for m in lines] == [(1, 3), (2, 3), (3, 3)]
    logged = scalars(run_dir)
    assert [float(m[5]) for m in lines] == [round(v, 4) for _, v in logged["val/acc"]]
    assert [float(m[7]) for m in lines] == [round(v, 1) for _, v in logged["time/epoch_s"]]
    on_console = [line for line in result.stdout.splitlines() if EPOCH_LINE.search(line)]
    assert len(on_console) == 3  # no terminal here: the progress bar draws nothing per epoch, so the lines show


def test_metrics_json_records_what_the_result_was_made_with(subset_run):
    import platform
    import subprocess
    from importlib.metadata import version

    metrics = read_metrics(subset_run[0])
    assert metrics["python"] == platform.python_version()
    for package in ("torch", "lightning", "hydra-core", "cifarlab"):
        assert metrics[package] == version(package), package
    assert metrics["device_name"] and metrics["device"] == "cpu"
    if (REPO / ".git").exists():  # run from this checkout: its commit, and whether it had uncommitted changes
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert metrics["git_commit"] == head.strip() and metrics["git_dirty"] in (True, False)
    else:
        assert metrics["git_commit"] is None and metrics["git_dirty"] is None
    assert json.loads(json.dumps(metrics)) == metrics
