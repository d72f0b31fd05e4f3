"""cifarlab-report on sweep folders whose numbers are known: two factors with a better, a worse and an
inconclusive cell; one seed per row; rows that do not share their seeds; a lost job; damaged job files; another
baseline. (The report of a
real sweep, TensorBoard bands included, is tested in test_sweeps.py.)"""

from __future__ import annotations

import csv
import json
import statistics
import sys

import pytest
from PIL import Image
from scipy import stats as scipy_stats

from cifarlab.report import plot as report_plot, stats, summary as report
from cifarlab.report.results import baseline_row, collect

SEEDS = range(7)
NOISE = [0.31, -0.12, 0.05, -0.27, 0.18, -0.02, 0.09]
BASE = {s: 60.0 + n for s, n in zip(SEEDS, NOISE)}


def job(sweep, number: int, overrides: dict[str, str], seed: int, acc: float,
        per_class: dict[str, float] | None = None) -> None:
    """A finished job folder as cifarlab-train leaves it, reduced to what the report reads."""
    choices = {"pool": "max", "activation": "none", "norm": "none", "dropout": "none"}
    choices |= {k.split("/")[-1]: v for k, v in overrides.items()}
    folder = sweep / f"{number:03d}_{choices['pool']}-{choices['activation']}-none-none_s{seed}"
    (folder / ".hydra").mkdir(parents=True)
    listed = [f"{k}={v}" for k, v in overrides.items()] + [f"seed={seed}"]
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in listed))
    (folder / "metrics.json").write_text(json.dumps({
        "test_acc": acc / 100, "best_val_acc": acc / 100 + 0.01, "params": 145_578, "epoch_s": 30.0, "seed": seed,
        "epochs": 10, "data_source": "made-up", "tested_checkpoint": "best", "choices": choices,
        "overrides": listed, **({"test_acc_class": per_class} if per_class else {})}))


def grid(sweep, cells: dict[tuple[str, str], dict[int, float]]) -> None:
    number = 0
    for (pool, activation), accs in cells.items():
        for seed, acc in accs.items():
            job(sweep, number, {"model/pool": pool, "model/activation": activation}, seed, acc)
            number += 1


def read_csv(sweep) -> dict[str, dict[str, str]]:
    return {r["configuration"]: r for r in csv.DictReader(open(sweep / "report.csv"))}


@pytest.fixture
def two_factors(tmp_path):
    cells = {
        ("max", "none"): BASE,                                   # the documented model
        ("max", "relu"): {s: v - 1.0 for s, v in BASE.items()},  # one point worse on every seed
        ("avg", "none"): {s: v + 1.0 for s, v in BASE.items()},  # one point better on every seed
        ("avg", "relu"): {s: v + (-0.2 if s % 2 else 0.2) for s, v in BASE.items()},  # up on 4 seeds, down on 3
    }
    grid(tmp_path, cells)
    return tmp_path, cells


def test_a_two_factor_grid_gets_verdicts_main_effects_and_a_marked_heatmap(two_factors):
    sweep, cells = two_factors
    report.report(sweep)
    rows = read_csv(sweep)
    assert list(rows) == ["pool=avg activation=none", "pool=avg activation=relu", "pool=max activation=none",
                          "pool=max activation=relu"]  # best first
    better, even, base, worse = rows.values()
    assert base["verdict"] == "baseline" and base["p"] == "" and base["delta"] == ""
    assert (better["verdict"], worse["verdict"], even["verdict"]) == ("better", "worse", "inconclusive")
    for row, shift in ((better, 1.0), (worse, -1.0)):
        assert float(row["delta"]) == pytest.approx(shift) and row["test"] == "paired t" and row["pairs"] == "7"
        assert float(row["p"]) < 1e-10 and row["same_side"] == "7"  # a constant shift: no spread at all
    assert float(even["p_adjusted"]) == pytest.approx(min(1, 3 * float(even["p"])), rel=1e-3)
    assert even["rows_compared"] == "3" and float(even["delta_ci_level"]) == pytest.approx(1 - 0.05 / 3, abs=1e-4)
    assert int(even["seeds_needed"]) > len(SEEDS)  # detecting its small Δ needs more seeds than it has
    assert better["seeds_needed"] == worse["seeds_needed"] == ""  # already detected
    for row in rows.values():
        mean, low, high = (float(row[k]) for k in ("test_acc_mean", "ci95_low", "ci95_high"))
        assert low < mean < high
        assert mean == pytest.approx(statistics.fmean(cells[tuple(
            c.split("=")[1] for c in row["configuration"].split())].values()), abs=1e-4)
    text = (sweep / "report.md").read_text()
    assert "| pool=avg activation=none | " in text and "| better |" in text and "| worse |" in text
    assert "Δ vs baseline [98.3 % CI, 3 rows]" in text and "divided among the 3 rows compared (Bonferroni)" in text
    # main effects: pool=max averages (base, base - 1) seed by seed, so its mean is the base's minus 0.5
    pool_max = statistics.fmean(BASE.values()) - 0.5
    assert f"| max | {pool_max:.2f} [" in text.split("## Main effects")[1]
    assert f"| none | {statistics.fmean(BASE.values()) + 0.5:.2f} [" in text.split("| activation |")[1]
    assert Image.open(sweep / "heatmap.png").size[0] > 300 and Image.open(sweep / "report.png").size[0] > 300
    rows_, _ = collect(sweep)
    summary = report.summarize(rows_, baseline_row(rows_))
    ys, xs, grid, marks = report_plot.cells(rows_, summary, ["model/pool", "model/activation"])
    labels = {s["configuration"]: report_plot.label(s) for s in summary}  # the plot's row names
    assert labels["pool=avg activation=relu"] == (f"pool=avg activation=relu  (inconclusive, "
                                                  f"{even['seeds_needed']} seeds would tell)")
    assert labels["pool=avg activation=none"] == "pool=avg activation=none  (better)"
    assert (ys, xs) == (["max", "avg"], ["none", "relu"])  # the grid's order, not the ranking
    assert marks == {(0, 0): "base", (0, 1): "▼", (1, 0): "▲", (1, 1): ""}
    assert grid[1, 0] == pytest.approx(statistics.fmean(cells[("avg", "none")].values()))
    assert "![the grid](heatmap.png)" in text
    report.report(sweep)  # again: the TensorBoard runs are made anew, not appended to (no band drawn twice)
    assert len(list((sweep / "report").glob("**/events.out.tfevents.*"))) == 1  # no job has event files here


def test_one_seed_per_row_says_no_test_is_possible_and_how_to_add_seeds(tmp_path):
    grid(tmp_path, {("max", "none"): {0: 60.0}, ("avg", "none"): {0: 61.0}})
    report.report(tmp_path)
    rows = read_csv(tmp_path)
    assert rows["pool=avg"]["verdict"] == rows["pool=avg"]["p"] == rows["pool=avg"]["ci95_low"] == ""
    assert float(rows["pool=avg"]["test_acc_mean"]) == pytest.approx(61.0)
    assert float(rows["pool=avg"]["delta"]) == pytest.approx(1.0)  # the difference, untested
    text = (tmp_path / "report.md").read_text()
    assert "One seed per configuration: no test is possible" in text and "`seed=0,1,2,3,4`" in text
    assert "| 61.00 |" in text  # the mean alone, no interval pretending to be one


def test_rows_that_share_no_seeds_are_compared_by_welch(tmp_path):
    grid(tmp_path, {("max", "none"): {s: BASE[s] for s in (0, 1, 2)},
                    ("avg", "none"): {s: BASE[s] + 2 for s in (3, 4, 5)}})
    report.report(tmp_path)
    row = read_csv(tmp_path)["pool=avg"]
    assert row["test"] == "Welch t" and row["pairs"] == row["same_side"] == ""
    welch = scipy_stats.ttest_ind([BASE[s] + 2 for s in (3, 4, 5)], [BASE[s] for s in (0, 1, 2)], equal_var=False)
    assert float(row["p"]) == pytest.approx(welch.pvalue, rel=1e-3)
    assert float(row["delta_ci_low"]) == pytest.approx(welch.confidence_interval(0.95).low, abs=1e-3)
    assert "(unpaired)" in (tmp_path / "report.md").read_text()


def test_a_lost_baseline_seed_keeps_the_rows_paired_on_the_seeds_they_share(tmp_path):
    """A baseline job that failed once made the comparison unpaired, whose label permutations reach lower p values
    and turned rows into verdicts. Now the rows pair on the 6 seeds both ran and say so."""
    cells = {("max", "none"): BASE, ("avg", "none"): {s: v + 0.3 * (s % 2) for s, v in BASE.items()},
             ("lp", "none"): {s: v - 0.2 + 0.1 * (s % 3) for s, v in BASE.items()}}
    grid(tmp_path, cells)
    lost = next(tmp_path.glob("*_max-none-none-none_s3"))
    (lost / "metrics.json").rename(lost / "failed.json")  # the job failed: its error, no metrics
    (lost / "failed.json").write_text(json.dumps({"error": "RuntimeError: out of memory"}))
    report.report(tmp_path)
    rows = read_csv(tmp_path)
    for name, accs in (("pool=avg", cells[("avg", "none")]), ("pool=lp", cells[("lp", "none")])):
        shared = [s for s in SEEDS if s != 3]
        paired = scipy_stats.ttest_rel([accs[s] for s in shared], [BASE[s] for s in shared])
        assert rows[name]["test"] == "paired t" and rows[name]["pairs"] == "6"
        assert float(rows[name]["p"]) == pytest.approx(paired.pvalue, rel=1e-3)
        assert rows[name]["verdict"] == "inconclusive"  # as the 7 seeds were, before the job was lost
    assert "(6 pairs)" in (tmp_path / "report.md").read_text()
    assert rows["pool=max"]["failed"] == "1"


def test_jobs_csv_holds_every_job_and_recomputes_the_table(tmp_path, two_factors):
    sweep, cells = two_factors
    job(sweep, 60, {"model/pool": "avg", "model/activation": "none"}, 0, BASE[0] + 3)  # seed 0 again, later
    report.report(sweep)
    jobs = list(csv.DictReader(open(sweep / "jobs.csv")))
    assert len(jobs) == sum(len(c) for c in cells.values()) + 1
    assert {k for k in jobs[0]} >= {"configuration", "seed", "status", "counted", "test_acc", "best_val_acc", "epochs",
                                    "epoch_s", "folder", "error"}
    by_row = {}
    for j in jobs:
        if j["counted"] == "1":
            by_row.setdefault(j["configuration"], {})[int(j["seed"])] = float(j["test_acc"])
    assert sum(j["counted"] == "0" for j in jobs) == 1  # the earlier run of seed 0 is listed, not counted
    table = read_csv(sweep)
    base = by_row["pool=max activation=none"]
    for name, accs in by_row.items():
        assert float(table[name]["test_acc_mean"]) == pytest.approx(statistics.fmean(accs.values()), abs=1e-3)
        if name != "pool=max activation=none":
            d = stats.compare(accs, base, rows=3)
            assert float(table[name]["delta"]) == pytest.approx(d.delta, abs=1e-3)
            assert float(table[name]["delta_ci_low"]) == pytest.approx(d.low, abs=1e-3)
            assert table[name]["verdict"] == d.verdict


@pytest.mark.parametrize("damage", ["metrics", "overrides", "both", "failed", "events"])
def test_a_damaged_job_is_named_and_the_rest_reported(tmp_path, two_factors, capsys, damage):
    sweep, _ = two_factors
    folder = next(sweep.glob("*_avg-none-none-none_s2"))
    if damage in ("metrics", "both"):
        (folder / "metrics.json").write_text('{"test_acc": 0.61, "best_val')  # cut off mid-write
    if damage in ("overrides", "both"):
        (folder / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    if damage == "failed":
        (folder / "metrics.json").unlink()
        (folder / "failed.json").write_text("")
    if damage == "events":
        (folder / "events.out.tfevents.1.host").mkdir()  # TensorBoard's reader skips garbage, not this
    report.report(sweep)
    rows = read_csv(sweep)
    assert rows["pool=max activation=relu"]["verdict"] == "worse"  # the other rows as before
    text = (sweep / "report.md").read_text()
    jobs = {j["folder"]: j for j in csv.DictReader(open(sweep / "jobs.csv"))}
    if damage == "events":
        assert "left out of the bands" in capsys.readouterr().err
        return
    expected = {"metrics": "damaged metrics.json: ", "overrides": "", "both": "damaged metrics.json: ",
                "failed": "damaged failed.json: "}[damage]
    if damage == "overrides":  # metrics.json names the overrides: the job still counts
        assert rows["pool=avg activation=none"]["seeds"] == str(len(SEEDS))
        return
    assert f"- `{folder.name}`: {expected}" in text
    assert jobs[folder.name]["status"] == "damaged"
    assert jobs[folder.name]["error"].startswith(expected)
    assert f"warning: {folder}: {expected}" in capsys.readouterr().err
    assert rows["pool=avg activation=none"]["seeds"] == str(len(SEEDS) - 1)


def test_a_sweep_whose_only_job_is_unreadable_still_gets_a_report_naming_it(tmp_path):
    grid(tmp_path, {("max", "none"): {0: 60.0}})
    folder = next(tmp_path.glob("000_*"))
    (folder / "metrics.json").write_text("[1, 2")
    (folder / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    report.report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "No job of this sweep could be read" in text and f"- `{folder.name}`: damaged metrics.json: " in text
    assert list(csv.DictReader(open(tmp_path / "jobs.csv")))[0]["status"] == "damaged"


def test_the_exact_test_is_an_option_and_says_its_floor(two_factors, monkeypatch, capsys):
    sweep, _ = two_factors
    monkeypatch.setattr(sys, "argv", ["cifarlab-report", str(sweep), "--test", "exact"])
    report.main()
    rows = read_csv(sweep)
    better = rows["pool=avg activation=none"]
    assert better["test"] == "sign-flip" and float(better["p"]) == pytest.approx(2 / 2 ** 7, abs=1e-4)
    assert float(better["p_adjusted"]) == pytest.approx(3 * 2 / 2 ** 7, abs=1e-4) and better["verdict"] == "better"
    assert "cannot give the exact test a p below 2/2^n (0.0625 for 5)" in (sweep / "report.md").read_text()


def test_another_row_can_be_the_baseline_and_a_wrong_name_is_refused_with_the_rows(two_factors, monkeypatch, capsys):
    sweep, _ = two_factors
    monkeypatch.setattr(sys, "argv", ["cifarlab-report", str(sweep), "--baseline", "pool=avg activation=none"])
    report.main()
    rows = read_csv(sweep)
    assert rows["pool=avg activation=none"]["verdict"] == "baseline"
    assert rows["pool=max activation=none"]["verdict"] == "worse"
    assert float(rows["pool=max activation=none"]["delta"]) == pytest.approx(-1.0)
    assert "(--baseline)" in (sweep / "report.md").read_text()
    monkeypatch.setattr(sys, "argv", ["cifarlab-report", str(sweep), "--baseline", "pool=lp"])
    with pytest.raises(SystemExit) as refused:
        report.main()
    assert str(refused.value) == ("error: --baseline 'pool=lp': no such row; the rows are (best first): "
                                  "'pool=avg activation=none', 'pool=avg activation=relu', 'pool=max activation=none', "
                                  "'pool=max activation=relu'")


def test_a_grid_without_the_documented_model_says_how_to_pick_a_baseline(tmp_path):
    grid(tmp_path, {("avg", "none"): BASE, ("lp", "none"): BASE})
    report.report(tmp_path)
    assert all(r["verdict"] == "" for r in read_csv(tmp_path).values())
    assert "--baseline \"<configuration>\"" in (tmp_path / "report.md").read_text()


def test_a_baseline_left_with_one_seed_says_why_nothing_is_tested(tmp_path):
    grid(tmp_path, {("max", "none"): {0: 60.0}, ("avg", "none"): {s: BASE[s] for s in (0, 1, 2)}})
    report.report(tmp_path)
    assert read_csv(tmp_path)["pool=avg"]["verdict"] == ""
    assert float(read_csv(tmp_path)["pool=avg"]["ci95_low"]) < float(read_csv(tmp_path)["pool=avg"]["test_acc_mean"])
    assert "The baseline has 1 finished seed(s), or no other row has two: no test is possible" in (
        tmp_path / "report.md").read_text()


def test_a_failed_job_neither_tilts_a_main_effect_nor_hides_the_baseline(tmp_path):
    cells = {("max", "none"): BASE, ("max", "relu"): {s: BASE[s] - 5 for s in (0, 1, 2, 3)},  # seeds 4-6 failed
             ("avg", "none"): BASE, ("avg", "relu"): BASE}
    grid(tmp_path, cells)
    effects = dict(report.main_effects(collect(tmp_path)[0]))["model/pool"]
    level, mean, low, high, seeds, ran = effects[0]
    assert (level, seeds, ran) == ("max", 4, "2 of 2")  # the seeds both cells have
    assert mean == pytest.approx(statistics.fmean(BASE[s] - 2.5 for s in (0, 1, 2, 3)))


def test_a_baseline_whose_jobs_all_failed_is_still_the_baseline(tmp_path):
    grid(tmp_path, {("avg", "none"): BASE})
    for seed in (0, 1):  # the documented model, failed: no metrics.json, the choices only in Hydra's own record
        folder = tmp_path / f"{90 + seed:03d}_max-none-none-none_s{seed}"
        (folder / ".hydra").mkdir(parents=True)
        overrides = f"- model/pool=max\n- model/activation=none\n- seed={seed}\n"
        (folder / ".hydra" / "overrides.yaml").write_text(overrides)
        (folder / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      model/pool: max\n"
                                                     "      model/activation: none\n      model/norm: none\n"
                                                     "      model/dropout: none\n")
        (folder / "failed.json").write_text(json.dumps({"error": "it broke"}))
    running = tmp_path / "099_max-none-none-none_s2"  # a third, still running
    (running / ".hydra").mkdir(parents=True)
    (running / ".hydra" / "overrides.yaml").write_text("- model/pool=max\n- model/activation=none\n- seed=2\n")
    (running / ".running").write_text("pid 4242 on node7 since 2026-12-06T16:00:00+00:00\n")
    report.report(tmp_path)
    rows = read_csv(tmp_path)
    assert rows["pool=max"]["verdict"] == "baseline" and rows["pool=max"]["failed"] == "3"
    text = (tmp_path / "report.md").read_text()
    assert "The baseline has 0 finished seed(s)" in text
    assert "- `099_max-none-none-none_s2`: running, or killed (pid 4242 on node7 since 2026-12-06T16:00:00+00:00)" in text


def test_a_seed_run_twice_counts_once_and_a_diverged_value_is_left_out(tmp_path):
    grid(tmp_path, {("max", "none"): BASE, ("avg", "none"): BASE})
    job(tmp_path, 50, {"model/pool": "avg", "model/activation": "none"}, 0, BASE[0] + 3)  # seed 0 again, later
    job(tmp_path, 51, {"model/pool": "avg", "model/activation": "none"}, 99, float("nan"))
    report.report(tmp_path)
    row = read_csv(tmp_path)["pool=avg"]
    assert row["seeds"] == str(len(SEEDS)) and row["test"] == "paired t"
    assert float(row["delta"]) == pytest.approx(3 / len(SEEDS), abs=1e-4)  # the later run of seed 0 counts


def test_the_per_class_view_gives_each_class_its_mean_over_seeds_and_its_difference_from_the_baseline(tmp_path):
    classes = ["airplane", "cat", "ship"]
    base = {s: {c: 0.6 + 0.01 * s + 0.1 * i for i, c in enumerate(classes)} for s in range(3)}
    avg = {s: {**acc, "cat": acc["cat"] + 0.08, "ship": acc["ship"] - 0.05} for s, acc in base.items()}
    for number, (pool, per_seed) in enumerate([("max", base), ("avg", avg)]):
        for seed, acc in per_seed.items():
            job(tmp_path, 3 * number + seed, {"model/pool": pool}, seed, 100 * statistics.fmean(acc.values()), acc)
    report.report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    section = text[text.index("## Test accuracy per class"):]
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
            for line in section.splitlines() if line.startswith("| pool=")}
    mean = {c: 100 * statistics.fmean(base[s][c] for s in base) for c in classes}
    assert rows["pool=max (base)"] == [f"{mean[c]:.1f}" for c in classes]
    assert rows["pool=avg"] == [f"{mean['airplane']:.1f} (+0.0)", f"{mean['cat'] + 8:.1f} (+8.0)",
                                f"{mean['ship'] - 5:.1f} (-5.0)"]
    assert "![accuracy per class](per_class.png)" in text and Image.open(tmp_path / "per_class.png").size[0] > 300


def test_jobs_without_accuracy_per_class_get_no_per_class_view(two_factors):
    sweep, _ = two_factors
    report.report(sweep)
    assert "per class" not in (sweep / "report.md").read_text() and not (sweep / "per_class.png").exists()
