"""The sweep report's view per class: each configuration's test accuracy per class, the mean over its seeds, against
the baseline's, as a table in report.md and a figure, so the classes a layer choice helps or hurts stand out.
Descriptive: no test is made per class."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from cifarlab.report.results import Row


def means(rows: list[Row]) -> list[tuple[Row, dict[str, float]]]:
    """The rows that recorded accuracy per class, each with its means over seeds (Row.per_class), read once."""
    return [(r, acc) for r in rows if (acc := r.per_class())]


def table(rows: list[Row], baseline: Row | None) -> list[str]:
    """report.md's section on test accuracy per class: the mean over seeds per configuration, and its difference from
    the baseline's, so the classes a layer choice helps or hurts stand out. Descriptive: no test per class."""
    shown = means(rows)
    if not shown:
        return []
    classes = list(shown[0][1])
    base = baseline.per_class() if baseline is not None else {}
    lines = ["", "## Test accuracy per class", "",
             "Mean over each configuration's seeds, in %" + (f"; in brackets the difference from `{baseline.label()}`"
                                                             if base else "") + ". No test is made per class.", "",
             "| configuration | " + " | ".join(classes) + " |", "| --- |" + " ---: |" * len(classes)]
    for r, acc in shown:
        cells = [f"{acc[c]:.1f}" + (f" ({acc[c] - base[c]:+.1f})" if base and r is not baseline and c in base else "")
                 if c in acc else "—" for c in classes]
        lines.append(f"| {r.label()}{' (base)' if r is baseline else ''} | " + " | ".join(cells) + " |")
    return lines


def figure(rows: list[Row], baseline: Row | None, path: Path) -> Path | None:
    """Test accuracy per class (columns) and configuration (rows, best first), the mean over seeds written in each
    cell; coloured by the difference from the baseline's cell (blue: the configuration helps that class, red: it
    hurts), or by the accuracy itself without a baseline. None when no job recorded accuracy per class."""
    shown = means(rows)
    if not shown:
        return None
    classes = list(shown[0][1])
    acc = np.array([[means_of.get(c, np.nan) for c in classes] for _, means_of in shown])
    base = baseline.per_class() if baseline is not None else {}
    fig, ax = plt.subplots(figsize=(1.0 * len(classes) + 4, 0.5 * len(shown) + 2))
    if base:
        delta = acc - np.array([base.get(c, np.nan) for c in classes])
        limit = max(float(np.nanmax(np.abs(delta))), 1.0)
        im = ax.imshow(delta, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        fig.colorbar(im, ax=ax, label=f"points against {baseline.label()}")
    else:
        delta = None
        im = ax.imshow(acc, cmap="viridis", aspect="auto")
        fig.colorbar(im, ax=ax, label="test accuracy % (mean over seeds)")
    for (i, j), v in np.ndenumerate(acc):
        if not np.isnan(v):
            text = f"{v:.1f}" if delta is None or shown[i][0] is baseline else f"{v:.1f}\n{delta[i, j]:+.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(shown)), [r.label() + ("  (base)" if r is baseline else "") for r, _ in shown])
    ax.set_title(f"{path.parent.name}: test accuracy % per class, mean over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
