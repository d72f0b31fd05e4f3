"""The Lightning half of prepare.py: the datamodule, the module, the callbacks, loggers and trainer the config names,
each instantiated once; a mistake Lightning finds in its own arguments is refused naming the config key."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from cifarlab.build import first_line
from cifarlab.checkpoint import AtomicCheckpointIO, ResumePoint
from cifarlab.data.cifar10 import CifarArrays
from cifarlab.data.datamodule import CifarDataModule
from cifarlab.errors import ConfigError
from cifarlab.module import CifarModule
from cifarlab.progress import EpochSummary, StopOnNonFiniteLoss

# Lightning's advertising, its notes on what it does by design here, and a deprecation inside Lightning itself.
NOISE = ("💡 Tip", "Trainer already configured with model summary", "Loading `train_dataloader` to estimate")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: not str(r.msg).startswith(NOISE))
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# Given only outside any SLURM job, where srun is installed (a login node): cifarlab reaches SLURM with launcher=slurm.
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")


@dataclass
class Prepared:
    """Every object of one run, built from its config before it starts (prepare.py)."""

    cfg: DictConfig  # the config as checked and settled (absolute paths)
    started: float  # time.perf_counter() when preparing began: metrics.json's wall_s counts from it
    model: nn.Module
    arrays: CifarArrays
    datamodule: CifarDataModule
    module: CifarModule
    trainer: L.Trainer
    summary: EpochSummary
    choices: dict[str, Any]
    precision: str
    precision_why: str  # what trainer.precision=auto decided by, or the setting itself; the run's first lines say it
    sha: str


def instantiated(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """Hydra's instantiate, its failure as one line naming the key (the cause, not Hydra's wrapper)."""
    try:
        return instantiate(node, **kwargs)
    except Exception as e:
        cause = e.__cause__ or e
        raise ConfigError(f"{key} ({node.get('_target_')}): {type(cause).__name__}: {first_line(cause)}") from None


def assemble(cfg: DictConfig, run_dir: Path, started: float, model: nn.Module, optimizer: Callable, scheduler: Callable | None,
             arrays: CifarArrays, n_val: int, choices: dict[str, Any], sha: str, precision: tuple[str, str],
             extra_callbacks: Sequence[L.Callback] = ()) -> Prepared:
    datamodule = CifarDataModule(arrays, n_val=n_val, split_seed=cfg.data.split_seed, batch_size=cfg.data.batch_size,
                                 eval_batch_size=cfg.data.eval_batch_size, normalize=cfg.data.normalize,
                                 flip=cfg.data.augment.flip, crop_padding=cfg.data.augment.crop_padding, seed=cfg.seed,
                                 channels_last=cfg.channels_last)
    module = CifarModule(model, optimizer, scheduler, label_smoothing=cfg.label_smoothing,
                         channels_last=cfg.channels_last, test_flips=cfg.test_flips, test_shift=cfg.test_shift,
                         compile=cfg.compile)
    summary = EpochSummary()
    callbacks = [instantiated(node, f"callbacks.{name}") for name, node in cfg.callbacks.items() if node is not None]
    # always on: the epoch lines and timing, the stop at a NaN loss, what resume= needs in every checkpoint
    callbacks += [summary, StopOnNonFiniteLoss(), *extra_callbacks, ResumePoint(sha)]
    loggers = [instantiated(node, f"logger.{name}", save_dir=str(run_dir))
               for name, node in cfg.logger.items() if node is not None]
    trainer = instantiated(cfg.trainer, "trainer", precision=precision[0], logger=loggers, callbacks=callbacks,
                           default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()])
    return Prepared(cfg=cfg, started=started, model=model, arrays=arrays, datamodule=datamodule, module=module,
                    trainer=trainer, summary=summary, choices=choices, precision=precision[0],
                    precision_why=precision[1], sha=sha)
