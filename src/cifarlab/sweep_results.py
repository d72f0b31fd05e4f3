"""A sweep folder read back: its job folders (finished, failed or never finished) grouped into rows, one per
configuration of the grid, each holding its seeds; and which row is the baseline the others are compared with."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from cifarlab.run_folder import FAILED, FINISHED

# The documented model: what every row is compared with...
BASELINE = {"pool": "max", "activation": "none", "norm": "none", "dropout": "none"}
# ...except in an ablation (`ablate=...` is an axis), where each row takes one ingredient out of the recipe itself.
RECIPE = ("ablate", "none")
IGNORED_KEYS = ("seed", "hydra.", "launcher", "sweep", "threads", "hparams_search")


@dataclass
class Job:
    folder: Path
    key: tuple[tuple[str, str], ...]  # the overrides that place it in the grid, seed excluded
    seed: int | None
    metrics: dict | None = None
    error: str | None = None


@dataclass
class Row:
    key: tuple[tuple[str, str], ...]
    jobs: list[Job] = field(default_factory=list)

    def values(self, name: str) -> list[float]:
        return [j.metrics[name] for j in self.jobs if j.metrics and j.metrics.get(name) is not None]

    def per_seed(self, name: str) -> dict[int, float]:
        """{seed: percent} of a finished job's accuracy; a seed run twice (a retried job) counts once."""
        return {j.seed: 100 * j.metrics[name] for j in self.jobs if j.metrics and j.metrics.get(name) is not None}

    def mean(self, name: str) -> float:
        v = self.values(name)
        return statistics.fmean(v) if v else math.nan

    def std(self, name: str) -> float:
        v = self.values(name)
        return statistics.stdev(v) if len(v) > 1 else math.nan  # one seed says nothing about the spread

    @property
    def done(self) -> int:
        return sum(1 for j in self.jobs if j.metrics)

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if not j.metrics]

    def is_documented_model(self) -> bool:
        choices = next((j.metrics["choices"] for j in self.jobs if j.metrics), None)
        return choices is not None and all(choices.get(k) == v for k, v in BASELINE.items())

    def label(self) -> str:
        return " ".join(f"{short(k)}={v}" for k, v in self.key) or "(as configured)"


def short(key: str) -> str:
    """model/pool -> pool, model.pool.kernel_size -> pool.kernel_size: how a grid axis is named in the report."""
    return key.split("/")[-1] if "/" in key else key.removeprefix("model.")


def _override(text: str) -> tuple[str, str]:
    key, _, value = text.lstrip("+~").partition("=")
    return key, value


def job_number(folder: Path) -> tuple[int, str]:
    """Sort key: the order the grid was run in ("10_..." after "2_...")."""
    head = folder.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, folder.name)


def read_job(folder: Path) -> Job | None:
    """A job folder: one with metrics.json (finished), failed.json (raised), or .hydra/ only (never finished)."""
    if not (folder / ".hydra").is_dir():
        return None
    metrics = json.loads((folder / FINISHED).read_text()) if (folder / FINISHED).exists() else None
    if metrics is not None:
        overrides = metrics.get("overrides", [])
    else:
        overrides = [str(o) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")]
    pairs = [_override(o) for o in overrides]
    seed = next((int(v) for k, v in pairs if k == "seed"), metrics.get("seed") if metrics else None)
    key = tuple((k, v) for k, v in pairs if not k.startswith(IGNORED_KEYS))  # in the grid's own axis order
    error = None
    if metrics is None:
        error = json.loads((folder / FAILED).read_text())["error"] if (folder / FAILED).exists() else "did not finish"
    return Job(folder, key, seed, metrics, error)


def tested_checkpoints(jobs: list[Job]) -> str:
    """Which checkpoint the finished jobs' test figures score, in words (metrics.json's tested_checkpoint)."""
    kinds = {j.metrics["tested_checkpoint"] for j in jobs if j.metrics}
    if kinds == {"last"}:
        return "last checkpoint (test_checkpoint=last: the weights training ended with)"
    if kinds == {"best", "last"}:
        return "best-validation or last checkpoint, as the job's test_checkpoint says"
    return "best-validation checkpoint"


def collect(sweep: Path) -> list[Row]:
    jobs = [j for f in sorted(sweep.iterdir(), key=job_number) if f.is_dir() and (j := read_job(f))]
    if not jobs:
        raise SystemExit(f"error: {sweep}: no job folders (folders holding .hydra/) found")
    # Keep only the overrides that differ between jobs: those are the grid's axes.
    keys = {k for j in jobs for k, _ in j.key}
    varying = {k for k in keys if len({dict(j.key).get(k) for j in jobs}) > 1}
    rows: dict[tuple, Row] = {}
    for j in jobs:
        j.key = tuple((k, v) for k, v in j.key if k in varying)
        rows.setdefault(j.key, Row(j.key)).jobs.append(j)
    return sorted(rows.values(), key=lambda r: (-r.mean("test_acc") if r.done else math.inf, r.label()))


def axes(rows: list[Row]) -> list[str]:
    return [k for k, _ in rows[0].key] if rows and rows[0].key else []


def baseline_row(rows: list[Row], label: str | None = None) -> Row | None:
    """The row named by --baseline; else in an ablation sweep the row of `ablate=none`; else the documented model's
    row, if the grid has one."""
    if label is not None:
        row = next((r for r in rows if r.label() == label), None)
        if row is None:
            raise SystemExit(f"error: --baseline {label!r}: no such row; the rows are (best first): "
                             + ", ".join(repr(r.label()) for r in rows))
        return row
    return next((r for r in rows if RECIPE in r.key), None) or next((r for r in rows if r.is_documented_model()), None)
