"""The sweep report's figures: each seed's accuracy with the mean and its interval per configuration, and for a
two-factor grid the heatmap of means with the cells that differ from the baseline marked (per class: per_class.py)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from cifarlab.report.results import Row, levels, short

COLOURS = {"better": "tab:green", "worse": "tab:red", "baseline": "tab:orange"}  # else grey: inconclusive
MARKS = {"better": "▲", "worse": "▼", "baseline": "base"}


def decision(s: dict) -> str:
    """better, worse or baseline (what colours and marks go by), without "; seeds disagree"; else ""."""
    return s["verdict"].split(";")[0]


def label(s: dict) -> str:
    """A row's name on the plot, with its verdict and, when inconclusive, the seeds a verdict would take."""
    if not s["verdict"]:
        return s["configuration"]
    more = f", {int(s['seeds_needed'])} seeds would tell" if math.isfinite(s["seeds_needed"]) else ""
    return f"{s['configuration']}  ({s['verdict']}{more})"


def seeds(rows: list[Row], summary: list[dict], path: Path) -> Path:
    """One line per configuration, best at the top: a dot per seed, the mean with its 95% interval, and the
    baseline's interval as a band across the plot."""
    # rows come best first, the plot draws upwards; a pruned search trial has no test accuracy to show
    shown = [(r, s) for r, s in zip(rows, summary) if r.per_seed("test_acc")][::-1]
    fig, ax = plt.subplots(figsize=(11, 1.3 + 0.45 * max(len(shown), 1)))
    for y, (r, s) in enumerate(shown):
        colour = COLOURS.get(decision(s), "tab:gray")
        accs = list(r.per_seed("test_acc").values())
        jitter = np.linspace(-0.15, 0.15, len(accs)) if len(accs) > 1 else [0.0]
        ax.scatter(accs, y + np.asarray(jitter), s=14, color=colour, alpha=0.5, linewidths=0)
        if not math.isnan(s["ci95_low"]):
            ax.errorbar(s["test_acc_mean"], y, xerr=[[s["test_acc_mean"] - s["ci95_low"]],
                                                      [s["ci95_high"] - s["test_acc_mean"]]],
                        fmt="none", ecolor=colour, elinewidth=2, capsize=4)
        ax.plot(s["test_acc_mean"], y, "D", color=colour, markersize=6)
        if s["baseline"]:
            if not math.isnan(s["ci95_low"]):
                ax.axvspan(s["ci95_low"], s["ci95_high"], color=COLOURS["baseline"], alpha=0.12, linewidth=0)
            ax.axvline(s["test_acc_mean"], color=COLOURS["baseline"], linestyle="--", linewidth=1)
    ax.set_yticks(range(len(shown)), [label(s) for _, s in shown])
    ax.set_xlabel("test accuracy %  (dots: seeds; ◆ and bar: mean and 95% interval; band: the baseline's)")
    ax.set_title(path.parent.name)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cells(rows: list[Row], summary: list[dict], grid_axes: list[str]) -> tuple[list, list, np.ndarray, dict]:
    """The heatmap's content: its row and column levels in grid order, the mean per cell, the mark per cell."""
    a, b = grid_axes
    xs, ys = levels(rows, b), levels(rows, a)
    grid = np.full((len(ys), len(xs)), np.nan)
    marks = {}
    for r, s in zip(rows, summary):
        cell = ys.index(dict(r.key)[a]), xs.index(dict(r.key)[b])
        if r.done:
            grid[cell] = s["test_acc_mean"]
        marks[cell] = MARKS.get(decision(s), "")
    return ys, xs, grid, marks


def heatmap(rows: list[Row], summary: list[dict], grid_axes: list[str], path: Path) -> Path:
    """Mean test accuracy per cell of a two-factor grid; ▲/▼ where the cell is better/worse than the baseline cell
    at the corrected level, `base` on the baseline cell."""
    a, b = grid_axes
    ys, xs, grid, marks = cells(rows, summary, grid_axes)
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.8 * len(ys) + 2))
    im = ax.imshow(grid, cmap="viridis")
    ax.set_xticks(range(len(xs)), xs, rotation=45, ha="right"), ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(short(b)), ax.set_ylabel(short(a))
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            text = f"{v:.1f}" + (f"\n{marks[i, j]}" if marks.get((i, j)) else "")
            ax.text(j, i, text, ha="center", va="center", color="w" if v < np.nanmean(grid) else "k", fontsize=8)
        if marks.get((i, j)):
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, linewidth=2,
                                       edgecolor=COLOURS[next(k for k, m in MARKS.items() if m == marks[i, j])]))
    fig.colorbar(im, ax=ax, label="test accuracy % (mean over seeds)")
    ax.set_title(f"{path.parent.name}: ▲/▼ better/worse than base (5 % over the cells compared)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
