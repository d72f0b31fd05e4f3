"""A search trial's job (`trial=<n>`, set by the search for each of its jobs): after each epoch's validation it
reports val/acc to its trial in the study, and when the study's pruner says so the run stops at that epoch's end, as
a finished run marked pruned (train.py: metrics.json says `pruned` and its last epoch; no test set is scored).

Why not optuna-integration's PyTorchLightningPruningCallback: in one process it raises TrialPruned from inside
Lightning's validation hook, so Lightning takes its failure path (loggers finalized as failed, the epoch's checkpoint
and epoch-end logging skipped), and across processes it accepts only a database storage. This one stops the run as
Lightning's own EarlyStopping does (trainer.should_stop), on rank 0's decision. docs/guide.md, "Hyperparameter search".
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("cifarlab")


class Pruning(L.Callback):
    def __init__(self, trial: optuna.Trial, monitor: str = "val/acc") -> None:
        self.trial, self.monitor = trial, monitor
        self.pruned_after: int | None = None  # the epoch the pruner stopped the run after

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch, stop = trainer.current_epoch + 1, False  # steps are epochs done: 1 after the first
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.is_global_zero and value is not None:
            with warnings.catch_warnings():  # a continued trial reports again the epochs its checkpoint repeats
                warnings.filterwarnings("ignore", message=".*is already reported")
                self.trial.report(float(value), epoch)
            stop = epoch < trainer.max_epochs and self.trial.should_prune()
        if trainer.strategy.broadcast(stop):  # every rank stops, or none
            trainer.should_stop = True
            self.pruned_after = epoch
            log.info("trial %d pruned after epoch %d (val/acc %.4f): below what the pruner keeps", self.trial.number,
                     epoch, float(value) if value is not None else float("nan"))


def callbacks(trial_number: int | None) -> list[L.Callback]:
    """The pruning callback of a search trial's job (none outside a search): its trial in the sweep's study. Every
    rank of a DDP job gets one: each takes part in the pruning decision."""
    if trial_number is None:
        return []
    from hydra.core.hydra_config import HydraConfig

    from cifarlab.search import study as search_study  # optuna: only in a search

    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.runtime.output_dir).parent  # absolute, on whichever machine the launcher chose
    return [Pruning(search_study.job_trial(hydra_cfg.sweeper, sweep_dir, trial_number))]


def pruned_after(trainer: L.Trainer) -> int | None:
    """The epoch a search's pruner stopped this run after; None when it ran to its end."""
    return next((c.pruned_after for c in trainer.callbacks if isinstance(c, Pruning)), None)
