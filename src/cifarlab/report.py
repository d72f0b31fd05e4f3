"""cifarlab-report: a sweep folder -> one row per configuration with its interval over seeds, its difference from
the baseline and whether that difference is more than seed-to-seed noise; plots; the same in TensorBoard.

    cifarlab-report outputs/multirun/<date>/<time>
    cifarlab-report                                   # the newest sweep under outputs/multirun/
    cifarlab-report <sweep> --baseline "pool=avg"     # compare with another row than the documented model

Writes report.md, report.csv and report.png (heatmap.png too for a two-factor grid) into the sweep folder, and a
TensorBoard run in <sweep>/report/ (the table, the plots, and val/acc and val/loss bands over seeds), then prints the
table. The statistics are in stats.py.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

from cifarlab import report_board, report_plot, stats
from cifarlab.run_folder import latest
from cifarlab.sweep_results import RECIPE, Row, axes, baseline_row, collect, levels, short, tested_checkpoints

CSV_FIELDS = ["configuration", "test_acc_mean", "test_acc_std", "ci95_low", "ci95_high", "delta", "delta_ci95_low",
              "delta_ci95_high", "paired", "p_value", "p_holm", "verdict", "seeds_needed", "test_acc_no_tta_mean",
              "best_val_acc_mean", "best_val_acc_std", "params", "epoch_s", "seeds", "failed"]


def summarize(rows: list[Row], baseline: Row | None) -> list[dict]:
    """One dict per row (CSV_FIELDS, accuracies in percent, plus `baseline` and `baseline_is`): what the CSV holds
    and the table formats."""
    diffs = {id(r): stats.compare(r.per_seed("test_acc"), baseline.per_seed("test_acc"))
             for r in rows if baseline is not None and r is not baseline}
    tested = [r for r in rows if diffs.get(id(r)) is not None and not math.isnan(diffs[id(r)].p)]
    p_holm = dict(zip(map(id, tested), stats.holm([diffs[id(r)].p for r in tested])))
    out = []
    for r in rows:
        accs = list(r.per_seed("test_acc").values())  # what the tests compare: one value a seed
        d, ci = diffs.get(id(r)), stats.mean_interval(accs)
        params = r.values("params")
        s = {
            "configuration": r.label(),
            "baseline": r is baseline,
            "baseline_is": None if r is not baseline else (
                "the recipe itself" if RECIPE in r.key else "documented model" if r.is_documented_model() else
                "--baseline"),
            "test_acc_mean": statistics.fmean(accs) if accs else math.nan,
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else math.nan,
            "ci95_low": ci[0], "ci95_high": ci[1],
            "delta": d.delta if d else math.nan, "delta_ci95_low": d.low if d else math.nan,
            "delta_ci95_high": d.high if d else math.nan, "paired": d.paired if d else None,
            "p_value": d.p if d else math.nan, "p_holm": p_holm.get(id(r), math.nan),
            "verdict": "baseline" if r is baseline else stats.verdict(d, p_holm[id(r)]) if id(r) in p_holm else "",
            "seeds_needed": math.nan,
            # runs with test-time views (test_flips, test_shift): the same checkpoints scored on the images alone
            "test_acc_no_tta_mean": 100 * r.mean("test_acc_no_tta"),
            "best_val_acc_mean": 100 * r.mean("best_val_acc"), "best_val_acc_std": 100 * r.std("best_val_acc"),
            "params": int(params[0]) if params else None,
            "epoch_s": r.mean("epoch_s"),
            "seeds": len(accs),
            "failed": len(r.failed),
            "pruned_after": r.pruned_after,
        }
        if s["verdict"] == "not distinguishable":  # at the level the strictest Holm step asks of one row
            s["seeds_needed"] = stats.seeds_needed(d, stats.ALPHA / len(tested))
        out.append(s)
    return out


def csv_row(s: dict) -> dict:
    """Percentages to 4 decimals, p values to 4 significant digits, an empty cell where there is no number."""
    def cell(key: str, v):
        if v is None or isinstance(v, float) and math.isnan(v):
            return ""
        if isinstance(v, float) and math.isfinite(v):
            return float(f"{v:.4g}") if key.startswith("p_") else round(v, 4) + 0.0  # + 0.0: no "-0.0"
        return v  # inf (seeds needed: never), ints, strings
    return {k: cell(k, v) for k, v in s.items()}


def _num(x: float, fmt: str = ".2f") -> str:
    return "—" if x is None or math.isnan(x) else format(x, fmt)


def _interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if math.isnan(mean):
        return "—"
    if math.isnan(low):  # one seed: no interval, and no ± 0.00 that would pass for a measurement
        return format(mean, f"{sign}.2f")
    return f"{mean:{sign}.2f} [{low:{sign}.2f}, {high:{sign}.2f}]"


def _p(x: float) -> str:
    return "—" if math.isnan(x) else "<0.001" if x < 0.001 else f"{x:.3f}"


def _seeds(s: dict) -> str:
    x = s["seeds_needed"]
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "no difference" if s["delta"] == 0 else f">{stats.MAX_SEEDS}"
    return str(int(x))


def table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    tta = any(not math.isnan(s["test_acc_no_tta_mean"]) for s in summary)
    header = ["configuration", "test acc % [95% CI]", "Δ vs baseline [95% CI]", "p (Holm)", "verdict",
              "seeds needed", *(["without test-time views"] if tta else []), "best val acc %", "params", "s/epoch",
              "seeds", "failed"]
    body = []
    for s in summary:
        delta = "baseline" if s["baseline"] else _interval(s["delta"], s["delta_ci95_low"], s["delta_ci95_high"], True)
        body.append([
            s["configuration"] + (f" ({s['baseline_is']})" if s["baseline"] else "")
            + (f" (pruned after epoch {s['pruned_after']})" if s["pruned_after"] else ""),
            _interval(s["test_acc_mean"], s["ci95_low"], s["ci95_high"]),
            delta + ("" if s["paired"] is not False else " (unpaired)"),
            _p(s["p_holm"]),
            s["verdict"] if not s["baseline"] else "",
            _seeds(s),
            *([_num(s["test_acc_no_tta_mean"])] if tta else []),
            _num(s["best_val_acc_mean"]),
            f"{s['params']:,}" if s["params"] is not None else "—",
            _num(s["epoch_s"]) if s["seeds"] else "—",
            str(s["seeds"]),
            str(s["failed"]),
        ])
    return header, body


def explanation(summary: list[dict], baseline: Row | None) -> list[str]:
    """The three lines under the table: what the columns mean, or why they are empty."""
    more_seeds = "Run the same grid with more seeds (`seed=0,1,2,3,4` on the command line) to get intervals, p values "
    if any(s["configuration"].startswith("trial=") for s in summary):
        return ["Each row is one trial of an Optuna search, ranked by its best val acc (what the search maximised; "
                "ranking by test accuracy would overstate the winner). A pruned trial stopped after the epoch shown "
                "and scored no test set. To tell the best few apart from seed noise, run them again with "
                "`seed=0,1,2,3,4` as a sweep."]
    if max(s["seeds"] for s in summary) < 2:
        return [f"One seed per configuration: no test is possible. {more_seeds}and verdicts."]
    if baseline is None:
        return ["No baseline row (the documented model, or `ablate=none`) in this grid: pick one with "
                "`cifarlab-report <sweep> --baseline \"<configuration>\"` for Δ, p and verdicts."]
    tested = sum(1 for s in summary if not math.isnan(s["p_value"]))
    if tested == 0:
        return [f"The baseline has {baseline.done} finished seed(s), or no other row has two: no test is possible. "
                f"{more_seeds}and verdicts."]
    rows = f"{tested} row{'s' if tested > 1 else ''}"
    return [
        "- Accuracies in percent. Interval: 95% t-interval of the mean over seeds. Δ: row − baseline in points, "
        "paired by seed where both rows ran the same seeds (else Welch, marked unpaired), with its 95% t-interval.",
        f"- p: two-sided sign-flip test of the paired differences (label permutations when unpaired), exact up to "
        f"{stats.PERMUTATIONS:,} patterns, Holm-corrected over the {rows} compared; verdict: better or worse where that "
        f"p < {stats.ALPHA}. n paired seeds cannot give p below 2/2^n (0.0625 for 5), so a Δ whose interval excludes "
        "0 can still be not distinguishable.",
        f"- Seeds needed (rows not distinguishable): seeds per row for {stats.POWER:.0%} power to detect the observed "
        f"Δ at the observed spread (t-test power at {stats.ALPHA}/{tested}, and enough seeds for the exact test to "
        "reach that level).",
    ]


def main_effects(rows: list[Row]) -> dict[str, list[tuple[str, float, float, float, int, str]]]:
    """Two-factor grids: for each factor, each level's mean over the other factor's levels, seed by seed (over the
    seeds every cell that ran has, so a failed job does not tilt a level), then the mean and 95% interval of those
    per-seed means: [(level, mean, low, high, seeds, "cells that ran of all")] in the grid's order."""
    out = {}
    for axis in axes(rows):
        out[axis] = []
        for level in levels(rows, axis):
            cells = [r.per_seed("test_acc") for r in rows if dict(r.key)[axis] == level]
            ran = [c for c in cells if c]
            seeds = sorted(set.intersection(*(set(c) for c in ran))) if ran else []
            means = [statistics.fmean(c[s] for c in ran) for s in seeds]
            low, high = stats.mean_interval(means)
            out[axis].append((level, statistics.fmean(means) if means else math.nan, low, high, len(means),
                              f"{len(ran)} of {len(cells)}"))
    return out


def markdown(sweep: Path, rows: list[Row], summary: list[dict], baseline: Row | None) -> str:
    header, body = table(summary)
    jobs = [j for r in rows for j in r.jobs]
    sources = sorted({j.metrics["data_source"] for j in jobs if j.metrics})
    epochs = sorted({j.metrics["epochs"] for j in jobs if j.metrics})
    lines = [
        f"# Sweep report: {sweep.name}",
        "",
        f"- folder: `{sweep}`",
        f"- data: {', '.join(f'`{s}`' for s in sources) or '—'}; epochs: {', '.join(map(str, epochs)) or '—'}",
        f"- jobs: {len(jobs)} ({sum(1 for j in jobs if j.metrics)} finished, "
        f"{sum(1 for j in jobs if not j.metrics)} failed or unfinished); rows sorted by mean "
        f"{'best val' if any(s['configuration'].startswith('trial=') for s in summary) else 'test'} accuracy",
        f"- test accuracy is that of each job's {tested_checkpoints(jobs)}",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
        *("| " + " | ".join(row) + " |" for row in body),
        "",
        *explanation(summary, baseline),
    ]
    if len(axes(rows)) == 2:
        lines += ["", "## Main effects", "",
                  "Each level's mean over the other factor's levels that ran, seed by seed (the seeds they all have), "
                  "then over seeds, with its 95 % interval.",
                  ""]
        for axis, levels in main_effects(rows).items():
            lines += [f"| {short(axis)} | test acc % [95% CI] | seeds | cells that ran |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| {level} | {_interval(m, lo, hi)} | {n} | {cells} |" for level, m, lo, hi, n, cells in levels]
            lines += [""]
    failed = [j for j in jobs if not j.metrics]
    if failed:
        lines += ["", "## Failed or unfinished jobs", ""]
        lines += [f"- `{j.folder.name}`: {j.error}" for j in failed]
    lines += ["", "![accuracy per configuration](report.png)", ""]
    if len(axes(rows)) == 2:
        lines += ["![the grid](heatmap.png)", ""]
    return "\n".join(lines)


def report(sweep: Path, baseline_label: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Write report.md, report.csv, the plots and the TensorBoard run; return the table (header, rows)."""
    rows = collect(sweep)
    baseline = baseline_row(rows, baseline_label)
    summary = summarize(rows, baseline)
    text = markdown(sweep, rows, summary, baseline)
    (sweep / "report.md").write_text(text)
    with open(sweep / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(map(csv_row, summary))
    plots = [report_plot.seeds(rows, summary, sweep / "report.png")]
    if len(axes(rows)) == 2:
        plots.append(report_plot.heatmap(rows, summary, axes(rows), sweep / "heatmap.png"))
    plots += sorted(sweep.glob("search_*.png"))  # an Optuna search's own plots (search_plots.py)
    report_board.write(sweep, rows, text, plots)
    return table(summary)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, nargs="?", help="the folder a -m run printed (default: the newest one under "
                   "outputs/multirun/)")
    p.add_argument("--baseline", metavar="CONFIGURATION", help="the row every other is compared with, as the "
                   "report names it (e.g. \"pool=avg\"); default: the documented model, or ablate=none")
    args = p.parse_args()
    args.sweep = args.sweep or latest("multirun/*/*")
    if args.sweep is None:
        raise SystemExit("error: no sweep folder under outputs/multirun/; give the folder a -m run printed")
    if not args.sweep.is_dir():
        raise SystemExit(f"error: {args.sweep}: no such folder")
    header, body = report(args.sweep, args.baseline)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.sweep}  (test accuracy of the checkpoint each job tested, %; explained in report.md)")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in body:
        t.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    print(f"wrote {args.sweep / 'report.md'}, report.csv, the plots and a TensorBoard run in {args.sweep / 'report'}")


if __name__ == "__main__":
    main()
