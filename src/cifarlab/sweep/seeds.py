"""`cifarlab-train -m sweep=<grid> seeds=auto`: every configuration of the grid gets seeds in rounds, and only the
rows still undecided get more, until each row is decided or has the most seeds allowed.

The procedure, and why its verdicts can be trusted although it looks after every round:
- looks at n = first, first + step, ... , most seeds per row (3, 5, 7, 9, 10 by default): K looks, planned before
  the first job runs;
- at each look every undecided row is compared with the baseline as cifarlab-report compares them (the paired t
  test on the seeds both ran, Bonferroni over the m rows), at that look's share of alpha: half at the last look,
  half split evenly over the earlier ones. The shares sum to alpha, so by the union bound the chance that any row
  of a grid with no real difference is ever declared better or worse is at most alpha, however the looks depend on
  each other (Bonferroni's inequality over the looks: the simplest alpha-spending rule, Jennison & Turnbull, Group
  Sequential Methods with Applications to Clinical Trials, 2000, ch. 2). Its price is power at the last look
  (alpha / 2 instead of alpha); tests/test_seeds.py measures both by simulation (docs/guide.md);
- a row decided at a look gets no more seeds; the baseline gets every seed any undecided row needs, so rows stay
  paired; seeds are 0, 1, 2, ... in order.

Job folders are named by row and seed (`<row number>_<row>_s<seed>`), not by launch order, so running the command
again finds each job where it was: finished jobs are skipped, a killed round continues.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

from cifarlab.errors import ConfigError
from cifarlab.report import stats

log = logging.getLogger("cifarlab")
RECORD = "seeds.json"  # in the sweep folder: the plan and why each row stopped; cifarlab-report reads it


@dataclass(frozen=True)
class Plan:
    first: int = 3  # seeds every row starts with
    step: int = 2  # seeds added to each undecided row per round
    most: int = 10  # seeds a row may reach
    alpha: float = stats.ALPHA  # the family-wise level over the rows and the looks

    @property
    def looks(self) -> list[int]:
        """The seed counts at which rows are tested: first, first + step, ..., most."""
        return sorted({*range(self.first, self.most, self.step), self.most})

    def alpha_at(self, n: int) -> float:
        """The level of the look at n seeds: half of alpha at the last look, the other half split evenly over the
        earlier ones (all of it where there is one look). Any split summing to alpha keeps the union bound."""
        looks = self.looks
        if len(looks) == 1:
            return self.alpha
        return self.alpha / 2 if n == looks[-1] else self.alpha / 2 / (len(looks) - 1)


@dataclass
class Outcome:
    """Where a row stands: open (undecided, more seeds to come), decided at n seeds, or stopped at the maximum."""
    seeds: int = 0
    difference: stats.Difference | None = None
    stopped: str = ""  # "" while open; "decided at n seeds" or "reached the maximum (inconclusive)"

    @property
    def open(self) -> bool:
        return not self.stopped


Results = dict[Hashable, dict[int, float]]  # row -> {seed: value}


def rounds(rows: Sequence[Hashable], baseline: Hashable, plan: Plan,
           run: Callable[[dict[Hashable, range]], Results],
           say: Callable[[str], None] = lambda line: None) -> dict[Hashable, Outcome]:
    """The procedure: `run({row: seeds to run})` runs those jobs and returns every result so far, by row and seed.
    Returns each compared row's outcome (the baseline's seeds are in the results)."""
    compared = [r for r in rows if r != baseline]
    outcome = {r: Outcome() for r in compared}
    done = 0
    for look, n in enumerate(plan.looks, 1):
        wanted = {r: range(done, n) for r in compared if outcome[r].open}
        if wanted:
            wanted[baseline] = range(done, n)
        results = run(wanted)
        for r in wanted:
            if r == baseline:
                continue
            o = outcome[r]
            o.seeds = n
            o.difference = stats.compare(below(results.get(r, {}), n), below(results.get(baseline, {}), n),
                                         max(len(compared), 1), alpha=plan.alpha_at(n))
            if o.difference is not None and o.difference.verdict not in ("", stats.INCONCLUSIVE):
                o.stopped = f"decided at {n} seeds"
            elif n == plan.most:
                o.stopped = "reached the maximum (inconclusive)"
        say(f"look {look}/{len(plan.looks)} ({n} seeds a row): " + "; ".join(
            line(r, outcome[r]) for r in compared if r in wanted))
        done = n
        if not any(o.open for o in outcome.values()):
            break
    return outcome


def below(values: dict[int, float], n: int) -> dict[int, float]:
    """The results of seeds 0..n-1: what a row had at the look at n seeds."""
    return {s: v for s, v in values.items() if s < n}


def line(row: Hashable, o: Outcome) -> str:
    d = o.difference
    if d is None or not d.tested:
        return f"{row}: {o.seeds} seeds, not testable yet"
    return (f"{row}: Δ {d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}] at {o.seeds} seeds, "
            f"{o.stopped or 'undecided: more seeds'}")


# ---------------------------------------------------------------------------------------------------------------
# The sweep: the grid from Hydra's overrides, each round a launch of its jobs.


def grid(overrides: Sequence[Any]) -> list[list[str]]:
    """Hydra's parsed overrides -> every configuration of the product, as override lists; the seed axis left out
    (seeds=auto gives the seeds)."""
    import itertools

    axes = {}
    for o in overrides:
        key = o.get_key_element()
        if key.lstrip("+~") == "seed":  # sweep=<name> sets one; the rounds give their own
            if o.is_sweep_override():
                log.info("seeds=auto: the grid's seeds (seed=%s) give way to seeds 0, 1, 2, ... in rounds",
                         ",".join(o.sweep_string_iterator()))
            continue
        axes[key] = ([f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_discrete_sweep()
                     else [f"{key}={o.get_value_element_as_str()}"])
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise ConfigError(f"{key}: seeds=auto takes a list of values (a,b,c), not a range or interval")
    return [list(c) for c in itertools.product(*axes.values())]


def varying(configurations: list[list[str]]) -> list[str]:
    """The keys whose value differs between configurations: the grid's axes."""
    keys = dict.fromkeys(o.split("=", 1)[0] for c in configurations for o in c)
    return [k for k in keys if len({next((o for o in c if o.startswith(f"{k}=")), "") for c in configurations}) > 1]


def row_name(configuration: list[str], axes: list[str]) -> str:
    """`pool=avg lr=0.01`: the row as cifarlab-report names it."""
    from cifarlab.report.results import readable, short

    values = dict(o.split("=", 1) for o in configuration)
    return " ".join(f"{short(k.lstrip('+~'))}={readable(values[k])}" for k in axes) or "(as configured)"


def folder_name(index: int, name: str, seed: int) -> str:
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9=.,+-]+', '-', name).strip('-')}_s{seed}"


def read(folder: Path) -> float | None:
    """A finished job's test accuracy in percent, as the report reads it; None for any other job."""
    try:
        value = json.loads((folder / "metrics.json").read_text()).get("test_acc")
    except (OSError, ValueError):
        return None
    return 100 * value if isinstance(value, (int, float)) and math.isfinite(value) else None


def run(sweeper: Any, arguments: list[str]) -> dict[str, Outcome]:
    """The seeds=auto sweep Hydra runs (the sweeper plugin in src/hydra_plugins/cifarlab_search/ calls it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cifarlab.run_folder import override, write_json

    cfg, settings = sweeper.config, sweeper.config.hydra.sweeper
    plan = Plan(settings.first, settings.step, settings.max, settings.alpha)  # in range: sweep/launcher_checks.py
    lines = [f"{k}={v}" for k, v in (settings.params or {}).items()] + list(arguments)
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    configurations = grid(parser.parse_overrides(lines))
    axes = varying(configurations)
    names = [row_name(c, axes) for c in configurations]
    baseline = baseline_of(names, configurations, settings.get("baseline"))
    sweep_dir = Path(cfg.hydra.sweep.dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    folders = {name: (i, c) for i, (name, c) in enumerate(zip(names, configurations))}
    launched = 0

    def run_jobs(wanted: dict[str, range]) -> Results:
        nonlocal launched
        jobs = [[*folders[name][1], f"seed={s}",
                 override("hydra.sweep.subdir", folder_name(folders[name][0], name, s))]
                for s in sorted({s for seeds in wanted.values() for s in seeds}) for name in names
                if s in wanted.get(name, ())]  # seed by seed, so a killed round leaves whole pairs behind
        if jobs:
            sweeper.launcher.launch(jobs, initial_job_idx=launched)
            launched += len(jobs)
        return {name: {s: v for s in range(plan.most)
                       if (v := read(sweep_dir / folder_name(i, name, s))) is not None}
                for name, (i, _) in folders.items()}

    say = lambda text: log.info("seeds=auto, %s", text)  # noqa: E731
    say(f"{len(names) - 1} row{'s' if len(names) != 2 else ''} against {baseline!r}; looks at "
        + ", ".join(f"{n} seeds (level {plan.alpha_at(n):.3g})" for n in plan.looks) + f": alpha {plan.alpha} in all")
    outcome = rounds(names, baseline, plan, run_jobs, say)
    write_json(sweep_dir / RECORD, {
        "baseline": baseline, "first": plan.first, "step": plan.step, "max": plan.most, "alpha": plan.alpha,
        "looks": {n: plan.alpha_at(n) for n in plan.looks},  # seeds a row -> the level of that look
        "rows": {r: {"seeds": o.seeds, "alpha": plan.alpha_at(o.seeds), "stopped": o.stopped}
                 for r, o in outcome.items()}})
    return outcome


def baseline_of(names: list[str], configurations: list[list[str]], wanted: str | None) -> str:
    """The row every other is compared with: hydra.sweeper.baseline (a row as the report names it), else the row of
    the documented model's layers, or of ablate=none."""
    from cifarlab.report.results import BASELINE, RECIPE

    if wanted is not None:
        if wanted not in names:
            raise ConfigError(f"hydra.sweeper.baseline={wanted!r}: no such row; the rows are: "
                              + ", ".join(repr(n) for n in names))
        return wanted
    documented = {f"model/{k}={v}" for k, v in BASELINE.items()} | {"=".join(RECIPE)}
    axes = varying(configurations)
    found = [n for n, c in zip(names, configurations)
             if all(o in documented for o in c if o.split("=", 1)[0] in axes)]
    if len(found) != 1:
        raise ConfigError("seeds=auto compares every row with one baseline row, and the grid has "
                          f"{'none' if not found else 'several'} that is the documented model or ablate=none; "
                          "name one with hydra.sweeper.baseline='<row>', one of: " + ", ".join(repr(n) for n in names))
    return found[0]
