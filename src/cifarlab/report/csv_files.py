"""The sweep report's two CSV files, for anyone who wants the numbers rather than the table: report.csv, one line
per configuration (what report.md shows, unrounded), and jobs.csv, one line per job folder, from which the table can
be recomputed."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from cifarlab.run_folder import FAILED
from cifarlab.report.results import Job, Row, job_number

CSV_FIELDS = ["configuration", "seeds", "failed", "test_acc_mean", "test_acc_std", "ci95_low", "ci95_high", "delta",
              "delta_ci_low", "delta_ci_high", "delta_ci_level", "test", "pairs", "same_side", "p", "p_adjusted",
              "rows_compared", "verdict", "seeds_needed", "test_acc_no_tta_mean", "best_val_acc_mean",
              "best_val_acc_std", "params", "epoch_s"]
JOB_FIELDS = ["configuration", "seed", "status", "counted", "test_acc", "best_val_acc", "epochs", "epoch_s", "folder",
              "error"]


def jobs_table(rows: list[Row], unplaced: list[Job]) -> list[dict]:
    """jobs.csv: one line per job folder, so the table can be recomputed from it; `counted` marks the jobs whose
    values the table uses (a seed run twice counts once, the later)."""
    out = []
    for r in rows:
        counted = {id(j) for j in r.finished}
        for j in sorted(r.jobs, key=lambda j: job_number(j.folder)):
            m = j.metrics or {}
            status = ("finished" if j.metrics else "damaged" if j.error.startswith("damaged") else "running or killed"
                      if j.error.startswith("running") else "failed" if (j.folder / FAILED).exists() else "unfinished")
            out.append({"configuration": r.label(), "seed": j.seed, "status": status, "counted": int(id(j) in counted),
                        "test_acc": _percent(m.get("test_acc")), "best_val_acc": _percent(m.get("best_val_acc")),
                        "epochs": m.get("epochs"), "epoch_s": _round(m.get("epoch_s")), "folder": j.folder.name,
                        "error": j.error or ""})
    out += [{"configuration": "", "status": "damaged", "counted": 0, "folder": j.folder.name, "error": j.error}
            for j in unplaced]
    return out


def _percent(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 4)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def csv_row(s: dict) -> dict:
    """Percentages to 4 decimals, p values to 4 significant digits, an empty cell where there is no number."""
    def cell(key: str, v):
        if v is None or isinstance(v, float) and math.isnan(v):
            return ""
        if isinstance(v, float) and math.isfinite(v):
            return float(f"{v:.4g}") if key.startswith("p") else round(v, 4) + 0.0  # + 0.0: no "-0.0"
        return v  # inf (seeds needed: never), ints, strings
    return {k: cell(k, v) for k, v in s.items()}


def write(path: Path, fields: list[str], lines: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(lines)
