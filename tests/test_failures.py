"""What a user sees when something goes wrong that no check foresaw, or the data cannot be fetched: one line, a
non-zero exit, the trace in the run's train.log, and no folder left behind that passes for a run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import CLI, run_cli

pytestmark = pytest.mark.slow  # trains end to end through the command line: make test runs it, test-fast does not

TINY = ["data=synthetic", "data.n_train=600", "data.n_test=100", "trainer.max_epochs=1", "callbacks=plain"]
# Test instrument, found on PYTHONPATH when the process starts: the optimizer's step raises, as a bug deep inside
# training would. Nothing in cifarlab can foresee it.
FAULT = """
import torch
def broken_step(self, *args, **kwargs):
    raise RuntimeError("injected failure in the optimizer step\\nsecond line of the message")
torch.optim.AdamW.step = broken_step
"""


@pytest.fixture
def faulty_env(tmp_path, monkeypatch):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(FAULT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "probe"), prepend=os.pathsep)


def test_an_unforeseen_error_ends_in_one_line_naming_train_log_where_the_trace_is(tmp_path, faulty_env):
    run_dir = tmp_path / "run"
    result = run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: RuntimeError: injected failure in the optimizer step (full trace in "
                    f"{run_dir / 'train.log'})")
    assert "Traceback" not in result.stderr + result.stdout
    log = (run_dir / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "in broken_step" in log and "second line" in log


def test_hydra_full_error_shows_the_trace_on_the_terminal_as_well(tmp_path, faulty_env):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    import subprocess

    result = subprocess.run([str(CLI), *TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "injected failure" in result.stderr
    assert "Traceback (most recent call last)" in (run_dir / "train.log").read_text()


def test_a_failed_job_of_a_sweep_keeps_its_trace_and_the_sweep_says_so(tmp_path, faulty_env):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "model/pool=max,avg", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 1
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 2
    for job in jobs:
        failed = json.loads((job / "failed.json").read_text())
        assert failed["error"].startswith("RuntimeError: injected failure") and "broken_step" in failed["traceback"]
        assert "Traceback (most recent call last)" in (job / "train.log").read_text()
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: 2 of 2 jobs failed; why is in {jobs[0] / 'failed.json'}, {jobs[1] / 'failed.json'}; the same command "
        f"with hydra.sweep.dir='{sweep}' retries them and skips the rest")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once it is closed: the download fails at once


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_a_failed_download_is_refused_in_one_line_and_leaves_no_folder(tmp_path, sweep):
    data_root = tmp_path / "data"
    url = f"http://127.0.0.1:{closed_port()}/cifar-10-python.tar.gz"
    where = tmp_path / ("sweep" if sweep else "run")
    args = ["-m", "model/pool=max,avg", f"hydra.sweep.dir={where}"] if sweep else [f"hydra.run.dir={where}"]
    result = run_cli(*args, f"data.root={data_root}", f"data.url={url}", "trainer.max_epochs=1", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: CIFAR-10 not found (looked for {data_root}/cifar-10-batches-py/ and ")
    assert f"the download from {url} failed" in last and "Point data.root (or the CIFARLAB_DATA variable)" in last
    assert "Traceback" not in result.stderr
    assert not where.exists()  # no run (or sweep) folder that passes for a run
    assert not data_root.exists()  # nor an empty data folder
    assert not (tmp_path / "outputs").exists()


def test_an_error_from_submitits_own_requeue_is_a_requeue_not_a_failure():
    """On USR2 submitit runs `scontrol requeue`; when SLURM's stop kills that call first, the job must not record a
    failure (the next start would set its checkpoint aside and start over)."""
    from cifarlab.sweep import cluster

    def checkpoint_and_try_requeue():  # the name of submitit's handler, as the traceback shows it
        raise subprocess.CalledProcessError(-15, ["scontrol", "requeue", "9"])

    with pytest.raises(subprocess.CalledProcessError) as raced:
        checkpoint_and_try_requeue()
    assert cluster.requeue_raced(raced.value)
    with pytest.raises(subprocess.CalledProcessError) as other:
        subprocess.check_call([sys.executable, "-c", "raise SystemExit(3)"])
    assert not cluster.requeue_raced(other.value)
