"""Interrupted runs: a real kill -9 or Ctrl-C, then `cifarlab-train resume=<run folder>`, ends with the metrics and
the TensorBoard steps of a run that was never interrupted."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

from cifarlab import checkpoint, prepare, run_folder, train
from conftest import CLI, compose_config, read_metrics, run_cli

pytestmark = pytest.mark.slow  # trains end to end through the command line: make test runs it, test-fast does not

# Dropout and RReLU draw from the global RNG every step, so equal results need the RNG restored too. Logging every
# step makes the event file grow during an epoch, so a kill can be timed after events were written. bf16 autocast,
# as `auto` picks on a CPU that computes bf16 (and emulated on one that does not): exact resume must hold there too.
RUN = ["data=synthetic", "data.n_train=3000", "data.batch_size=128", "trainer.max_epochs=3",
       "trainer.log_every_n_steps=1", "model/dropout=dropout", "model/activation=rrelu", "model/pool=blurmax",
       "trainer.precision=bf16-mixed"]
TIMING = ("time/", "hparams/epoch_s")  # wall-clock figures: the only values allowed to differ


def logged(run_dir: Path) -> tuple[collections.Counter, dict]:
    """(tag, step) -> how many times it was logged, and scalar values, from every event file of the run."""
    counts, values = collections.Counter(), {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("graph_def"):
                counts[("graph", event.step)] += 1
            for v in event.summary.value:
                counts[(v.tag, event.step)] += 1
                if v.metadata.plugin_data.plugin_name == "scalars":
                    values[(v.tag, event.step)] = float(tensor_util.make_ndarray(v.tensor))
    return counts, values


def start(run_dir: Path | str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    # SIGINT as a terminal gives it, whatever this process inherited: a test suite started in the background (`nohup`,
    # `&`) ignores SIGINT, and a Python started with SIGINT ignored never turns it into KeyboardInterrupt.
    return subprocess.Popen([str(CLI), *RUN, f"hydra.run.dir={run_dir}"], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def events_size(run_dir: Path) -> int:
    return sum(p.stat().st_size for p in run_dir.glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(*RUN, f"hydra.run.dir={work / 'run'}", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


def assert_same_run(resumed: Path, reference: Path) -> None:
    got, want = read_metrics(resumed), read_metrics(reference)
    assert got["precision"] == want["precision"] == "bf16-mixed"
    for key in ("test_acc", "test_loss", "best_val_acc", "best_checkpoint", "epochs", "steps", "n_train", "choices"):
        assert got[key] == want[key], (key, got[key], want[key])
    assert got["resumed"] is True and want["resumed"] is False
    counts, values = logged(resumed)
    ref_counts, ref_values = logged(reference)
    # Every tag at every step as many times as in the run never interrupted (images, histograms and graph too):
    # nothing logged twice, nothing missing.
    assert counts == ref_counts, {k: (counts[k], ref_counts[k]) for k in counts | ref_counts if counts[k] != ref_counts[k]}
    differ = {k: (values[k], ref_values[k]) for k in ref_values if not k[0].startswith(TIMING) and values[k] != ref_values[k]}
    assert differ == {}


@pytest.mark.parametrize("moment", ["mid-epoch after a checkpoint", "before the first checkpoint"])
def test_a_run_killed_with_sigkill_resumes_to_the_same_metrics_and_steps(tmp_path, uninterrupted, moment):
    run_dir = tmp_path / "run"
    proc = start(run_dir, tmp_path)
    last = run_dir / "checkpoints" / checkpoint.LAST
    if moment == "before the first checkpoint":
        wait_for(lambda: any(b"train/loss" in p.read_bytes() for p in run_dir.glob("events.out.tfevents.*")), proc,
                 "a training step on disk")  # mid-epoch 1: training started, nothing checkpointed yet
    else:
        wait_for(last.exists, proc, "a checkpoint")
        size = events_size(run_dir)
        wait_for(lambda: events_size(run_dir) > size, proc, "events written after the checkpoint")
    assert not last.exists() if moment == "before the first checkpoint" else True
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists() and (run_dir / ".running").exists()  # died holding its folder

    record = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    result = run_cli(f"resume={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record  # Hydra's record untouched
    log = (run_dir / "train.log").read_text()
    if moment == "before the first checkpoint":
        assert "no checkpoint (stopped before its first epoch ended): starting it again" in log
    else:
        dropped = int(log.split(" TensorBoard events logged after that checkpoint dropped")[0].rsplit(" ", 1)[1])
        assert "continuing after epoch 1 (step 21) from checkpoints/last.ckpt" in log and dropped > 0
    assert_same_run(run_dir, uninterrupted)


def test_ctrl_c_flushes_says_how_to_resume_and_resumes(tmp_path, uninterrupted):
    """As a user types it: the run folder and resume= relative to where the command runs."""
    run_dir = tmp_path / "run"
    proc = start("run", tmp_path)
    last = run_dir / "checkpoints" / checkpoint.LAST
    wait_for(last.exists, proc, "a checkpoint")
    size = events_size(run_dir)
    wait_for(lambda: events_size(run_dir) > size, proc, "events written after the checkpoint")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    message = err.strip().splitlines()[-1]
    assert message == (f"interrupted in epoch 2 of 3; logs flushed, checkpoints/last.ckpt was written after epoch 1. "
                       f"Continue with: cifarlab-train resume={run_dir}")
    assert "Traceback" not in err
    assert not (run_dir / ".running").exists() and not (run_dir / "metrics.json").exists()
    counts, _ = logged(run_dir)  # flushed: the interrupted epoch's steps are on disk
    assert max(step for tag, step in counts if tag == "train/loss") >= 21  # epoch 2 began at step 21
    result = run_cli("resume=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(run_dir, uninterrupted)


def test_a_save_cut_short_leaves_the_previous_checkpoint_whole(tmp_path):
    class CutShort:  # pickling it fails after part of the file was written, as a kill during torch.save would
        def __reduce__(self):
            raise OSError("killed while saving")

    path = tmp_path / "last.ckpt"
    io = checkpoint.AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "epoch": 1}, path)
    with pytest.raises(OSError, match="killed while saving"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(10_000)}, "epoch": 2, "x": CutShort()}, path)
    assert io.load_checkpoint(path)["epoch"] == 1 and torch.equal(io.load_checkpoint(path)["state_dict"]["w"],
                                                                  torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left behind
    # A kill (not an exception) leaves the partial file; resuming removes it and keeps the checkpoint.
    leftover = path.with_name(f".{path.name}.partial-12345")  # as run_folder.atomic_write names it
    leftover.write_bytes(b"PK\x03\x04 half a zip")
    assert run_folder.remove_partial_writes(tmp_path) == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_learning_rate(tmp_path):
    result = run_cli("data=synthetic", "optimizer=sgd", "optimizer.lr=1e4", "scheduler=none", "callbacks=plain",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: train/loss became NaN or infinite at step "), message
    assert "(epoch 0), learning rate 1e+04 there; the learning rate is the likely cause: lower optimizer.lr" in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
    counts, _ = logged(tmp_path / "run")
    assert max((step for tag, step in counts if tag == "train/loss"), default=0) < 20  # stopped within one check


class CheckpointEpochs(L.Callback):
    """At the start of each epoch after the first: the epoch last.ckpt and best.ckpt were written after."""

    def __init__(self, folder: Path):
        self.folder, self.seen = folder, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch:
            epoch = lambda name: torch.load(self.folder / name, weights_only=True)["epoch"]  # noqa: E731
            self.seen.append((trainer.current_epoch, epoch(checkpoint.LAST), epoch("best.ckpt")))


def test_last_checkpoint_is_written_after_every_epoch_not_only_the_improving_ones(tmp_path):
    """resume= continues from last.ckpt, so it must hold the epoch just finished even when val/acc did not improve
    (Lightning's save_last alone writes it only alongside a new best checkpoint)."""
    # Learning rate 1e-12: the weights barely move, so val/acc never improves after the first epoch (by design, not by
    # the luck of a seed), and best.ckpt stays at epoch 0 while last.ckpt must move on.
    cfg = prepare.settle(compose_config("data=synthetic", "data.n_train=1200", "data.n_test=200", "data.val_size=200",
                                      "trainer.max_epochs=4", "callbacks=plain", "threads=1", "optimizer.lr=1e-12",
                                      "scheduler=none"))
    probe = CheckpointEpochs(tmp_path / "checkpoints")
    train.run(cfg, tmp_path, extra_callbacks=[probe])
    assert [(epoch - 1, epoch - 1) for epoch, _, _ in probe.seen] == [(last, epoch - 1) for epoch, last, _ in probe.seen]
    assert [best for _, _, best in probe.seen] == [0, 0, 0], probe.seen  # no epoch after the first improved val/acc
