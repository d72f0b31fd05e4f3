"""`cifarlab-train -m hparams_search=<name>`: an Optuna study run as a Hydra sweep (the sweeper plugin in
src/hydra_plugins/cifarlab_search/ calls this). Each trial is a job of Hydra's launcher (basic, parallel or slurm) in
a folder of its own; the job reports val/acc per epoch to its trial, and the study's pruner may stop it (sweep/job.py,
trial.py).

search space (hydra.sweeper.params and the command line, checked at every bound) -> the study, held by this sweep
alone -> trials that a killed sweep left running marked failed and asked again, in their own folders -> batches of
n_jobs trials until the study holds n_trials finished, pruned or failed ones -> the best trial, and Optuna's plots.
Running the same command again continues the study; a larger n_trials extends it. Why a sweeper of our own, and
the numbers: docs/guide.md, "Hyperparameter search".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState

from cifarlab.search import study as search_study
from cifarlab.search.study import FOLDER
from cifarlab.errors import ConfigError, RunFolderError
from cifarlab.run_folder import FAILED, FINISHED, holder

log = logging.getLogger("cifarlab")
INTERRUPTED = "interrupted"  # user attribute of a failed trial that a killed sweep left running: asked again
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@contextlib.contextmanager
def held(lock: Path):
    """This sweep alone writes the study: an exclusive lock the system drops when the process dies (a kill too)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = Path(lock).read_text().strip() or "another process"
        os.close(fd)
        raise RunFolderError(f"{lock.parent}: another sweep is writing this study ({other}); wait for it to end, "
                             "or stop it and run the command again to continue") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{holder()}\n".encode())
    try:
        yield
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)


def parse_space(params: dict[str, Any] | None, arguments: Sequence[str], config_loader: Any
                ) -> tuple[dict[str, Any], list[str]]:
    """({key: Optuna distribution}, fixed overrides every trial gets) from hydra.sweeper.params and the command
    line (a sweep there, `model/pool=max,avg`, is searched too)."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    space, fixed = {}, []
    for override in OverridesParser.create(config_loader=config_loader).parse_overrides(lines):
        found = search_study.distribution(override)
        if found is None:
            fixed.append(override.input_line)
        else:
            space[override.get_key_element()] = found
    if not space:
        raise ConfigError("hydra.sweeper.params: the search space is empty; give it keys such as "
                          "optimizer.lr: tag(log, interval(0.0003, 0.01))")
    return space, fixed


def check_space(space: dict[str, Any], fixed: list[str], config_loader: Any, master: DictConfig) -> None:
    """Every bound and choice composed and checked as a run checks its config, before the study or a folder: a
    search that would fail some trials is refused, naming the parameter."""
    from cifarlab import build, cli, schema  # torch: only for a search

    for values in search_study.endpoints(space):
        overrides = [*fixed, *(search_study.as_override(k, v) for k, v in values.items())]
        def compose_with(overrides: list[str]) -> DictConfig:
            return config_loader.load_sweep_config(master_config=master, sweep_overrides=overrides)

        try:  # Hydra's refusals (an unknown key, a wrong type) in one line, as cifarlab-train gives them
            cfg = compose_with(overrides)
        except Exception as e:
            error = cli.refusal(e, overrides, compose_with)
            if error is None:
                raise
            raise ConfigError(f"the search space: {error}") from None
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            build.check_targets(schema.check(cfg))
            build.network(cfg.model)
        except ConfigError as e:
            raise ConfigError(f"hydra.sweeper.params: at {', '.join(f'{k}={v}' for k, v in values.items())}: {e}"
                              ) from None


def reopen_interrupted(study: optuna.Study) -> int:
    """Trials left running by a sweep that was killed: failed, and the same parameters asked again in the same job
    folder (the job continues from its checkpoint). Returns how many."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        study.set_user_attr(f"trial_{t.number}", INTERRUPTED)
        study.enqueue_trial(t.params, user_attrs={FOLDER: t.user_attrs.get(FOLDER), "continues": t.number,
                                                  "intermediate": {str(s): v for s, v in
                                                                   t.intermediate_values.items()}})
        log.warning("trial %d was running when the sweep stopped: asked again, continuing its folder %s",
                    t.number, t.user_attrs.get(FOLDER))
    return len(stale)


def counted(study: optuna.Study) -> int:
    """The trials n_trials counts: finished, pruned, or failed by their job (not those a killed sweep left)."""
    interrupted = {int(k.removeprefix("trial_")) for k, v in study.user_attrs.items() if v == INTERRUPTED}
    return sum(1 for t in study.get_trials(deepcopy=False, states=COUNTED) if t.number not in interrupted)


def ask(study: optuna.Study, space: dict[str, Any], fixed: list[str]) -> tuple[optuna.Trial, list[str]]:
    """A trial and its job's overrides: its parameters, its number (`trial=`), its folder."""
    trial = study.ask(space)
    folder = trial.user_attrs.get(FOLDER) or f"trial_{trial.number:03d}"
    trial.set_user_attr(FOLDER, folder)
    for step, value in sorted((int(s), v) for s, v in trial.user_attrs.get("intermediate", {}).items()):
        trial.report(value, step)  # the epochs its stopped attempt reported: the pruner keeps judging them
    overrides = [*fixed, f"trial={trial.number}", *(search_study.as_override(k, v) for k, v in trial.params.items()),
                 f"hydra.sweep.subdir={folder}"]
    return trial, overrides


def tell(study: optuna.Study, trial: optuna.Trial, folder: Path) -> str:
    """The job's outcome, from its folder (any launcher's, on any machine that shares it): what it did, in words."""
    metrics = json.loads((folder / FINISHED).read_text()) if (folder / FINISHED).exists() else None
    value = metrics.get("best_val_acc") if metrics else None
    if metrics and metrics.get("pruned"):
        study.tell(trial, state=TrialState.PRUNED)
        return f"pruned after epoch {metrics['epochs']}"
    if value is not None and math.isfinite(value):
        study.tell(trial, value)
        return f"val/acc {value:.4f}"
    error = json.loads((folder / FAILED).read_text())["error"] if (folder / FAILED).exists() else "did not finish"
    trial.set_user_attr("error", error)
    study.tell(trial, state=TrialState.FAIL)
    return f"failed: {error}"


def run(sweeper: Any, arguments: list[str]) -> list[Any]:
    """The search: what the sweeper plugin's sweep() does."""
    cfg, loader = sweeper.config, sweeper.hydra_context.config_loader
    sweep_dir, settings = Path(cfg.hydra.sweep.dir).resolve(), cfg.hydra.sweeper
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this sweep says what each trial did, in its own words
    space, fixed = parse_space(settings.params, arguments, loader)
    check_space(space, fixed, loader, cfg)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lock = search_study.storage_file(settings, sweep_dir)
    returns = []
    with held(lock.with_name(lock.name + ".owner")):
        OmegaConf.save(cfg, sweep_dir / "multirun.yaml")
        study = optuna.create_study(study_name=settings.study_name, storage=search_study.storage_of(settings, sweep_dir),
                                    sampler=sweeper.sampler, pruner=sweeper.pruner, direction=settings.direction,
                                    load_if_exists=True)
        reopen_interrupted(study)
        done = counted(study)
        if done >= settings.n_trials:
            log.info("the study holds %d counted trials already (n_trials=%d); raise hydra.sweeper.n_trials to "
                     "extend it", done, settings.n_trials)
        while (done := counted(study)) < settings.n_trials:
            batch = [ask(study, space, fixed) for _ in range(min(settings.n_jobs, settings.n_trials - done))]
            sweeper.validate_batch_is_legal([o for _, o in batch])
            results = sweeper.launcher.launch([o for _, o in batch], initial_job_idx=len(study.trials) - len(batch))
            returns.append(results)
            for trial, overrides in batch:
                outcome = tell(study, trial, sweep_dir / overrides[-1].split("=", 1)[1])
                log.info("trial %d: %s", trial.number, outcome)
        from cifarlab.report import summary as report  # matplotlib: only at the end
        from cifarlab.search import plots as search_plots

        logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its reader logs every event file it opens

        search_plots.summarize(study, sweep_dir)
        report.report(sweep_dir)  # the table, and the plots into the sweep's report TensorBoard run
    return returns
