#!/usr/bin/env python
"""What the inspection costs between epochs and at the end of a run, two checkouts side by side.

    git worktree add /tmp/before <commit>
    .venv/bin/python docs/results/inspection-png/probe.py --data-root ../shared/data/cifar10-subset /tmp/before/src src

Runs `cifarlab-train` (default callbacks, `+trainer.profiler=simple`, 3 epochs) with each checkout's src/ first on
PYTHONPATH, the checkouts alternating, and prints the median over the pairs of Lightning's SimpleProfiler mean for
the inspection hooks (ms a call), the run's wall time, and the bytes of image summaries in its event files.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOKS = {
    "pooling images, every epoch": "[Callback]PoolingImages.on_train_epoch_end",
    "pooling images, at the start": "[Callback]PoolingImages.on_train_start",
    "weight histograms, every epoch": "[Callback]WeightHistograms.on_train_epoch_end",
    "test-set figures, once": "[Callback]EvaluationFigures.on_test_epoch_end",
}
LAUNCH = "import sys; from cifarlab.cli import cli; sys.argv[0] = 'cifarlab-train'; cli()"


def profiled(stdout: str) -> dict[str, float]:
    """Action -> mean seconds a call, from SimpleProfiler's tables (the last table that has the action)."""
    means = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 5:
            try:
                means[cells[1]] = float(cells[2])
            except ValueError:
                pass
    return means


def image_bytes(run_dir: Path) -> int:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader  # as stored, not migrated

    return sum(len(v.image.encoded_image_string) for p in run_dir.glob("events.out.tfevents.*")
               for e in LegacyEventFileLoader(str(p)).Load() for v in e.summary.value if v.HasField("image"))


def run(src: Path, args: list[str], run_dir: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(src))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", LAUNCH, *args, f"hydra.run.dir={run_dir}"], env=env, cwd=run_dir.parent,
                         capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    means = profiled(out)
    row = {name: 1000 * means[action] for name, action in HOOKS.items()}
    return row | {"run wall s": wall, "image KiB": image_bytes(run_dir) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("srcs", nargs=2, type=Path, help="the before and after checkouts' src/ folders")
    a = p.parse_args()
    args = [f"data.root={Path(a.data_root).resolve()}", f"trainer.max_epochs={a.epochs}", "+trainer.profiler=simple"]
    rows: dict[Path, list[dict]] = {s: [] for s in a.srcs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.pairs):
            for j, src in enumerate(a.srcs if i % 2 == 0 else a.srcs[::-1]):
                rows[src].append(run(src.resolve(), args, Path(tmp) / f"p{i}_{j}"))
                print(f"pair {i}: {src}: {rows[src][-1]}", file=sys.stderr)
    before, after = ({k: statistics.median(r[k] for r in rows[s]) for k in rows[s][0]} for s in a.srcs)
    print(f"| median of {a.pairs} | {a.srcs[0]} | {a.srcs[1]} | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for k in before:
        unit = "" if k.endswith(("s", "KiB")) else " ms"
        print(f"| {k}{unit} | {before[k]:.1f} | {after[k]:.1f} | {after[k] / before[k]:.2f} |")


if __name__ == "__main__":
    main()
