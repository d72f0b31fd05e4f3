"""hydra.launcher and hydra.sweeper settings out of their libraries' range are refused as any other key is: one line
naming the key, the value and what is allowed, exit status 2, before the sweep folder exists (so before anything is
submitted to SLURM). Which settings hold numbers is read from each library's own config class or signature, so a
setting a new version adds fails here until it has a rule and a case."""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from cifarlab.sweep.launcher_checks import BASIC_SWEEPER, JOBLIB, OPTUNA, RULES, SEEDS, SLURM, mistake, nodes
from conftest import CONFIG_DIR, option_names, run_cli

TPE, RANDOM = "optuna.samplers.TPESampler", "optuna.samplers.RandomSampler"
MEDIAN, HALVING, HYPERBAND = ("optuna.pruners.MedianPruner", "optuna.pruners.SuccessiveHalvingPruner",
                              "optuna.pruners.HyperbandPruner")
# What picks each rule's owner on the command line.
PICK = {JOBLIB: ["launcher=parallel"], SLURM: ["launcher=slurm"], BASIC_SWEEPER: [], OPTUNA: ["hparams_search=optuna"],
        SEEDS: ["seeds=auto"],
        TPE: ["hparams_search=optuna"], RANDOM: ["hparams_search=optuna", "hydra/sweeper/sampler=random"],
        MEDIAN: ["hparams_search=optuna"],
        HALVING: ["hparams_search=optuna", "hydra/sweeper/pruner=successive_halving"],
        HYPERBAND: ["hparams_search=optuna", "hydra/sweeper/pruner=hyperband"]}

# (owner, a bad override, the line's start: the key, the value as given, and the rule)
BAD = [
    (JOBLIB, "hydra.launcher.n_jobs=0", "hydra.launcher.n_jobs=0: must be a positive number of jobs at once, or "
                                        "negative to count back from the cores (-1 = all"),
    (JOBLIB, "hydra.launcher.backend=threading", "hydra.launcher.backend='threading': must be 'loky' or null"),
    (JOBLIB, "hydra.launcher.prefer=gpus", "hydra.launcher.prefer='gpus': must be 'processes' or 'threads'"),
    (JOBLIB, "hydra.launcher.require=sharedmem", "hydra.launcher.require='sharedmem': must be null"),
    (JOBLIB, "hydra.launcher.verbose=-1", "hydra.launcher.verbose=-1: must be an int >= 0"),
    (JOBLIB, "hydra.launcher.timeout=0", "hydra.launcher.timeout=0.0: must be null or a number > 0 (seconds"),
    (JOBLIB, "hydra.launcher.pre_dispatch=0", "hydra.launcher.pre_dispatch=0: must be 'all', an int >= 1"),
    (JOBLIB, "hydra.launcher.batch_size=0", "hydra.launcher.batch_size=0: must be 'auto' or an int >= 1"),
    (JOBLIB, "hydra.launcher.max_nbytes=1X", "hydra.launcher.max_nbytes='1X': must be null, a number of bytes, or a "
                                             "size such as '1M'"),
    (JOBLIB, "hydra.launcher.mmap_mode=rw",
     "hydra.launcher.mmap_mode='rw': must be null or 'r+' or 'r' or 'w+' or 'c'"),
    (SLURM, "hydra.launcher.timeout_min=-5", "hydra.launcher.timeout_min=-5: must be an int >= 0 (minutes"),
    (SLURM, "hydra.launcher.nodes=0", "hydra.launcher.nodes=0: must be an int >= 1"),
    (SLURM, "hydra.launcher.tasks_per_node=0", "hydra.launcher.tasks_per_node=0: must be an int >= 1"),
    (SLURM, "hydra.launcher.gpus_per_node=-1", "hydra.launcher.gpus_per_node=-1: must be null or an int >= 0"),
    (SLURM, "hydra.launcher.gpus_per_task=-1", "hydra.launcher.gpus_per_task=-1: must be null or an int >= 0"),
    (SLURM, "hydra.launcher.cpus_per_task=0", "hydra.launcher.cpus_per_task=0: must be null or an int >= 1"),
    (SLURM, "hydra.launcher.cpus_per_gpu=0", "hydra.launcher.cpus_per_gpu=0: must be null or an int >= 1"),
    (SLURM, "hydra.launcher.mem_gb=-4", "hydra.launcher.mem_gb=-4: must be null or an int >= 0 (GB per node"),
    (SLURM, "hydra.launcher.mem_per_cpu=-1G", "hydra.launcher.mem_per_cpu='-1G': must be null or a size as sbatch "
                                             "reads it"),
    (SLURM, "hydra.launcher.mem_per_gpu=4GiB", "hydra.launcher.mem_per_gpu='4GiB': must be null or a size"),
    (SLURM, "hydra.launcher.signal_delay_s=-1", "hydra.launcher.signal_delay_s=-1: must be an int in [0, 65535]"),
    (SLURM, "hydra.launcher.max_num_timeout=-1", "hydra.launcher.max_num_timeout=-1: must be an int >= 0"),
    (SLURM, "hydra.launcher.array_parallelism=-1", "hydra.launcher.array_parallelism=-1: must be an int >= 1"),
    (BASIC_SWEEPER, "hydra.sweeper.max_batch_size=0", "hydra.sweeper.max_batch_size=0: must be null or an int >= 1"),
    (OPTUNA, "hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=0: must be an int >= 1"),
    (SEEDS, "hydra.sweeper.first=1", "hydra.sweeper.first=1: must be an int in [2, 1000]"),
    (SEEDS, "hydra.sweeper.step=0", "hydra.sweeper.step=0: must be an int >= 1"),
    (SEEDS, "hydra.sweeper.max=1", "hydra.sweeper.max=1: must be an int in [2, 1000]"),
    (SEEDS, "hydra.sweeper.alpha=1", "hydra.sweeper.alpha=1: must be a number in (0, 1)"),
    (OPTUNA, "hydra.sweeper.n_jobs=0", "hydra.sweeper.n_jobs=0: must be an int >= 1"),  # was a search without end
    (OPTUNA, "hydra.sweeper.direction=up", "hydra.sweeper.direction='up': must be 'maximize' or 'minimize'"),
    (TPE, "hydra.sweeper.sampler.seed=-1", "hydra.sweeper.sampler.seed=-1: must be null or an int in [0, 4294967295]"),
    (TPE, "hydra.sweeper.sampler.n_startup_trials=-1",
     "hydra.sweeper.sampler.n_startup_trials=-1: must be an int >= 0"),
    (TPE, "+hydra.sweeper.sampler.n_ei_candidates=0", "hydra.sweeper.sampler.n_ei_candidates=0: must be an int >= 1"),
    (TPE, "+hydra.sweeper.sampler.prior_weight=0",
     "hydra.sweeper.sampler.prior_weight=0: must be null or a number > 0"),
    (RANDOM, "hydra.sweeper.sampler.seed=4294967296", "hydra.sweeper.sampler.seed=4294967296: must be null or an int"),
    (MEDIAN, "hydra.sweeper.pruner.n_startup_trials=-1",
     "hydra.sweeper.pruner.n_startup_trials=-1: must be an int >= 0"),
    (MEDIAN, "hydra.sweeper.pruner.n_warmup_steps=-1", "hydra.sweeper.pruner.n_warmup_steps=-1: must be an int >= 0"),
    (MEDIAN, "+hydra.sweeper.pruner.interval_steps=0", "hydra.sweeper.pruner.interval_steps=0: must be an int >= 1"),
    (MEDIAN, "+hydra.sweeper.pruner.n_min_trials=0", "hydra.sweeper.pruner.n_min_trials=0: must be an int >= 1"),
    (HALVING, "hydra.sweeper.pruner.min_resource=0",
     "hydra.sweeper.pruner.min_resource=0: must be 'auto' or an int >= 1"),
    (HALVING, "hydra.sweeper.pruner.reduction_factor=1",
     "hydra.sweeper.pruner.reduction_factor=1: must be an int >= 2"),
    (HALVING, "+hydra.sweeper.pruner.min_early_stopping_rate=-1",
     "hydra.sweeper.pruner.min_early_stopping_rate=-1: must be an int >= 0"),
    (HALVING, "+hydra.sweeper.pruner.bootstrap_count=-1",
     "hydra.sweeper.pruner.bootstrap_count=-1: must be an int >= 0"),
    (HYPERBAND, "hydra.sweeper.pruner.min_resource=0", "hydra.sweeper.pruner.min_resource=0: must be an int >= 1"),
    (HYPERBAND, "hydra.sweeper.pruner.max_resource=soon",
     "hydra.sweeper.pruner.max_resource='soon': must be 'auto' or"),
    (HYPERBAND, "hydra.sweeper.pruner.reduction_factor=0",
     "hydra.sweeper.pruner.reduction_factor=0: must be an int >= 2"),
    (HYPERBAND, "+hydra.sweeper.pruner.bootstrap_count=-2",
     "hydra.sweeper.pruner.bootstrap_count=-2: must be an int >= 0"),
]
# Rules that read two settings at once.
ACROSS = [
    (["seeds=auto", "hydra.sweeper.first=5", "hydra.sweeper.max=4"],
     "hydra.sweeper.max=4 with hydra.sweeper.first=5: a row cannot start with more seeds than it may reach"),
    (["launcher=slurm", "hydra.launcher.timeout_min=2"],
     "hydra.launcher.signal_delay_s=120 with hydra.launcher.timeout_min=2: SLURM would signal each job"),
    (["hparams_search=optuna", "hydra/sweeper/pruner=successive_halving", "hydra.sweeper.pruner.min_resource=auto",
      "+hydra.sweeper.pruner.bootstrap_count=2"],
     "hydra.sweeper.pruner.bootstrap_count=2 with hydra.sweeper.pruner.min_resource='auto': Optuna needs"),
    (["hparams_search=optuna", "hydra/sweeper/pruner=hyperband", "hydra.sweeper.pruner.min_resource=4",
      "trainer.max_epochs=3"],
     "hydra.sweeper.pruner.max_resource=3 with hydra.sweeper.pruner.min_resource=4: Hyperband would have no bracket"),
]


def composed(*overrides: str) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def numeric_settings(node: DictConfig) -> set[str]:
    """The settings that hold numbers: from the node's config class where it has one (a launcher plugin's dataclass),
    from the class it instantiates (Optuna's samplers and pruners), else from the values composed."""
    kind = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return {f.name for f in dataclasses.fields(kind) if {int, float} & set(typing.get_args(hints[f.name])
                                                                                   or (hints[f.name],))}
    if str(node.get("_target_", "")).startswith("optuna."):
        def numeric(annotation: typing.Any) -> bool:  # 'int | None', 'str | int', int; not 'Callable[[int], int]'
            written = str(getattr(annotation, "__name__", annotation))
            return bool({"int", "float"} & {a.strip() for a in written.split("|")})

        return {n for n, p in inspect.signature(get_class(node._target_)).parameters.items() if numeric(p.annotation)}
    return {k for k, v in node.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.fixture(autouse=True)
def slurm_commands_that_tell(tmp_path, monkeypatch):
    """SLURM's commands first on the PATH, each leaving a mark when called: no refused sweep reaches SLURM."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("sbatch", "squeue", "sacct", "scontrol"):
        (fake / name).write_text(f"#!/bin/sh\ntouch '{tmp_path}/{name} was called'\nexit 1\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    yield
    assert not list(tmp_path.glob("* was called"))


def refusal(tmp_path, *overrides: str, data: str = "data=synthetic") -> str:
    """The one line a sweep with these overrides is refused with; checks it made no sweep folder."""
    sweep = tmp_path / "sweep"
    result = run_cli("-m", data, *overrides, f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert not sweep.exists()  # refused before Hydra made it, before anything was submitted
    return line


def owners() -> dict[str, DictConfig]:
    """Each launcher, sweeper, sampler and pruner the project offers, as composed with its option's defaults."""
    found = {}
    for picks in ([f"launcher={n}" for n in option_names("launcher")] + ["seeds=auto"]
                  + [f"hydra/sweeper/sampler={n}" for n in option_names("hydra/sweeper/sampler")]
                  + [f"hydra/sweeper/pruner={n}" for n in option_names("hydra/sweeper/pruner")]):
        overrides = [picks] if picks.startswith(("launcher=", "seeds=")) else ["hparams_search=optuna", picks]
        for _, node in nodes(composed(*overrides)):
            found[str(node._target_)] = node
    return found


def test_every_numeric_setting_of_each_launcher_sweeper_sampler_and_pruner_has_a_rule_and_a_case():
    found = owners()
    assert {JOBLIB, SLURM, BASIC_SWEEPER, OPTUNA, SEEDS, TPE, RANDOM, MEDIAN, HALVING, HYPERBAND} <= set(found)
    cased = {(owner, line.lstrip("+").split("=", 1)[0].rsplit(".", 1)[1]) for owner, line, _ in BAD}
    for target, node in found.items():
        numeric = numeric_settings(node)
        ruled = set(RULES.get(target, {}))
        assert numeric <= ruled, f"{target}: no rule for {sorted(numeric - ruled)}"
        assert {(target, k) for k in ruled} <= cased, f"{target}: a rule without a case here"
    assert {"n_jobs", "timeout", "verbose"} <= numeric_settings(found[JOBLIB])  # the derivation finds what it should
    assert {"timeout_min", "mem_gb", "array_parallelism", "signal_delay_s"} <= numeric_settings(found[SLURM])


SHIPPED = [[f"launcher={n}"] for n in option_names("launcher")] + [["seeds=auto"]] + [
    ["hparams_search=optuna", f"hydra/sweeper/sampler={s}", f"hydra/sweeper/pruner={p}"]
    for s in option_names("hydra/sweeper/sampler") for p in option_names("hydra/sweeper/pruner")]


@pytest.mark.parametrize("overrides", SHIPPED, ids=" ".join)
def test_every_option_as_shipped_passes(overrides):
    assert mistake(composed(*overrides)) is None


@pytest.mark.parametrize("owner, bad, line", BAD, ids=[f"{o.rsplit('.', 1)[1]} {b}" for o, b, _ in BAD])
def test_a_setting_out_of_range_is_refused_in_one_line_before_the_sweep_folder(tmp_path, owner, bad, line):
    assert refusal(tmp_path, *PICK[owner], bad).startswith(f"error: {line}")


@pytest.mark.parametrize("overrides, line", ACROSS, ids=[o[-1] for o, _ in ACROSS])
def test_settings_that_contradict_each_other_are_refused_naming_both(tmp_path, overrides, line):
    assert refusal(tmp_path, *overrides).startswith(f"error: {line}")


def test_slurm_resources_in_range_are_still_checked_against_the_trainer(tmp_path):
    assert refusal(tmp_path, "launcher=slurm", "hydra.launcher.tasks_per_node=2") == (
        "error: hydra.launcher.tasks_per_node=2 with trainer.strategy=auto: each task would train the whole job alone, "
        "in one folder; use trainer=ddp trainer.devices=2, or hydra.launcher.tasks_per_node=1")


@pytest.mark.parametrize("good", [
    ["launcher=parallel", "hydra.launcher.n_jobs=-1", "hydra.launcher.pre_dispatch=all", "hydra.launcher.batch_size=4",
     "hydra.launcher.max_nbytes=1M", "hydra.launcher.timeout=600"],
    ["launcher=slurm", "trainer.accelerator=cpu", "hydra.launcher.gpus_per_node=0", "hydra.launcher.timeout_min=0",
     "hydra.launcher.mem_gb=0", "hydra.launcher.mem_per_cpu=4G", "hydra.launcher.signal_delay_s=0"],
    ["hparams_search=optuna", "hydra.sweeper.n_jobs=4", "hydra.sweeper.sampler.seed=null",
     "hydra/sweeper/pruner=hyperband", "hydra.sweeper.pruner.max_resource=auto"],
], ids=["joblib", "slurm", "optuna"])
def test_values_in_range_pass_the_check(tmp_path, good):
    """They go on to the next check before the folder, the data (missing here), so that nothing trains or is
    submitted."""
    missing = tmp_path / "no-data"
    line = refusal(tmp_path, *good, f"data.root={missing}", "data.download=false", data="data=cifar10")
    assert line.startswith(f"error: CIFAR-10 not found: looked for {missing}")
