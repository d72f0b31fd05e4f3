"""`cifarlab-train -m`: hydra.launcher and hydra.sweeper settings against what their libraries accept, read before the
sweep folder, so that a value out of range is one line (as schema.RANGES does for the rest of the config) instead of
a library's traceback after the folder was made, or a search that never ends (hydra.sweeper.n_jobs=0).

The rules are keyed by the _target_ Hydra instantiates. Which settings are numbers comes from each library's own
config class or signature; tests/test_launcher_settings.py holds that each of them has a rule here.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig

from cifarlab.schema import Rule, fmt, ints, null_or, numbers, one_of, whole

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OPTUNA = "hydra_plugins.cifarlab_search.OptunaSweeper"
SEEDS = "hydra_plugins.cifarlab_search.SeedsSweeper"
JOBLIB_INTS = ("pre_dispatch", "batch_size", "max_nbytes")  # text the launcher passes on as an int when it is one


def said(rule: Rule, why: str) -> Rule:
    """A rule of schema's, with what the setting means in its library."""
    return rule[0], f"{rule[1]} ({why})"


SLURM_SIZE = (lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"\d+([KMGT]B?)?", v, re.I) is not None),
              "null or a size as sbatch reads it: a whole number, in MB or with the unit K, M, G or T (e.g. 4G)")
AUTO_OR_COUNT = (lambda v: v == "auto" or (whole(v) and v >= 1), "'auto' or an int >= 1")
SEED = said(null_or(ints(0, 2**32 - 1)), "numpy's seed range; null = a random seed")
REDUCTION = said(ints(2), "keep the top 1/reduction_factor at each rung")
BOOTSTRAP = said(ints(0), "trials to finish at a rung before any is pruned there")

RULES: dict[str, dict[str, Rule]] = {
    # joblib.Parallel's arguments, as its docstring gives them; hydra_joblib_launcher always runs them on loky
    JOBLIB: {
        "n_jobs": (lambda v: whole(v) and v != 0, "a positive number of jobs at once, or negative to count back from "
                   "the cores (-1 = all, -2 = all but one); 0 has no meaning in joblib"),
        "backend": (lambda v: v in (None, "loky"), "'loky' or null: the launcher runs every job in a loky worker "
                    "process (Hydra's jobs cannot share one) and would ignore any other backend"),
        "prefer": one_of("processes", "threads"),
        "require": (lambda v: v is None, "null: require='sharedmem' needs threads, and the launcher's loky workers "
                    "are processes"),
        "verbose": said(ints(0), "joblib's progress messages; 0 = none"),
        "timeout": said(null_or(numbers(0, lo_open=True)), "seconds a job may take; null = no limit"),
        "batch_size": said(AUTO_OR_COUNT, "jobs sent to a worker at once"),
        "max_nbytes": (lambda v: v is None or (whole(v) and v >= 0) or (isinstance(v, str) and re.fullmatch(
            r"\d+(\.\d+)?[KMG]", v) is not None), "null, a number of bytes, or a size such as '1M' (K, M or G): "
                       "arrays larger than this are memory-mapped for the workers"),
        "mmap_mode": one_of(None, "r+", "r", "w+", "c"),
        "pre_dispatch": (lambda v: v == "all" or (whole(v) and v >= 1) or (isinstance(v, str) and "n_jobs" in v),
                         "'all', an int >= 1, or an expression in n_jobs such as '2*n_jobs' (jobs dispatched first)"),
    },
    # sbatch's options (submitit writes each as #SBATCH --<option>) and submitit's own settings
    SLURM: {
        "timeout_min": said(ints(0), "minutes, sbatch --time; 0 asks for no time limit"),
        "nodes": said(ints(1), "nodes per job"),
        "tasks_per_node": said(ints(1), "processes per node"),
        "gpus_per_node": said(null_or(ints(0)), "0 on a CPU-only cluster"),
        "gpus_per_task": said(null_or(ints(0)), "GPUs per process"),
        "cpus_per_task": said(null_or(ints(1)), "cores per process"),
        "cpus_per_gpu": said(null_or(ints(1)), "cores per GPU"),
        "mem_gb": said(null_or(ints(0)), "GB per node; 0 asks for all of each node's memory, as sbatch --mem=0"),
        "mem_per_cpu": SLURM_SIZE,
        "mem_per_gpu": SLURM_SIZE,
        "signal_delay_s": said(ints(0, 65535), "seconds before timeout_min that SLURM signals the job; sbatch "
                               "--signal's range"),
        "max_num_timeout": said(ints(0), "times submitit requeues a job that reached timeout_min"),
        "array_parallelism": said(ints(1), "jobs of the array running at once, sbatch --array=...%N"),
    },
    BASIC_SWEEPER: {
        "max_batch_size": said(null_or(ints(1)), "jobs launched at once; null = all"),
    },
    OPTUNA: {
        "n_trials": said(ints(1), "trials the study holds when the search ends"),
        "n_jobs": said(ints(1), "trials asked and launched at once"),
        "direction": one_of("maximize", "minimize"),
    },
    SEEDS: {  # seeds=auto (sweep/seeds.py)
        "first": said(ints(2, 1000), "seeds every row starts with: two at least, to test it"),
        "step": said(ints(1), "seeds added per round"),
        "max": said(ints(2, 1000), "seeds a row may reach"),
        "alpha": said(numbers(0, 1, lo_open=True, hi_open=True), "the family-wise level over rows and looks"),
    },
    # Optuna's samplers and pruners: the ranges their constructors check, or their docstrings give
    "optuna.samplers.TPESampler": {
        "seed": SEED,
        "n_startup_trials": said(ints(0), "random trials before TPE takes over"),
        "n_ei_candidates": said(ints(1), "candidates scored per parameter"),
        "prior_weight": said(null_or(numbers(0, lo_open=True)), "the prior's weight among the observations"),
    },
    "optuna.samplers.RandomSampler": {"seed": SEED},
    "optuna.pruners.MedianPruner": {
        "n_startup_trials": said(ints(0), "finished trials before any is pruned"),
        "n_warmup_steps": said(ints(0), "epochs a trial always runs"),
        "interval_steps": said(ints(1), "epochs between pruning checks"),
        "n_min_trials": said(ints(1), "trials reported at an epoch before one is pruned there"),
    },
    "optuna.pruners.SuccessiveHalvingPruner": {
        "min_resource": said(AUTO_OR_COUNT, "epochs before the first rung"),
        "reduction_factor": REDUCTION,
        "min_early_stopping_rate": ints(0),
        "bootstrap_count": BOOTSTRAP,
    },
    "optuna.pruners.HyperbandPruner": {
        "min_resource": said(ints(1), "epochs of the smallest bracket's first rung"),
        "max_resource": said(AUTO_OR_COUNT, "epochs of a full trial, trainer.max_epochs"),
        "reduction_factor": REDUCTION,
        "bootstrap_count": BOOTSTRAP,
    },
}


def as_joblib_gets(key: str, value: Any) -> Any:
    """hydra_joblib_launcher passes pre_dispatch, batch_size and max_nbytes (typed str) on as an int when they read as
    one (process_joblib_cfg); hydra.launcher.batch_size=0 is checked as joblib receives it."""
    if key in JOBLIB_INTS and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def nodes(config: DictConfig) -> list[tuple[str, DictConfig]]:
    """(key, node) of the launcher, the sweeper, and the sweeper's sampler and pruner where it has them."""
    found = [("hydra.launcher", config.hydra.launcher), ("hydra.sweeper", config.hydra.sweeper)]
    return found + [(f"hydra.sweeper.{k}", config.hydra.sweeper[k]) for k in ("sampler", "pruner")
                    if isinstance(config.hydra.sweeper.get(k), DictConfig)]


def mistake(config: DictConfig) -> str | None:
    """The first launcher or sweeper setting its library would refuse, or silently not honour, as the line that
    refuses it; None when all are in range."""
    for path, node in nodes(config):
        target = str(node.get("_target_"))
        for key, (test, allowed) in RULES.get(target, {}).items():
            if key in node:
                value = as_joblib_gets(key, node[key]) if target == JOBLIB else node[key]
                if not test(value):
                    return f"{path}.{key}={fmt(value)}: must be {allowed}"
    return across(config)


def across(config: DictConfig) -> str | None:
    """The rules that read two settings at once."""
    launcher, target = config.hydra.launcher, str(config.hydra.launcher.get("_target_"))
    if target == SLURM and 0 < launcher.timeout_min * 60 <= launcher.signal_delay_s:
        return (f"hydra.launcher.signal_delay_s={launcher.signal_delay_s} with hydra.launcher.timeout_min="
                f"{launcher.timeout_min}: SLURM would signal each job (and submitit requeue it) as it starts; make "
                "signal_delay_s shorter than timeout_min x 60 s")
    sweeper = config.hydra.sweeper
    if str(sweeper.get("_target_")) == SEEDS and sweeper.max < sweeper.first:
        return (f"hydra.sweeper.max={sweeper.max} with hydra.sweeper.first={sweeper.first}: a row cannot start with "
                "more seeds than it may reach; raise max or lower first")
    pruner = config.hydra.sweeper.get("pruner")
    if not isinstance(pruner, DictConfig):
        return None
    start = "min_resource" if str(pruner.get("_target_")).endswith("SuccessiveHalvingPruner") else "max_resource"
    if whole(count := pruner.get("bootstrap_count")) and count > 0 and pruner.get(start) == "auto":
        return (f"hydra.sweeper.pruner.bootstrap_count={count} with hydra.sweeper.pruner.{start}="
                f"'auto': Optuna needs {start} as a number of epochs to bootstrap; set it, or bootstrap_count=0")
    low, high = pruner.get("min_resource"), pruner.get("max_resource")
    if str(pruner.get("_target_")).endswith("HyperbandPruner") and whole(high) and whole(low) and high < low:
        return (f"hydra.sweeper.pruner.max_resource={high} with hydra.sweeper.pruner.min_resource={low}: Hyperband "
                "would have no bracket and never prune; raise max_resource (trainer.max_epochs by default) or lower "
                "min_resource")
    return None
