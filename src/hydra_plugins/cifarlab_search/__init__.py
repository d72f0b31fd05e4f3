"""cifarlab's sweepers as Hydra plugins: the Optuna search (configs/hydra/sweeper/optuna.yaml) and seeds=auto
(configs/hydra/sweeper/seeds.yaml).

Hydra accepts plugins only from this namespace; the sweeps themselves are src/cifarlab/search/optuna_sweep.py and
src/cifarlab/sweep/seeds.py. Hydra imports this module on every start to find its plugins, so it imports neither
Optuna nor torch.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, List

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class LaunchingSweeper(Sweeper):
    """What both sweepers share: the launcher Hydra configured (basic, parallel, slurm), and a cifarlab mistake
    (a setting out of range, a study in use) ending the sweep in one line, as cifarlab-train says it. Abstract, so
    Hydra does not list it as a plugin of its own."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from cifarlab.errors import UserError, refuse

        try:
            return self.run_sweep(arguments)
        except UserError as e:
            refuse(str(e), e.exit_status)

    @abstractmethod
    def run_sweep(self, arguments: List[str]) -> Any: ...


class OptunaSweeper(LaunchingSweeper):
    """hydra.sweeper: direction, study_name, storage, n_trials, n_jobs, params (the search space), and the sampler
    and pruner, which Hydra has instantiated from their _target_."""

    def __init__(self, sampler: Any, pruner: Any, **settings: Any) -> None:
        self.sampler, self.pruner, self.settings = sampler, pruner, settings

    def run_sweep(self, arguments: List[str]) -> Any:
        from cifarlab.search import optuna_sweep

        return optuna_sweep.run(self, arguments)


class SeedsSweeper(LaunchingSweeper):
    """hydra.sweeper for seeds=auto: first, step, max, alpha, baseline, and params (the grid, as Hydra's basic
    sweeper takes it)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def run_sweep(self, arguments: List[str]) -> Any:
        from cifarlab.sweep import seeds

        return seeds.run(self, arguments)
