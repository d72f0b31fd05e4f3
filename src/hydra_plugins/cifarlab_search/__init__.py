"""cifarlab's sweepers as Hydra plugins: the Optuna search (configs/hydra/sweeper/optuna.yaml) and seeds=auto
(configs/hydra/sweeper/seeds.yaml).

Hydra accepts plugins only from this namespace; the sweeps themselves are src/cifarlab/search/optuna_sweep.py and
src/cifarlab/sweep/seeds.py. Hydra imports this module on every start to find its plugins, so it imports neither
Optuna nor torch.
"""

from __future__ import annotations

from typing import Any, List

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """hydra.sweeper: direction, study_name, storage, n_trials, n_jobs, params (the search space), and the sampler
    and pruner, which Hydra has instantiated from their _target_."""

    def __init__(self, sampler: Any, pruner: Any, **settings: Any) -> None:
        self.sampler, self.pruner, self.settings = sampler, pruner, settings

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from cifarlab.search import optuna_sweep as search
        from cifarlab.errors import UserError, refuse

        try:
            return search.run(self, arguments)
        except UserError as e:  # a mistake in the search space, or a study in use: one line, as cifarlab-train says it
            refuse(str(e), e.exit_status)


class SeedsSweeper(Sweeper):
    """hydra.sweeper for seeds=auto: first, step, max, alpha, baseline, and params (the grid, as Hydra's basic
    sweeper takes it)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from cifarlab.errors import UserError, refuse
        from cifarlab.sweep import seeds

        try:
            return seeds.run(self, arguments)
        except UserError as e:  # a setting out of range, or no baseline row: one line, as cifarlab-train says it
            refuse(str(e), e.exit_status)
