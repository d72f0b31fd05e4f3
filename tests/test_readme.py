"""README.md's quick start, command by command, as a newcomer runs it from a fresh clone: on the byte-exact subset,
training shortened to one epoch (and the sweep to one seed); everything else as written."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from cifarlab import board
from conftest import REPO

pytestmark = pytest.mark.slow  # trains end to end through the command line: make test runs it, test-fast does not

SHORTER = {"train": "trainer.max_epochs=1", "sweep": "seed=0 trainer.max_epochs=1"}
EPOCH_LINE = re.compile(r"^.*epoch \d+/1: train/loss \d+\.\d{4}, val/loss \d+\.\d{4}, val/acc \d\.\d{4}, lr \S+, "
                        r"\d+\.\d s$", re.M)


def quick_start() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- quick-start[^>]*-->\n```bash\n(.*?)```\n<!-- /quick-start -->", readme, re.S)
    assert block, "README.md lost its quick-start block"
    return [line.split("  #")[0].strip() for line in block[1].splitlines() if line.strip()]


@pytest.fixture
def clone(tmp_path) -> Path:
    """A folder laid out as a fresh clone for make: its Makefile and dependency files, and the .venv make built."""
    stamp = REPO / ".venv" / ".installed"
    assert stamp.exists() and all(stamp.stat().st_mtime >= (REPO / f).stat().st_mtime
                                  for f in ("pyproject.toml", "constraints.txt")), "run `make install` first"
    for name in ("Makefile", "pyproject.toml", "constraints.txt", ".venv"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def shortened(command: str) -> list[str]:
    words = shlex.split(command)
    if words[:2] == ["make", "train"]:
        args = next((w.split("=", 1)[1] for w in words if w.startswith("ARGS=")), "")
        words = [w for w in words if not w.startswith("ARGS=")]
        words.append(f"ARGS={args} {SHORTER['sweep' if args.startswith('-m') else 'train']}".strip())
    return words


def test_the_quick_start_works_as_written(clone, subset_root):
    commands = quick_start()
    assert commands[0] == "make train" and commands[-1] == "make test"
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "CIFARLAB_DATA": str(subset_root)}
    for command in commands[:-1]:  # make test: this is it
        if command == "make tensorboard":
            serve_and_stop(clone, env)
            continue
        result = subprocess.run(shortened(command), cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
        out = result.stdout
        if command.startswith("make train ARGS=\"-m"):
            assert re.search(r"^sweep: 4 jobs in outputs/multirun/\S+; the table: cifarlab-report", out, re.M), out
        elif command.startswith("make train"):
            assert len(EPOCH_LINE.findall(out)) == 1, out[-3000:]  # stdout is no terminal: the epoch lines show
            assert re.search(r"^test/acc 0\.\d{4} on cifar10-copy:cifar10-subset \(best checkpoint; best val/acc "
                             r"0\.\d{4}, [\d,]+ params, \d+\.\d s/epoch\)\nlogs: outputs/runs/\S+  \(TensorBoard: "
                             r"make tensorboard LOGDIR=outputs/runs/\S+\)$", out, re.M), out[-2000:]
        elif "cifarlab-report" in command:
            sweep = sorted((clone / "outputs" / "multirun").glob("*/*"))[-1]
            assert (sweep / "report.md").is_file() and "pool=avg" in out
        elif "cifarlab-eval" in command:
            assert re.search(r"test/acc 0\.\d{4} with test-time views .*; 0\.\d{4} on the images alone", out), out
    runs = sorted((clone / "outputs" / "runs").glob("*/*"))
    assert [r.name.split("_", 1)[1] for r in runs] == ["max-none-none-none", "avg-relu-none-none"]
    assert (runs[-1] / "eval.json").is_file()


def serve_and_stop(clone: Path, env: dict) -> None:
    proc = subprocess.Popen(["make", "tensorboard"], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "TensorBoard for outputs at http://127.0.0.1:" in line:
                break
        else:
            pytest.fail(f"make tensorboard printed no address (exit {proc.wait()})")
        url = line.split(" at ")[1].split()[0].rstrip("/")
        board.wait_until_up(url, proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
