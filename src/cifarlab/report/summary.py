"""cifarlab-report: a sweep folder -> one row per configuration with its interval over seeds, its difference from
the baseline and whether that difference is more than seed-to-seed noise; plots; the same in TensorBoard.

    cifarlab-report outputs/multirun/<date>/<time>
    cifarlab-report                                   # the newest sweep under outputs/multirun/
    cifarlab-report <sweep> --baseline "pool=avg"     # compare with another row than the documented model

Writes report.md, report.csv, jobs.csv (one line per job) and report.png (heatmap.png too for a two-factor grid) into the sweep folder, and a
TensorBoard run in <sweep>/report/ (the table, the plots, and val/acc and val/loss bands over seeds), then prints the
table. The statistics are in stats.py.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from cifarlab.report import board, csv_files, per_class, plot, stats
from cifarlab.sweep.seeds import RECORD
from cifarlab.run_folder import latest
from cifarlab.report.results import RECIPE, Job, Row, axes, baseline_row, collect, levels, short, tested_checkpoints


def summarize(rows: list[Row], baseline: Row | None, test: str = "t",
              alphas: dict[str, float] | None = None) -> list[dict]:
    """One dict per row (CSV_FIELDS, accuracies in percent, plus `baseline`, `baseline_is`, `paired`): what the CSV
    holds and the table formats. Every Δ is one of the m rows compared, at level 1 - α/m; α is alphas[row] where a
    seeds=auto sweep tested the row at its last look's share of α."""
    base = baseline.per_seed("test_acc") if baseline is not None else {}
    compared = [r for r in rows if r is not baseline and base and stats.testable(r.per_seed("test_acc"), base)]
    alpha = lambda r: (alphas or {}).get(r.label(), stats.ALPHA)  # noqa: E731
    diffs = {id(r): stats.compare(r.per_seed("test_acc"), base, max(len(compared), 1), test, alpha(r))
             for r in rows if baseline is not None and r is not baseline}
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
            "seeds": len(accs),
            "baseline_seeds": len(base),
            "failed": len(r.failed),
            "test_acc_mean": statistics.fmean(accs) if accs else math.nan,
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else math.nan,
            "ci95_low": ci[0], "ci95_high": ci[1],
            "delta": d.delta if d else math.nan,
            "delta_ci_low": d.low if d else math.nan, "delta_ci_high": d.high if d else math.nan,
            "delta_ci_level": d.level if d and d.tested else math.nan,
            "test": d.test if d else "", "paired": d.paired if d else None,
            "pairs": d.n if d and d.paired else None,
            "same_side": d.same_side if d else None,
            "p": d.p if d else math.nan, "p_adjusted": d.p_adjusted if d else math.nan,
            "rows_compared": len(compared) if d and d.tested else None,
            "verdict": "baseline" if r is baseline else d.verdict if d else "",
            "seeds_needed": math.nan,
            # runs with test-time views (test_flips, test_shift): the same checkpoints scored on the images alone
            "test_acc_no_tta_mean": 100 * r.mean("test_acc_no_tta"),
            "best_val_acc_mean": 100 * r.mean("best_val_acc"), "best_val_acc_std": 100 * r.std("best_val_acc"),
            "params": int(params[0]) if params else None,
            "epoch_s": r.mean("epoch_s"),
            "pruned_after": r.pruned_after,
        }
        if s["verdict"] == stats.INCONCLUSIVE:  # at the level each row is tested at
            s["seeds_needed"] = stats.seeds_needed(d, 1 - d.level, exact=test == "exact")
        out.append(s)
    return out


def _num(x: float, fmt: str = ".2f") -> str:
    return "—" if x is None or math.isnan(x) else format(x, fmt)


def bound(x: float, signed: bool = False) -> str:
    """A number to 2 decimals, with more where 2 would round a non-zero value to 0.00: a printed interval excludes 0
    exactly when the computed one does."""
    digits = 2
    while x != 0 and round(x, digits) == 0 and digits < 15:
        digits += 1
    return format(x + 0.0, f"{'+' if signed else ''}.{digits}f")


def _interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return "—"
    if math.isnan(low):  # one seed: no interval, and no ± 0.00 that would pass for a measurement
        return bound(mean, signed)
    return f"{bound(mean, signed)} [{bound(low, signed)}, {bound(high, signed)}]"


def _p(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1e}" if x < 0.001 else f"{x:.3f}"


def _seeds(s: dict) -> str:
    x = s["seeds_needed"]
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "no difference" if s["delta"] == 0 else f">{stats.MAX_SEEDS}"
    return str(int(x))


def level_words(summary: list[dict]) -> str:
    """The level of the Δ intervals and the rows it is adjusted for: "98.3 % CI, 3 rows"."""
    tested = next((s for s in summary if s["rows_compared"]), None)
    if tested is None:
        return f"{stats.LEVEL:.0%} CI"
    m = tested["rows_compared"]
    if len({s["delta_ci_level"] for s in summary if s["rows_compared"]}) > 1:  # seeds=auto: each row's own look
        return f"CI at the level of each row's last look, {m} rows"
    return f"{100 * tested['delta_ci_level']:.3g} % CI, {m} row{'s' if m > 1 else ''}"


def table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    tta = any(not math.isnan(s["test_acc_no_tta_mean"]) for s in summary)
    header = ["configuration", "test acc % [95% CI]", f"Δ vs baseline [{level_words(summary)}]", "same side",
              "p (adjusted)", "verdict", "seeds needed", *(["without test-time views"] if tta else []),
              "best val acc %", "params", "s/epoch", "seeds", "failed"]
    body = []
    for s in summary:
        delta = "baseline" if s["baseline"] else _interval(s["delta"], s["delta_ci_low"], s["delta_ci_high"], True)
        if s["paired"] is False and s["test"]:
            delta += " (unpaired)"
        elif s["pairs"] is not None and s["pairs"] < max(s["seeds"], s["baseline_seeds"]):
            delta += f" ({s['pairs']} pairs)"  # a job lost on one side: paired on the seeds both rows have
        body.append([
            s["configuration"] + (f" ({s['baseline_is']})" if s["baseline"] else "")
            + (f" (pruned after epoch {s['pruned_after']})" if s["pruned_after"] else ""),
            _interval(s["test_acc_mean"], s["ci95_low"], s["ci95_high"]),
            delta,
            f"{s['same_side']}/{s['pairs']}" if s["same_side"] is not None and s["test"] else "",
            _p(s["p_adjusted"]),
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


def explanation(summary: list[dict], baseline: Row | None, test: str = "t") -> list[str]:
    """The lines under the table: what the columns mean, or why they are empty."""
    more_seeds = "Run the same grid with more seeds (`seed=0,1,2,3,4` on the command line) to get intervals, p values "
    if not summary:
        return ["No job of this sweep could be read: each is named below with what is wrong with it."]
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
    tested = next((s["rows_compared"] for s in summary if s["rows_compared"]), 0)
    if tested == 0:
        return [f"The baseline has {baseline.done} finished seed(s), or no other row has two: no test is possible. "
                f"{more_seeds}and verdicts."]
    level = f"{100 * (1 - stats.ALPHA / tested):.3g} %"
    rows = f"{tested} row{'s' if tested > 1 else ''}"
    lines = [
        "- Accuracies in percent. Test acc: the mean over seeds with its 95 % t-interval. Δ: row − baseline in points, "
        "paired on the seeds both rows ran (a lost job costs one pair; `(n pairs)` says when not all seeds pair), "
        "Welch's unpaired difference when fewer than two seeds are shared (marked unpaired).",
    ]
    if test == "t":
        lines += [
            f"- Verdict: `better` or `worse` where the Δ interval excludes 0. The intervals are at {level}, "
            f"{stats.ALPHA:.0%} divided among the {rows} compared (Bonferroni), so that all of them hold together "
            f"with 95 % confidence; p: the paired t-test (Welch's when unpaired) of the same t distribution, times "
            f"{tested} (capped at 1), below {stats.ALPHA} exactly when the interval excludes 0.",
        ]
    else:
        lines += [
            f"- Verdict (`--test exact`): `better` or `worse` where p < {stats.ALPHA}; p: the exact two-sided sign-flip "
            f"test of the paired differences (label permutations when unpaired), exact up to {stats.PERMUTATIONS:,} "
            f"patterns, times {tested} (Bonferroni). The Δ interval is the t-interval at {level}: n paired seeds "
            "cannot give the exact test a p below 2/2^n (0.0625 for 5), so it can stay inconclusive while that "
            "interval excludes 0.",
        ]
    lines += [
        "- Same side: how many paired seeds fall on Δ's side of 0; a decided row whose seeds do not all agree says "
        "`seeds disagree`.",
        f"- Seeds needed (inconclusive rows): seeds per row with which the same test would detect the observed Δ at "
        f"the observed spread with {stats.POWER:.0%} power at its level.",
    ]
    return lines


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


def markdown(sweep: Path, rows: list[Row], unplaced: list[Job], summary: list[dict], baseline: Row | None,
             test: str = "t") -> str:
    header, body = table(summary)
    jobs = [j for r in rows for j in r.jobs]
    sources = sorted({str(j.metrics.get("data_source")) for j in jobs if j.metrics})
    epochs = sorted({str(j.metrics.get("epochs")) for j in jobs if j.metrics})
    lines = [
        f"# Sweep report: {sweep.name}",
        "",
        f"- folder: `{sweep}`",
        f"- data: {', '.join(f'`{s}`' for s in sources) or '—'}; epochs: {', '.join(epochs) or '—'}",
        f"- jobs: {len(jobs) + len(unplaced)} ({sum(1 for j in jobs if j.metrics)} finished, "
        f"{sum(1 for j in jobs if not j.metrics) + len(unplaced)} failed, damaged or unfinished); one line per job in "
        f"jobs.csv; rows sorted by mean "
        f"{'best val' if any(s['configuration'].startswith('trial=') for s in summary) else 'test'} accuracy",
        f"- test accuracy is that of each job's {tested_checkpoints(jobs)}",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
        *("| " + " | ".join(row) + " |" for row in body),
        "",
        *explanation(summary, baseline, test),
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
    lines += sequential(sweep)
    classes = per_class.table(rows, baseline)
    lines += classes
    failed = [j for j in jobs if not j.metrics] + unplaced
    if failed:
        lines += ["", "## Failed, damaged or unfinished jobs", ""]
        lines += [f"- `{j.folder.name}`: {j.error}" for j in failed]
    lines += ["", "![accuracy per configuration](report.png)", ""]
    if classes:
        lines += ["![accuracy per class](per_class.png)", ""]
    if len(axes(rows)) == 2:
        lines += ["![the grid](heatmap.png)", ""]
    return "\n".join(lines)


def seeds_record(sweep: Path) -> dict | None:
    """What a seeds=auto sweep recorded (sweep/seeds.py): its plan, and why each row stopped."""
    path = sweep / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def sequential(sweep: Path) -> list[str]:
    """report.md's section on a seeds=auto sweep: its looks, its level, and each row's seeds and why it stopped."""
    record = seeds_record(sweep)
    if record is None:
        return []
    looks = ", ".join(f"{n} seeds (α {a:.3g})" for n, a in record["looks"].items())
    lines = ["", "## Seeds until decided (seeds=auto)", "",
             f"Looks at {looks}: α = {record['alpha']} split over the looks, half at the last. At each look every "
             f"undecided row was tested against `{record['baseline']}` at that look's α, Bonferroni over the rows; a "
             "row's Δ interval above is at the level of the look it stopped at. A decided row got no more seeds.",
             "", "| row | seeds | stopped |", "| --- | ---: | --- |"]
    lines += [f"| {row} | {r['seeds']} | {r['stopped'] or 'not yet (the sweep did not finish)'} |"
              for row, r in record["rows"].items()]
    return lines


def report(sweep: Path, baseline_label: str | None = None, test: str = "t") -> tuple[list[str], list[list[str]]]:
    """Write report.md, report.csv, jobs.csv, the plots and the TensorBoard run; return the table (header, rows)."""
    rows, unplaced = collect(sweep)
    for job in [j for r in rows for j in r.jobs if j.error and j.error.startswith("damaged")] + unplaced:
        print(f"warning: {job.folder}: {job.error}; reported as failed", file=sys.stderr)
    record = seeds_record(sweep)
    if record is not None and baseline_label is None:
        baseline_label = record["baseline"]  # the row the sweep's looks compared with
    baseline = baseline_row(rows, baseline_label)
    summary = summarize(rows, baseline, test, {r: v["alpha"] for r, v in record["rows"].items()} if record else None)
    text = markdown(sweep, rows, unplaced, summary, baseline, test)
    (sweep / "report.md").write_text(text)
    csv_files.write(sweep / "report.csv", csv_files.CSV_FIELDS, [csv_files.csv_row(s) for s in summary])
    csv_files.write(sweep / "jobs.csv", csv_files.JOB_FIELDS, csv_files.jobs_table(rows, unplaced))
    plots = [plot.seeds(rows, summary, sweep / "report.png")]
    if (classes := per_class.figure(rows, baseline, sweep / "per_class.png")) is not None:
        plots.append(classes)
    if len(axes(rows)) == 2:
        plots.append(plot.heatmap(rows, summary, axes(rows), sweep / "heatmap.png"))
    plots += sorted(sweep.glob("search_*.png"))  # an Optuna search's own plots (search/plots.py)
    board.write(sweep, rows, text, plots)
    return table(summary)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, nargs="?", help="the folder a -m run printed (default: the newest one under "
                   "outputs/multirun/)")
    p.add_argument("--baseline", metavar="CONFIGURATION", help="the row every other is compared with, as the "
                   "report names it (e.g. \"pool=avg\"); default: the documented model, or ablate=none")
    p.add_argument("--test", choices=stats.TESTS, default="t", help="t (default): the paired t-test (Welch when no "
                   "seeds pair), whose Bonferroni-adjusted interval and verdict agree; exact: the sign-flip test, "
                   "free of normality but unable to go below p = 2/2^n with n paired seeds (0.0625 for 5)")
    args = p.parse_args()
    args.sweep = args.sweep or latest("multirun/*/*")
    if args.sweep is None:
        raise SystemExit("error: no sweep folder under outputs/multirun/; give the folder a -m run printed")
    if not args.sweep.is_dir():
        raise SystemExit(f"error: {args.sweep}: no such folder")
    header, body = report(args.sweep, args.baseline, args.test)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.sweep}  (test accuracy of the checkpoint each job tested, %; explained in report.md)")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in body:
        t.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    print(f"wrote {args.sweep / 'report.md'}, report.csv, jobs.csv, the plots and a TensorBoard run in "
          f"{args.sweep / 'report'}")


if __name__ == "__main__":
    main()
