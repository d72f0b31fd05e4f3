"""cifarlab-report: a sweep folder -> one row per configuration (mean +- std over seeds), a plot, and the same in
TensorBoard.

    cifarlab-report outputs/multirun/<date>/<time>
    cifarlab-report                                   # the newest sweep under outputs/multirun/

Writes report.md, report.csv and report.png into the sweep folder, and a TensorBoard run in <sweep>/report/ (the
table as text, the plot as an image), then prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from omegaconf import OmegaConf

from cifarlab.run_folder import FAILED, FINISHED, latest

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
        short = lambda k: k.split("/")[-1] if "/" in k else k.removeprefix("model.")  # noqa: E731
        return " ".join(f"{short(k)}={v}" for k, v in self.key) or "(as configured)"


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


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.2f}"


def _pct_spread(mean: float, std: float) -> str:
    """'84.86 ± 0.31' over several seeds; '84.86' alone for one seed (no ± 0.00 that would pass for a measurement)."""
    return _pct(mean) if math.isnan(std) and not math.isnan(mean) else f"{_pct(mean)} ± {_pct(std)}"


CSV_FIELDS = ["configuration", "test_acc_mean", "test_acc_std", "delta_vs_baseline", "test_acc_no_tta_mean",
              "best_val_acc_mean", "best_val_acc_std", "params", "epoch_s", "seeds", "failed"]


def baseline_row(rows: list[Row]) -> Row | None:
    """In an ablation sweep the row of `ablate=none`; otherwise the documented model's row, if the grid has one."""
    return next((r for r in rows if RECIPE in r.key), None) or next((r for r in rows if r.is_documented_model()), None)


def summarize(rows: list[Row]) -> list[dict]:
    """One dict of raw numbers per row (CSV_FIELDS, plus `baseline`): what the CSV holds and the table formats."""
    baseline = baseline_row(rows)
    out = []
    for r in rows:
        params = r.values("params")
        out.append({
            "configuration": r.label(),
            "baseline": r is baseline,
            "baseline_is": ("the recipe itself" if RECIPE in r.key else "documented model") if r is baseline else None,
            "test_acc_mean": r.mean("test_acc"),
            "test_acc_std": r.std("test_acc"),
            "delta_vs_baseline": r.mean("test_acc") - baseline.mean("test_acc") if baseline else math.nan,
            # runs with test-time views (test_flips, test_shift): the same checkpoints scored on the images alone
            "test_acc_no_tta_mean": r.mean("test_acc_no_tta"),
            "best_val_acc_mean": r.mean("best_val_acc"),
            "best_val_acc_std": r.std("best_val_acc"),
            "params": int(params[0]) if params else None,
            "epoch_s": r.mean("epoch_s"),
            "seeds": r.done,
            "failed": len(r.failed),
        })
    return out


def table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    tta = any(not math.isnan(s["test_acc_no_tta_mean"]) for s in summary)
    header = ["configuration", "test acc % (mean ± std)", "Δ vs baseline", *(["without test-time views"] if tta else []),
              "best val acc %", "params", "s/epoch", "seeds", "failed"]
    body = []
    for s in summary:
        delta = "baseline" if s["baseline"] else (
            "—" if math.isnan(s["delta_vs_baseline"]) else f"{100 * s['delta_vs_baseline']:+.2f}")
        body.append([
            s["configuration"] + (f" ({s['baseline_is']})" if s["baseline"] else ""),
            _pct_spread(s["test_acc_mean"], s["test_acc_std"]),
            delta,
            *([_pct(s["test_acc_no_tta_mean"])] if tta else []),
            _pct_spread(s["best_val_acc_mean"], s["best_val_acc_std"]),
            f"{s['params']:,}" if s["params"] is not None else "—",
            f"{s['epoch_s']:.2f}" if s["seeds"] else "—",
            str(s["seeds"]),
            str(s["failed"]),
        ])
    return header, body


def plot(rows: list[Row], path: Path) -> None:
    axes = [k for k, _ in rows[0].key] if rows and rows[0].key else []
    done = [r for r in rows if r.done]
    baseline = baseline_row(rows)
    if len(axes) == 2 and done:
        a, b = axes
        in_grid_order = sorted(rows, key=lambda r: job_number(r.jobs[0].folder))
        xs = list(dict.fromkeys(dict(r.key)[b] for r in in_grid_order))
        ys = list(dict.fromkeys(dict(r.key)[a] for r in in_grid_order))
        grid = np.full((len(ys), len(xs)), np.nan)
        for r in done:
            grid[ys.index(dict(r.key)[a]), xs.index(dict(r.key)[b])] = 100 * r.mean("test_acc")
        fig, ax = plt.subplots(figsize=(1.1 * len(xs) + 3, 0.8 * len(ys) + 2))
        im = ax.imshow(grid, cmap="viridis")
        ax.set_xticks(range(len(xs)), xs, rotation=45, ha="right"), ax.set_yticks(range(len(ys)), ys)
        ax.set_xlabel(b.split("/")[-1]), ax.set_ylabel(a.split("/")[-1])
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w" if v < np.nanmean(grid) else "k",
                        fontsize=8)
        fig.colorbar(im, ax=ax, label="test accuracy % (mean over seeds)")
    else:
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(done) + 2), 4.5))
        ax.bar(range(len(done)), [100 * r.mean("test_acc") for r in done],
               yerr=[100 * np.nan_to_num(r.std("test_acc")) for r in done], capsize=3,
               color=["tab:orange" if r is baseline else "tab:blue" for r in done])
        ax.set_xticks(range(len(done)), [r.label() for r in done], rotation=45, ha="right")
        ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    ax.set_title(path.parent.name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(sweep: Path, rows: list[Row], header: list[str], body: list[list[str]]) -> str:
    jobs = [j for r in rows for j in r.jobs]
    sources = sorted({j.metrics["data_source"] for j in jobs if j.metrics})
    epochs = sorted({j.metrics["epochs"] for j in jobs if j.metrics})
    lines = [
        f"# Sweep report: {sweep.name}",
        "",
        f"- folder: `{sweep}`",
        f"- data: {', '.join(f'`{s}`' for s in sources) or '—'}; epochs: {', '.join(map(str, epochs)) or '—'}",
        f"- jobs: {len(jobs)} ({sum(1 for j in jobs if j.metrics)} finished, "
        f"{sum(1 for j in jobs if not j.metrics)} failed or unfinished); rows sorted by mean test accuracy",
        f"- test accuracy is that of each job's {tested_checkpoints(jobs)}; ± is the standard deviation over seeds",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
        *("| " + " | ".join(row) + " |" for row in body),
    ]
    failed = [j for j in jobs if not j.metrics]
    if failed:
        lines += ["", "## Failed or unfinished jobs", ""]
        lines += [f"- `{j.folder.name}`: {j.error}" for j in failed]
    lines += ["", "![accuracy per configuration](report.png)", ""]
    return "\n".join(lines)


def write_tensorboard(sweep: Path, text: str, png: Path) -> None:
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(sweep / "report")) as writer:
        writer.add_text("sweep/report", text)
        writer.add_image("sweep/accuracy", np.asarray(Image.open(png).convert("RGB")), dataformats="HWC")


def report(sweep: Path) -> tuple[list[str], list[list[str]]]:
    """Write report.md, report.csv, report.png and the TensorBoard run; return the table (header, rows)."""
    rows = collect(sweep)
    summary = summarize(rows)
    header, body = table(summary)
    text = markdown(sweep, rows, header, body)
    (sweep / "report.md").write_text(text)
    with open(sweep / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary)
    plot(rows, sweep / "report.png")
    write_tensorboard(sweep, text, sweep / "report.png")
    return header, body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, nargs="?", help="the folder a -m run printed (default: the newest one under "
                   "outputs/multirun/)")
    args = p.parse_args()
    args.sweep = args.sweep or latest("multirun/*/*")
    if args.sweep is None:
        raise SystemExit("error: no sweep folder under outputs/multirun/; give the folder a -m run printed")
    if not args.sweep.is_dir():
        raise SystemExit(f"error: {args.sweep}: no such folder")
    header, body = report(args.sweep)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.sweep}  (test accuracy of the checkpoint each job tested, % over seeds)")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in body:
        t.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    print(f"wrote {args.sweep / 'report.md'}, report.csv, report.png and a TensorBoard run in {args.sweep / 'report'}")


if __name__ == "__main__":
    main()
