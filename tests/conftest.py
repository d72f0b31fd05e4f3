"""Shared test set-up: compose the real configs, find the stand-in CIFAR-10 data, run the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cifarlab import schema

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
# The folder holding cifar10-subset/ and cifar10-full/ (official layout stand-ins). .ci/run sets it explicitly.
DATA_DIR = Path(os.environ.get("CIFARLAB_TEST_DATA", REPO.parent / "shared" / "data"))
CLI = Path(sys.executable).parent / "cifarlab-train"
schema.register()  # what cifarlab-train does before composing: the schema and the resolvers


# The suite runs in parallel (pytest-xdist, `-n auto --dist loadfile` in pyproject.toml): each file's tests in one
# worker, so a module's fixture (a training run read many ways) is made once. Most tests wait on a subprocess
# starting Lightning, on file I/O or on SLURM's jobs; a third worker on 2 cores made the suite slower, not faster.
MAX_WORKERS = 4  # each worker may train with torch's threads; more would only fight over the cores


def pytest_xdist_auto_num_workers(config) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("train", overrides=list(overrides))


def option_names(group: str) -> list[str]:
    """Every option of a config group, from the files on disk (a new YAML is tested without editing a test)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _data(name: str) -> Path:
    path = DATA_DIR / name
    if not (path / "cifar-10-batches-py").is_dir():
        pytest.skip(f"stand-in CIFAR-10 not found at {path} (set CIFARLAB_TEST_DATA to the folder holding {name}/)")
    return path


@pytest.fixture(scope="session")
def subset_root() -> Path:
    return _data("cifar10-subset")


@pytest.fixture(scope="session")
def full_root() -> Path:
    return _data("cifar10-full")


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


SUBSET_RUN_ARGS = ["trainer.max_epochs=4"]


@pytest.fixture(scope="session")
def subset_run(tmp_path_factory, subset_root, worker_id):
    """The default recipe and inspection set, 4 epochs (76 steps of 256 images) on the byte-exact subset.

    Shared by the training, TensorBoard and scoring tests: one real run, read many ways. Made once per session, not
    once per test worker: the first worker to need it trains it while holding a lock, and the others read its folder
    and its saved output (the pytest-xdist recipe for a session fixture made once). No test writes into it.
    """
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    work, saved = shared / "e2e", shared / "e2e.json"
    run_dir = work / "run"
    args = [f"data.root={subset_root}", *SUBSET_RUN_ARGS, f"hydra.run.dir={run_dir}"]
    with FileLock(str(shared / "e2e.lock")):
        if not saved.exists():
            work.mkdir()
            result = run_cli(*args, cwd=work)
            saved.write_text(json.dumps({"returncode": result.returncode, "stdout": result.stdout,
                                         "stderr": result.stderr}))
    result = subprocess.CompletedProcess([str(CLI), *args], **json.loads(saved.read_text()))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result, args


def get(url: str, body: dict | None = None) -> dict:
    """A TensorBoard server's JSON: GET, or POST with a JSON body (the HParams plugin's queries)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())
