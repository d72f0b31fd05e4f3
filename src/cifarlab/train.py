"""cifarlab-train's run. Read top to bottom, it is the whole program:

prepare the run's objects (prepare.py: cifarlab-train did it before Hydra made the folder) -> continue from the last
checkpoint when resuming (resume=<run folder>) -> fit -> test the best (or last) checkpoint -> metrics.json and the
HParams session in the run folder.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from cifarlab import checkpoint, inspection, provenance
from cifarlab.model import count_parameters
from cifarlab.prepare import Prepared, cpu_bf16, prepare
from cifarlab.resume import continue_from, saved_run
from cifarlab.run_folder import (FINISHED, SAVED_CONFIG, atomic_write, claim, is_ddp_child, quiet_lightning_console,
                                 write_json)
from cifarlab.search.trial import pruned_after

log = logging.getLogger("cifarlab")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")  # a resumed run's


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: the logs are flushed and the last checkpoint is kept; the message says how to go on."""


def main(cfg: DictConfig, prepared: Prepared | None = None) -> float | None:
    """The run that cifarlab-train starts (cli.py) once Hydra has composed the config and made its folder (a sweep's
    jobs start in sweep/job.py)."""
    runtime = HydraConfig.get().runtime
    run_dir = Path(runtime.output_dir)
    option_names, overrides, resume = dict(runtime.choices), None, cfg.get("resume") is not None
    if resume:
        cfg, option_names, overrides = saved_run(run_dir)
    if is_ddp_child():  # Lightning runs this command again for DDP ranks 1..; rank 0 owns the folder
        run(cfg, run_dir, option_names, resume=resume, overrides=overrides)
        return None
    print_config_tree(prepared.cfg if prepared else cfg)
    with claim(run_dir):
        metrics = run(cfg, run_dir, option_names, resume=resume, overrides=overrides, prepared=prepared)
    source = "" if metrics["data_source"] == "cifar10" else f" on {metrics['data_source']}"
    best_val = "none kept" if metrics["best_val_acc"] is None else f"{metrics['best_val_acc']:.4f}"
    print(f"test/acc {metrics['test_acc']:.4f}{source} ({metrics['tested_checkpoint']} checkpoint; best val/acc "
          f"{best_val}, {metrics['params']:,} params, {metrics['epoch_s']:.1f} s/epoch)")
    shown = run_dir.relative_to(Path.cwd()) if run_dir.is_relative_to(Path.cwd()) else run_dir
    print(f"logs: {shown}  (TensorBoard: make tensorboard LOGDIR={shown})")
    return metrics["best_val_acc"]


def print_config_tree(cfg: DictConfig) -> None:
    from rich import print as rprint
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", style="bold")
    for key, node in cfg.items():
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        tree.add(f"[bold]{key}[/bold]").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    rprint(tree)


def run(cfg: DictConfig, run_dir: Path, option_names: dict[str, str] | None = None, resume: bool = False,
        overrides: list[str] | None = None, prepared: Prepared | None = None,
        extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train, test and record one run in run_dir; returns what metrics.json holds ({} on DDP ranks 1..).
    extra_callbacks: measuring tools (scripts/), beside the configured ones."""
    quiet_lightning_console()  # where Lightning was loaded just now: a sweep's job, a resumed run
    p = prepared or prepare(cfg, run_dir, option_names, resume=resume, extra_callbacks=extra_callbacks)
    log.info("precision: %s (%s)", p.precision, p.precision_why)
    ckpt_path = continue_from(run_dir, p.model, p.sha, owner=not is_ddp_child()) if resume else None
    if not (run_dir / SAVED_CONFIG).exists() and not is_ddp_child():  # what resume= continues with
        text = OmegaConf.to_yaml(p.cfg, resolve=True)
        atomic_write(run_dir / SAVED_CONFIG, lambda f: f.write(text.encode()))
    if p.arrays.source == "synthetic":
        log.warning("data=synthetic: training on made-up images, NOT CIFAR-10; no figure from this run means anything")
        writer = inspection.tensorboard(p.trainer)
        if writer is not None and ckpt_path is None:  # a resumed run labelled itself when it first started
            writer.add_text("data", "**SYNTHETIC DATA, NOT CIFAR-10**: made-up images from data=synthetic")
    fit(p, ckpt_path, run_dir)
    timing = p.summary.summary()  # before testing, which may load the best checkpoint's callback states
    pruned = pruned_after(p.trainer)  # a search trial its pruner stopped (search/trial.py)
    if pruned is None:
        tested, test, best = score_test_set(p, run_dir)
    else:  # a search's losing trial: scoring the test set would only cost time
        tested, test, best = None, {"test/acc": None, "test/loss": None}, best_kept(p)
    timing["test_img_per_s"] = p.summary.test_img_per_s
    if not p.trainer.is_global_zero:
        return {}
    metrics = results(p, run_dir, test, tested, best, timing, overrides, resume, time.perf_counter() - p.started)
    if p.cfg.get("trial") is not None:
        metrics.update(trial=p.cfg.trial, pruned=pruned is not None)  # pruned: `epochs` is where it stopped
    log_hparams(p.trainer, hparams(p, metrics), {k: metrics[k] for k in HPARAMS_METRICS})
    write_json(run_dir / FINISHED, metrics)  # last: its presence marks the run finished
    return metrics


def fit(p: Prepared, ckpt_path: str | None, run_dir: Path) -> None:
    try:
        p.trainer.fit(p.module, datamodule=p.datamodule, ckpt_path=ckpt_path)
    except SystemExit:
        if p.trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after flushing the loggers
            done = p.trainer.fit_loop.epoch_progress.current.completed
            saved = (f"checkpoints/{checkpoint.LAST} was written after epoch {done}" if done
                     else "no epoch had finished, so resuming starts it again")
            raise Interrupted(f"interrupted in epoch {p.trainer.current_epoch + 1} of {p.trainer.max_epochs}; logs "
                              f"flushed, {saved}. Continue with: cifarlab-train resume={run_dir}") from None
        raise


def best_kept(p: Prepared) -> tuple[str | None, float | None]:
    """(path, val/acc) of the best checkpoint callbacks.model_checkpoint kept, or (None, None)."""
    ckpt_cb = next((c for c in p.trainer.checkpoint_callbacks if c.monitor is not None), None)
    if ckpt_cb is None or not ckpt_cb.best_model_path:
        return None, None
    return ckpt_cb.best_model_path, float(ckpt_cb.best_model_score)


def score_test_set(p: Prepared, run_dir: Path) -> tuple[str, dict[str, float], tuple[str | None, float | None]]:
    """Test the checkpoint test_checkpoint names: best (the highest val/acc that callbacks.model_checkpoint kept)
    or last (the weights training ended with). Returns which was tested, the test metrics, and (best path, score)."""
    best_path, _ = best_kept(p)
    wanted = p.cfg.test_checkpoint
    tested = "best" if best_path and wanted == "best" else "last"
    if tested != wanted:
        log.warning("test_checkpoint=best, but no checkpoint keeps the best val/acc (callbacks.model_checkpoint "
                    "removed?): testing the weights training ended with; metrics.json says tested_checkpoint: last")
    try:
        test = p.trainer.test(p.module, datamodule=p.datamodule, verbose=False,
                              ckpt_path=best_path if tested == "best" else None)[0]
    except SystemExit:
        if p.trainer.interrupted:
            raise Interrupted("interrupted while testing; training had finished. Continue with: "
                              f"cifarlab-train resume={run_dir}") from None
        raise
    return tested, test, best_kept(p)


def results(p: Prepared, run_dir: Path, test: dict[str, float], tested: str, best: tuple[str | None, float | None],
            timing: dict[str, Any], overrides: list[str] | None, resume: bool, wall_s: float) -> dict[str, Any]:
    """What metrics.json holds."""
    trainer, dm, device = p.trainer, p.datamodule, p.trainer.strategy.root_device
    if overrides is None:  # as typed: an override may hold an interpolation that only resolves inside the run
        overrides = OmegaConf.to_container(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return {
        "test_acc": test["test/acc"],
        "test_loss": test["test/loss"],
        # per class, for the sweep report's per-class view; none for a pruned search trial, which is never tested
        "test_acc_class": {c: test[f"test/acc_class/{c}"] for c in dm.classes if f"test/acc_class/{c}" in test} or None,
        **({"test_acc_no_tta": test.get("test/acc_no_tta")} if p.module.tta else {}),
        "best_val_acc": best[1],
        "params": count_parameters(p.model),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        **timing,
        "data_source": p.arrays.source,
        "data_root": p.arrays.root,
        "n_train": len(dm.train_y), "n_val": len(dm.val_y), "n_test": len(dm.test_y),
        "seed": p.cfg.seed,
        "device": str(device),
        "precision": p.precision,
        "cpu_bf16": cpu_bf16(),  # what precision=auto decides by on a CPU
        "channels_last": p.cfg.channels_last,
        "compile": p.cfg.compile,
        "threads": torch.get_num_threads(),
        "choices": p.choices,
        "best_checkpoint": os.path.relpath(best[0], run_dir) if best[0] else None,
        "tested_checkpoint": tested,  # which weights test_acc scores: best (best_checkpoint) or last
        "overrides": overrides,
        "config_sha": p.sha,
        "resumed": resume,
        "wall_s": wall_s,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **provenance.stamp(device),  # versions, git commit and dirty flag, device_name
    }


# The HParams dashboard sorts its columns by name: the layer choices are capitalised so that they come first.
LAYER_COLUMNS = {"pool": "Pool", "activation": "Activation", "norm": "Norm", "dropout": "Dropout"}
HPARAMS_METRICS = ("test_acc", "best_val_acc", "params", "epoch_s")  # in the order the dashboard shows them


def hparams(p: Prepared, metrics: dict[str, Any]) -> dict[str, Any]:
    cfg = p.cfg
    return {
        **{LAYER_COLUMNS.get(k, f"model/{k}"): v for k, v in p.choices.items()},
        "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
        "lr": cfg.optimizer.lr,
        "weight_decay": cfg.optimizer.get("weight_decay"),
        "scheduler": (cfg.scheduler.get("_target_") or "none").rsplit(".", 1)[-1],
        "batch_size": cfg.data.batch_size,
        "epochs": cfg.trainer.max_epochs,
        "label_smoothing": cfg.label_smoothing,
        "augment": f"flip={str(cfg.data.augment.flip).lower()},crop={cfg.data.augment.crop_padding}",
        "seed": cfg.seed,
        "data_source": p.arrays.source,
        **{f"version/{k}": metrics[k] for k in ("python", *provenance.PACKAGES, "git_commit", "git_dirty",
                                                "device_name")},
    }


def log_hparams(trainer: L.Trainer, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
    """The run's choices with its real results, for the HParams dashboard (no placeholder hp_metric=-1)."""
    def plain(v: Any) -> int | float | str:
        if isinstance(v, bool) or v is None:
            return {True: "true", False: "false", None: "null"}[v]
        return v if isinstance(v, (int, float, str)) else str(v)

    clean = {k: plain(v) for k, v in hparams.items()}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(clean, {f"hparams/{k}": v for k, v in metrics.items() if v is not None})
            logger.finalize("success")  # after trainer.test the writer was reopened: close it, or nothing is flushed
