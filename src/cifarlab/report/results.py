"""A sweep folder read back: its job folders (finished, failed or never finished) grouped into rows, one per
configuration of the grid, each holding its seeds; and which row is the baseline the others are compared with."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from cifarlab.errors import first_line
from cifarlab.run_folder import FAILED, FINISHED, RUNNING

# The documented model: what every row is compared with...
BASELINE = {"pool": "max", "activation": "none", "norm": "none", "dropout": "none"}
# ...except in an ablation (`ablate=...` is an axis), where each row takes one ingredient out of the recipe itself.
RECIPE = ("ablate", "none")
IGNORED_KEYS = ("seed", "hydra.", "launcher", "sweep", "threads", "hparams_search")


@dataclass
class Job:
    folder: Path
    key: tuple[tuple[str, str], ...] | None  # the overrides that place it in the grid, seed excluded; None: unreadable
    seed: int | None
    metrics: dict | None = None
    error: str | None = None
    choices: dict[str, str] = field(default_factory=dict)  # pool, activation, norm, dropout


@dataclass
class Row:
    key: tuple[tuple[str, str], ...]
    jobs: list[Job] = field(default_factory=list)

    @property
    def finished(self) -> list[Job]:
        """One finished job a seed: a seed run twice (the same configuration in two jobs) counts once, the later."""
        by_seed = {j.seed if j.seed is not None else j.folder.name: j for j in self.jobs if j.metrics}
        return list(by_seed.values())

    def values(self, name: str) -> list[float]:
        """A metric of the finished jobs, a diverged (non-finite) value left out."""
        values = (j.metrics.get(name) for j in self.finished)
        return [v for v in values if v is not None and math.isfinite(v)]

    def per_seed(self, name: str) -> dict[int, float]:
        """{seed: percent} of the finished jobs' accuracy; a non-finite value (a diverged metric) is left out."""
        values = {j.seed: j.metrics.get(name) for j in self.finished}
        return {s: 100 * v for s, v in values.items() if v is not None and math.isfinite(v)}

    def per_class(self) -> dict[str, float]:
        """{class: percent} test accuracy per class, the mean over the finished jobs that have it (metrics.json's
        test_acc_class); empty when none has."""
        seen = [j.metrics["test_acc_class"] for j in self.finished if j.metrics.get("test_acc_class")]
        return {c: 100 * statistics.fmean(m[c] for m in seen) for c in seen[0]} if seen else {}

    def mean(self, name: str) -> float:
        v = self.values(name)
        return statistics.fmean(v) if v else math.nan

    def std(self, name: str) -> float:
        v = self.values(name)
        return statistics.stdev(v) if len(v) > 1 else math.nan  # one seed says nothing about the spread

    @property
    def done(self) -> int:
        return len(self.finished)

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if not j.metrics]

    def is_documented_model(self) -> bool:
        choices = next((j.choices for j in self.jobs if j.choices), None)
        return choices is not None and all(choices.get(k) == v for k, v in BASELINE.items())

    def label(self) -> str:
        return " ".join(f"{short(k)}={readable(v)}" for k, v in self.key) or "(as configured)"

    @property
    def pruned_after(self) -> int | None:
        """A search trial that its pruner stopped: the epoch it stopped after (metrics.json); None otherwise."""
        return next((j.metrics.get("epochs") for j in self.finished if j.metrics.get("pruned")), None)


def readable(value: str) -> str:
    """A value sampled by a search (0.0020554062603827007) to 4 significant digits; anything else as given."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if "." in value and len(value) > 8 else value


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


NUMBERS = ("test_acc", "test_acc_no_tta", "best_val_acc", "epoch_s", "params", "epochs")  # what the report reads


def _metrics(folder: Path) -> dict:
    """metrics.json, checked for what the report reads from it: a damaged file raises ValueError naming the field."""
    metrics = json.loads((folder / FINISHED).read_text())
    if not isinstance(metrics, dict):
        raise ValueError(f"not a JSON object but {type(metrics).__name__}")
    for name in NUMBERS:
        value = metrics.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{name}: {value!r} is not a number")
    if not isinstance(metrics.get("choices", {}), dict) or not isinstance(metrics.get("overrides", []), list):
        raise ValueError("choices or overrides: not what cifarlab-train writes")
    return metrics


def read_job(folder: Path) -> Job | None:
    """A job folder: one with metrics.json (finished), failed.json (raised), or .hydra/ only (never finished). A file
    that cannot be read makes the job failed, with the file and what is wrong with it as its error; a job whose
    place in the grid cannot be read at all keeps the key None (the report lists it apart)."""
    if not (folder / ".hydra").is_dir():
        return None
    metrics, error = None, None
    if (folder / FINISHED).exists():
        try:
            metrics = _metrics(folder)
        except (OSError, ValueError) as e:  # json's decode error is a ValueError
            error = f"damaged {FINISHED}: {first_line(e)}"
    try:
        overrides = [str(o) for o in (metrics["overrides"] if metrics and "overrides" in metrics
                                      else OmegaConf.load(folder / ".hydra" / "overrides.yaml"))]
    except Exception as e:  # noqa: BLE001 - OmegaConf and YAML raise their own kinds; the job is damaged either way
        return Job(folder, None, None, None, error or f"damaged .hydra/overrides.yaml: {first_line(e)}")
    pairs = [_override(o) for o in overrides]
    try:
        seed = next((int(v) for k, v in pairs if k == "seed"), metrics.get("seed") if metrics else None)
    except ValueError:
        return Job(folder, None, None, None, f"damaged: seed is not a number in {overrides}")
    key = tuple((k, v) for k, v in pairs if not k.startswith(IGNORED_KEYS))  # in the grid's own axis order
    if metrics is None and error is None:
        error = _unfinished(folder)
    return Job(folder, key, seed, metrics, error, metrics.get("choices", {}) if metrics else choices_of(folder))


def _unfinished(folder: Path) -> str:
    """Why a job has no metrics.json: its failed.json, its lock (still running, or killed), or nothing at all."""
    try:
        if (folder / FAILED).exists():
            return str(json.loads((folder / FAILED).read_text())["error"])
        lock = folder / RUNNING
        return f"running, or killed ({lock.read_text().strip()})" if lock.exists() else "did not finish"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"damaged {FAILED}: {first_line(e)}"


def choices_of(folder: Path) -> dict[str, str]:
    """The layer choices of a job that did not finish, from the Hydra config it started with."""
    path = folder / ".hydra" / "hydra.yaml"
    try:
        choices = OmegaConf.to_container(OmegaConf.load(path).hydra.runtime.choices)
        return {k.removeprefix("model/"): v for k, v in choices.items() if k.startswith("model/")}
    except Exception:  # noqa: BLE001 - missing or damaged: the job's layer choices are unknown, nothing more
        return {}


def tested_checkpoints(jobs: list[Job]) -> str:
    """Which checkpoint the finished jobs' test figures score, in words (metrics.json's tested_checkpoint)."""
    kinds = {j.metrics.get("tested_checkpoint") for j in jobs if j.metrics}
    if kinds == {"last"}:
        return "last checkpoint (test_checkpoint=last: the weights training ended with)"
    if kinds == {"best", "last"}:
        return "best-validation or last checkpoint, as the job's test_checkpoint says"
    return "best-validation checkpoint"


def collect(sweep: Path) -> tuple[list[Row], list[Job]]:
    """The rows of the grid, and the jobs that cannot be placed in it (their overrides unreadable)."""
    found = [j for f in sorted(sweep.iterdir(), key=job_number) if f.is_dir() and (j := read_job(f))]
    if not found:
        raise SystemExit(f"error: {sweep}: no job folders (folders holding .hydra/) found")
    jobs = [j for j in found if j.key is not None]
    # Keep only the overrides that differ between jobs: those are the grid's axes, in the order the grid names them;
    # a job that did not set one (run by hand into the folder) holds the config's default there.
    keys = dict.fromkeys(k for j in jobs for k, _ in j.key)
    varying = [k for k in keys if len({dict(j.key).get(k) for j in jobs}) > 1]
    rows: dict[tuple, Row] = {}
    for j in jobs:
        j.key = tuple((k, dict(j.key).get(k, "(default)")) for k in varying)
        rows.setdefault(j.key, Row(j.key)).jobs.append(j)
    # A search's trials rank by what it maximised (val/acc): choosing by the test set would overstate the winner.
    rank_by = "best_val_acc" if any(j.metrics and "trial" in j.metrics for j in jobs) else "test_acc"
    ranked = sorted(rows.values(), key=lambda r: (-r.mean(rank_by) if r.values(rank_by) else math.inf, r.label()))
    return ranked, [j for j in found if j.key is None]


def levels(rows: list[Row], axis: str) -> list[str]:
    """The values an axis takes, in the order the grid ran them (not the report's ranking)."""
    in_grid_order = sorted(rows, key=lambda r: job_number(r.jobs[0].folder))
    return list(dict.fromkeys(dict(r.key)[axis] for r in in_grid_order))


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
