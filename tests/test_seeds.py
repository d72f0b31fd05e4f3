"""seeds=auto: the sequential procedure's error rate and savings by simulation (no training), and a real sweep on the
stand-in subset that decides one row in its first round, runs another to the maximum, and continues after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from cifarlab.report import stats
from cifarlab.sweep.seeds import Plan, rounds
from conftest import CLI, read_metrics, run_cli

ROWS = ["a", "b", "c"]  # compared with the baseline "base": m = 3, as a four-pooling grid


def simulate(effects: dict[str, float], plan: Plan, grids: int, seed: int) -> tuple[float, dict[str, float], float]:
    """Grids of synthetic results: each seed shifts every row alike (N(0, 1): the seed's split, init and batch
    order), each job adds its own N(0, 0.5) noise, a row adds its effect. Returns the share of grids in which a row
    without an effect was declared better or worse, each row's share of grids in which it was decided, and the jobs
    run per grid."""
    rng = np.random.default_rng(seed)
    false, decided, jobs = 0, dict.fromkeys(effects, 0), 0
    for _ in range(grids):
        shared, noise = rng.normal(0, 1, plan.most), rng.normal(0, 0.5, (len(effects) + 1, plan.most))
        value = {r: {s: shared[s] + noise[i, s] + effects.get(r, 0.0) for s in range(plan.most)}
                 for i, r in enumerate(["base", *effects])}
        ran: dict[str, set[int]] = {r: set() for r in value}

        def run(wanted):
            for r, seeds in wanted.items():
                ran[r] |= set(seeds)
            return {r: {s: value[r][s] for s in ran[r]} for r in value}

        outcome = rounds(list(effects), "base", plan, run)
        jobs += sum(len(s) for s in ran.values())
        false += any(o.stopped.startswith("decided") and effects[r] == 0 for r, o in outcome.items())
        for r, o in outcome.items():
            decided[r] += o.stopped.startswith("decided")
    return false / grids, {r: n / grids for r, n in decided.items()}, jobs / grids


class LooksUnadjusted(Plan):
    """The same looks, each at the full level: what looking after every round does without the split."""

    def alpha_at(self, n: int) -> float:
        return self.alpha


def test_looks_and_level_follow_the_settings():
    plan = Plan()
    assert plan.looks == [3, 5, 7, 9, 10] and sum(plan.alpha_at(n) for n in plan.looks) == pytest.approx(0.05)
    assert plan.alpha_at(10) == 0.025 and plan.alpha_at(3) == pytest.approx(0.00625)
    assert Plan(first=2, step=1, most=4).looks == [2, 3, 4] and Plan(first=5, most=5).alpha_at(5) == 0.05


@pytest.mark.slow  # 4,000 simulated grids, about 20 s
def test_on_grids_without_a_difference_the_family_wise_error_stays_within_alpha():
    """2,000 null grids of 3 rows: the share with any row declared better or worse is at most 5 % (with three
    standard errors of simulation); the same looks each at the full level pass it, so the split is what holds it."""
    grids = 2000
    tolerance = 3 * np.sqrt(0.05 * 0.95 / grids)
    fwer, _, _ = simulate(dict.fromkeys(ROWS, 0.0), Plan(), grids, seed=1)
    naive, _, _ = simulate(dict.fromkeys(ROWS, 0.0), LooksUnadjusted(), grids, seed=1)
    print(f"\nfamily-wise false positives over {grids} null grids: {fwer:.3f} (looks unadjusted: {naive:.3f})")
    assert fwer <= 0.05 + tolerance
    assert naive > 0.05 + tolerance


def test_with_real_effects_it_saves_seeds_against_a_fixed_design_and_says_what_it_costs():
    """Rows 0.25, 1 and 3 standard deviations of a paired difference away: the sequential grid runs fewer jobs than
    one with 10 seeds a row and decides the 3-sd row every time, at the cost of some power on the 1-sd row against
    the fixed design's t-test at alpha / m (its power from the noncentral t). A grid of large effects, as a pooling
    grid's, is decided at the first look: 3 seeds a row instead of 10."""
    sd = 0.5 * np.sqrt(2)  # of one paired difference
    effects = {"a": 0.25 * sd, "b": 1.0 * sd, "c": 3.0 * sd}
    fixed_jobs = 10 * (len(effects) + 1)
    _, found, jobs = simulate(effects, Plan(), 400, seed=2)
    fixed = {r: stats.power(e / sd, 10, True, stats.ALPHA / len(effects)) for r, e in effects.items()}
    large = {"a": 30 * sd, "b": 60 * sd, "c": 100 * sd}  # avg vs max pooling: -32.8 points, seeds within 0.3
    _, found_large, jobs_large = simulate(large, Plan(), 100, seed=3)
    print(f"\njobs per grid: {jobs:.1f} sequential against {fixed_jobs} with 10 seeds; decided: "
          + ", ".join(f"{e / sd:g} sd {found[r]:.2f} (fixed: {fixed[r]:.2f})" for r, e in effects.items())
          + f"; large effects (30, 60, 100 sd): {jobs_large:.1f} jobs")
    assert jobs < fixed_jobs and found["c"] == 1.0
    assert fixed["b"] - 0.2 <= found["b"] < fixed["b"]  # the split's price in power, bounded
    assert jobs_large == 4 * Plan().first and set(found_large.values()) == {1.0}


# A 2 x 2 grid on the stand-in subset: data.download=true changes nothing once the data is there (a row identical to
# the baseline), optimizer.lr=1e-9 cannot learn in 2 epochs (a row far from it, and one more like it). Its seed axis,
# as a sweep=<name> has one, gives way to the rounds' seeds.
GRID = ["-m", "data.download=false,true", "optimizer.lr=0.003,1e-9", "seed=0,1", "seeds=auto", "hydra.sweeper.max=5",
        "hydra.sweeper.baseline='data.download=False optimizer.lr=0.003'", "trainer.max_epochs=2", "callbacks=plain",
        "launcher=basic"]


def finished(sweep) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sweep.glob("*/metrics.json")}


@pytest.mark.slow  # 16 short runs through the command line
def test_a_real_sweep_decides_the_clear_row_first_runs_the_tied_one_to_the_maximum_and_continues_after_a_kill(
        tmp_path, subset_root):
    sweep = tmp_path / "sweep"
    args = [*GRID, f"data.root={subset_root}", f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    first = subprocess.Popen([str(CLI), *args], cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(finished(sweep)) < 6:  # half of the first round
        assert first.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled before the kill"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = finished(sweep)

    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    after = finished(sweep)
    assert {k: after[k] for k in before} == before  # no finished job ran again
    record = json.loads((sweep / "seeds.json").read_text())
    rows = record["rows"]
    assert rows["data.download=True optimizer.lr=0.003"] == {"seeds": 5, "alpha": 0.025,
                                                             "stopped": "reached the maximum (inconclusive)"}
    for row in ("data.download=False optimizer.lr=1e-09", "data.download=True optimizer.lr=1e-09"):
        assert rows[row]["stopped"] == "decided at 3 seeds", rows
    # 4 rows x 3 seeds, then 2 more seeds for the tied row and the baseline; each job in a folder of its row and seed
    assert len(after) == 4 * 3 + 2 * 2
    for row in ("000_", "002_"):  # the baseline and the tied row (the grid's order: download, then lr)
        assert {read_metrics(sweep / name)["seed"] for name in after if name.startswith(row)} == set(range(5))
    log = result.stderr + result.stdout
    assert "look 1/2 (3 seeds a row)" in log and "look 2/2 (5 seeds a row)" in log

    report = subprocess.run([str(CLI.parent / "cifarlab-report"), str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    text = (sweep / "report.md").read_text()
    assert "## Seeds until decided (seeds=auto)" in text and "| data.download=True optimizer.lr=0.003 | 5 |" in text


@pytest.mark.slow  # two sweeps through the command line
def test_the_parallel_launcher_runs_the_same_rounds_into_the_same_folders_with_the_same_numbers(tmp_path):
    """launcher=parallel (joblib workers) against launcher=basic on made-up data: the same jobs, the same results.
    On SLURM: tests/test_slurm.py."""
    from test_sweeps import TINY

    grid = ["-m", "data.download=false,true", "seeds=auto", "hydra.sweeper.first=2", "hydra.sweeper.step=1",
            "hydra.sweeper.max=3", "hydra.sweeper.baseline='data.download=False'", *TINY,
            "threads=1"]  # as a parallel worker has, so the numbers can be the same to the last bit
    runs = {}
    for launcher in ("basic", "parallel"):
        sweep = tmp_path / launcher
        result = run_cli(*grid, f"launcher={launcher}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[launcher] = {name: {k: m[k] for k in ("seed", "steps", "test_acc", "test_loss")}
                          for name in finished(sweep) if (m := read_metrics(sweep / name))}
        assert json.loads((sweep / "seeds.json").read_text())["rows"]["data.download=True"]["seeds"] == 3
    assert len(runs["basic"]) == 6 and runs["parallel"] == runs["basic"]
