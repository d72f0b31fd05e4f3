"""An Optuna study on disk, as the search's sweeper and its jobs share it: where it is stored, its pruner, the
search space parsed from Hydra's sweep syntax, and the one trial a job reports to.

The study is Optuna's journal file <sweep>/study.journal by default: an append-only log under a file lock, so jobs in
other processes (launcher=parallel) or on other machines of a shared file system (launcher=slurm) report to it
safely, with no database server. `hydra.sweeper.storage` may name another journal file or an RDB URL instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.types import Override, Transformer
from omegaconf import DictConfig
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from cifarlab.errors import ConfigError
from cifarlab.schema import fmt

JOURNAL = "study.journal"
FOLDER = "job_folder"  # user attribute of a trial: its job folder (an asked-again trial continues the old one's)
TAGS = ("log",)  # what tag(...) may say on a search parameter


def storage_of(sweeper: DictConfig, sweep_dir: Path) -> Any:
    """hydra.sweeper.storage as Optuna takes it: null -> the journal file in the sweep folder; a path ending in
    .journal or .log -> that journal file; anything else (sqlite:///..., postgresql://...) -> an RDB URL."""
    given = sweeper.get("storage")
    if given is None or str(given).endswith((".journal", ".log")):
        path = Path(str(given)).expanduser().resolve() if given else sweep_dir.resolve() / JOURNAL
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return str(given)


def storage_file(sweeper: DictConfig, sweep_dir: Path) -> Path:
    """The file the study lives in (the sweep folder for a database server): what a sweep locks."""
    given = sweeper.get("storage")
    if given is None:
        return sweep_dir.resolve() / JOURNAL
    text = str(given)
    if text.startswith("sqlite:///"):
        return Path(text.removeprefix("sqlite:///")).expanduser().resolve()
    return Path(text).expanduser().resolve() if "://" not in text else sweep_dir.resolve() / "study"


def pruner(node: DictConfig | None) -> optuna.pruners.BasePruner:
    """hydra.sweeper.pruner (configs/hydra/sweeper/pruner/): the pruner a search trial's job judges itself with, the
    one the sweep's study uses (Optuna does not store it with the study)."""
    from hydra.utils import instantiate

    if not node:
        return optuna.pruners.NopPruner()
    if not str(node.get("_target_", "")).startswith("optuna.pruners."):
        raise ConfigError(f"hydra.sweeper.pruner._target_={fmt(node.get('_target_'))}: not an Optuna pruner "
                          "(allowed: optuna.pruners.*)")
    return instantiate(node)


def job_trial(sweeper: DictConfig, sweep_dir: Path, number: int) -> optuna.Trial:
    """Trial `number` of the sweep's study, as the job that runs it reports to it: the study opened with the sweep's
    pruner (Optuna does not store it), the trial found through the storage's public API."""
    storage = optuna.storages.get_storage(storage_of(sweeper, sweep_dir))
    study = optuna.load_study(study_name=sweeper.study_name, storage=storage, pruner=pruner(sweeper.get("pruner")))
    study_id = storage.get_study_id_from_name(sweeper.study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


# ---------------------------------------------------------------------------------------------------------------
# The search space: Hydra's sweep syntax, as the Optuna sweeper plugin read it, into Optuna's distributions.


def distribution(override: Override) -> BaseDistribution | None:
    """choice(a,b) -> categorical; interval(lo,hi) -> float, int(interval(lo,hi)) -> int, tag(log, ...) on a log
    scale; range(lo,hi,step) -> int or float with that step (hi excluded, as Hydra reads it); a plain value: None."""
    key, value = override.get_key_element(), override.value()
    if not override.is_sweep_override():
        return None
    tags = set(getattr(value, "tags", ()) or ())
    if tags - set(TAGS):
        raise ConfigError(f"{key}: tag({', '.join(sorted(tags))}, ...) is not a search tag; allowed: "
                          f"{', '.join(TAGS)}")
    log = "log" in tags
    if override.is_choice_sweep():
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if log:
            raise ConfigError(f"{key}: tag(log, ...) applies to interval(...) only, not to choice(...)")
        return CategoricalDistribution(choices)
    if override.is_interval_sweep():
        lo, hi = value.start, value.end
        if not lo < hi or (log and lo <= 0):
            raise ConfigError(f"{override.input_line}: needs low < high{' and low > 0 on a log scale' if log else ''}")
        if isinstance(lo, int) and isinstance(hi, int):
            return IntDistribution(lo, hi, log=log)
        return FloatDistribution(float(lo), float(hi), log=log)
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if log or len(values) < 2:
            raise ConfigError(f"{key}: range(...) needs two values or more and no log tag; use "
                              "tag(log, interval(lo, hi)) for a log scale")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=values[1] - values[0])
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(values[1] - values[0]))
    raise ConfigError(f"{key}: {override.input_line} is not a search space; use choice, interval, range or tag(log, ...)")


def as_override(key: str, value: Any) -> str:
    """A sampled value as a command-line override (a categorical value is already in override syntax)."""
    if isinstance(value, bool) or value is None:
        return f"{key}={'null' if value is None else str(value).lower()}"
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def endpoints(space: dict[str, BaseDistribution]) -> list[dict[str, Any]]:
    """Parameter sets that reach every bound and every choice of the space: what is checked before any trial."""
    def ends(d: BaseDistribution) -> list[Any]:
        return list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]

    lows = {k: ends(d)[0] for k, d in space.items()}
    sets = [lows, {k: ends(d)[-1] for k, d in space.items()}]
    sets += [{**lows, k: v} for k, d in space.items() for v in ends(d)[1:-1]]
    return sets
