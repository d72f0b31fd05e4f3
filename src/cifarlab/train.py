"""cifarlab-train's run. Read top to bottom, it is the whole program:

compose the config (cli.py) -> check it and build the layer factories and model (config.py) -> load CIFAR-10 (data.py)
-> train and validate (module.py, Lightning) -> test the best checkpoint -> metrics.json in the run folder.

`cifarlab-train resume=<run folder>` continues a killed or interrupted run from its last checkpoint, in the same
folder, with the config it was started with (run_folder.py, checkpoint.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from cifarlab import checkpoint, checksums, config, data, datamodule, inspection
from cifarlab.checkpoint import CheckpointError
from cifarlab.cli import refuse
from cifarlab.config import ConfigError
from cifarlab.data import DataError
from cifarlab.model import count_parameters
from cifarlab.module import CifarModule, Diverged, EpochTimer
from cifarlab.run_folder import (FAILED, FINISHED, RUNNING, SAVED_CONFIG, RunFolderError, claim, is_ddp_child,
                                 lock_is_stale, saved_run, set_aside)

log = logging.getLogger("cifarlab")
# Lightning's advertising and a deprecation inside Lightning itself are noise to a user of this tool.
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith(("💡 Tip", "Trainer already configured with model summary"))
)
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")  # a resumed run's

USER_ERRORS = (ConfigError, DataError, CheckpointError, RunFolderError)
# The float unary ops ATen hands to MKL's vector math library (VML), each intra-op thread calling it on its own chunk:
# the uncommented IMPLEMENT_VML_MKL lines of torch's include/ATen/cpu/vml.h (a test checks this list against it).
VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt", "tan",
           "tanh", "trunc")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: the logs are flushed and the last checkpoint is kept; the message says how to go on."""


def print_config_tree(cfg: DictConfig) -> None:
    from rich import print as rprint
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", style="bold")
    for key, node in cfg.items():
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        tree.add(f"[bold]{key}[/bold]").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    rprint(tree)


def load_data(data_cfg: DictConfig, seed: int) -> data.CifarArrays:
    if data_cfg.name == "synthetic":
        arrays = data.make_synthetic(int(data_cfg.n_train), int(data_cfg.n_test), float(data_cfg.noise), seed)
        log.warning("data=synthetic: training on made-up images, NOT CIFAR-10; no figure from this run means anything")
        return arrays
    return data.load_cifar10(str(data_cfg.root), bool(data_cfg.download), data_cfg.url, data_cfg.md5)


def settle(cfg: DictConfig) -> DictConfig:
    """Make the run independent of where it is resumed from: the data folder as an absolute path."""
    if cfg.data.get("root") is not None:
        cfg.data.root = to_absolute_path(str(Path(str(cfg.data.root)).expanduser()))
    if cfg.get("init_from"):
        cfg.init_from = to_absolute_path(str(cfg.init_from))
    return cfg


def resolve_vml_kernels() -> None:
    """Make every VML function pick its kernel now, on this thread alone.

    The oneMKL inside torch's wheels (2024.2) picks a VML function's kernel on that function's first call. When the
    intra-op threads make that first call together, one of them can run a low-accuracy kernel on its chunk, once
    (pytorch/pytorch#188792). AdamW's first torch.sqrt did, in 10 of 50 processes on 2 threads: half of the
    first conv's weights took an update up to 3e-4 off, and the same config and seed ended with other metrics
    (docs/results/vml-first-call/; 0 of 50 with this call). One call on one element runs on one thread, so every
    later call finds the choice made.
    """
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for op in VML_OPS:
            getattr(torch, op)(x)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def write_json(path: Path, obj: dict[str, Any]) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


# Keys added to configs/train.yaml after runs were made without them, with their defaults: at the default, a key is left
# out of config_sha, so a sweep started before it existed still skips its finished jobs and resumes its stopped ones.
ADDED_KEYS = {"test_checkpoint": "best"}


def config_sha(cfg: DictConfig) -> str:
    """What makes two jobs the same job: the resolved config, less the thread count and steps_per_call (speed knobs
    that change no number), the resume request and keys added later that are at their defaults (ADDED_KEYS)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("threads", None)
    plain.pop("steps_per_call", None)
    plain.pop("resume", None)
    for key, default in ADDED_KEYS.items():
        if plain.get(key, default) == default:
            plain.pop(key, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sweep_job(cfg: DictConfig, run_dir: Path, option_names: dict[str, str]) -> float:
    """One job of a -m sweep. Run again, a sweep skips its finished jobs, re-runs failed and killed ones, and one
    failing job never stops the others. Returns the best validation accuracy (what an Optuna search maximises: never
    the test set, which would overstate the result), NaN on failure."""
    finished = run_dir / FINISHED
    if finished.exists():
        done = json.loads(finished.read_text())
        if done.get("config_sha") == config_sha(cfg):
            log.info("%s: finished before (test/acc %.4f); skipped", run_dir.name, done["test_acc"])
            return done["best_val_acc"]
        log.error("%s: holds a finished run of another config (see its config.yaml); left alone", run_dir)
        return float("nan")
    if (run_dir / RUNNING).exists():
        if not lock_is_stale(run_dir):  # another process is running this job: leave its folder alone
            log.error("%s: in use by another run (%s); skipped", run_dir, (run_dir / RUNNING).read_text().strip())
            return float("nan")
        (run_dir / RUNNING).unlink()
    if (run_dir / FAILED).exists():
        log.warning("%s: an earlier attempt failed; its files are kept in %s", run_dir, set_aside(run_dir).name)
    # An earlier attempt that was killed or interrupted (with or without a checkpoint) is continued in place.
    resume = (run_dir / SAVED_CONFIG).exists() or (run_dir / "checkpoints" / checkpoint.LAST).exists()
    if resume:
        log.warning("%s: an earlier attempt was stopped; continuing it", run_dir.name)
    try:
        if str(cfg.trainer.get("strategy", "")).startswith("ddp"):
            raise ConfigError(
                "trainer.strategy=ddp inside a -m sweep: Lightning re-runs the command for each rank with "
                "hydra.run.dir, which a sweep job does not use, so ranks would land in another folder; run "
                "single-device jobs (launcher=slurm gives each its own GPU) or trainer=ddp without -m"
            )
        with claim(run_dir):
            return train(cfg, run_dir, option_names, resume=resume)["best_val_acc"]
    except Interrupted as e:
        print(f"\n{e}\nThe sweep stopped; run the same command again to go on: finished jobs are skipped and this "
              "one continues where it stopped.", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        write_json(run_dir / FAILED, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        log.error("%s failed, the sweep goes on: %s: %s", run_dir.name, type(e).__name__, e)
        return float("nan")


def resume_point(run_dir: Path, model: torch.nn.Module, sha: str, owner: bool = True) -> str | None:
    """The checkpoint a stopped run continues from (None: it stopped before its first epoch ended, so it starts
    again), after dropping the TensorBoard events logged after that checkpoint; every check before any data is read."""
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / checkpoint.LAST
    if not owner:  # a DDP rank > 0: rank 0 tidies the folder
        return str(last) if last.exists() else None
    for path in checkpoint.remove_partial_saves(ckpt_dir):
        log.warning("%s: removed %s, a save the kill interrupted (the checkpoint it was replacing is intact)",
                    run_dir.name, path.name)
    if not last.exists():
        dropped = checkpoint.trim_events(run_dir, None)
        log.warning("%s: no checkpoint (stopped before its first epoch ended): starting it again; %d TensorBoard "
                    "events of the stopped attempt dropped", run_dir.name, dropped)
        return None
    ckpt = checkpoint.read_checkpoint(last, f"resume={last}")
    stamp = checkpoint.stamp(ckpt)
    if stamp.get("config_sha") != sha:
        raise CheckpointError(f"resume={last}: written by a run of another config than {run_dir / SAVED_CONFIG} "
                              "(edited since?); start a new run instead")
    checkpoint.check_architecture(checkpoint.network_weights(ckpt, f"resume={last}"), model, f"resume={last}")
    dropped = checkpoint.trim_events(run_dir, stamp["saved_at"])
    log.warning("%s: continuing after epoch %d (step %d) from %s; %d TensorBoard events logged after that "
                "checkpoint dropped (the resumed run logs those steps again)",
                run_dir.name, ckpt["epoch"] + 1, ckpt["global_step"], last.relative_to(run_dir), dropped)
    return str(last)


def make_datamodule(cfg: DictConfig, arrays: data.CifarArrays) -> datamodule.CifarDataModule:
    """The run's splits, normalisation and augmentation over the loaded arrays (data.* and seed of cfg)."""
    try:
        n_val = data.val_count(cfg.data.val_size, len(arrays.train_y))
    except ValueError as e:
        raise ConfigError(f"data.val_size={e}; use a fraction in (0, 1) or a smaller count") from None
    return datamodule.CifarDataModule(
        arrays,
        n_val=n_val,
        split_seed=cfg.data.split_seed,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        normalize=cfg.data.normalize,
        flip=cfg.data.augment.flip,
        crop_padding=cfg.data.augment.crop_padding,
        seed=cfg.seed,
        channels_last=cfg.channels_last,
        steps_per_call=cfg.get("steps_per_call", 1),
        limit_train_batches=cfg.trainer.get("limit_train_batches"),
    )


def init_weights(model: torch.nn.Module, path: str, where: str | None = None) -> None:
    """init_from=<checkpoint>: start from another run's weights (fine-tuning, longer schedules).

    `where` starts any error message (default `init_from=<path>`)."""
    where = where or f"init_from={path}"
    weights = checkpoint.network_weights(checkpoint.read_checkpoint(path, where), where)  # settle() made it absolute
    checkpoint.check_architecture(weights, model, where)
    model.load_state_dict(weights)


def training_precision(requested: str, accelerator: str) -> str:
    """trainer.precision=auto: bf16-mixed on a GPU that has bf16 (Ampere and newer), 16-mixed on an older GPU,
    32-true on a CPU (no bf16 units on most; autocast there only adds casts)."""
    if requested != "auto":
        return requested
    if accelerator not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def train(
    cfg: DictConfig,
    run_dir: Path,
    option_names: dict[str, str] | None = None,
    resume: bool = False,
    overrides: list[str] | None = None,  # for metrics.json; default: this Hydra run's
    extra_callbacks: list[L.Callback] | None = None,  # measuring tools (scripts/), beside the configured ones
) -> dict[str, Any]:
    started = time.perf_counter()
    # Lightning compares its batch count with log_every_n_steps; its batches are groups of steps_per_call steps here
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    resolve_vml_kernels()  # before any tensor maths: the same config and seed give the same numbers on a CPU
    checksums.install()  # TensorBoard's event checksums in C: the writer thread's pure-Python CRC held the GIL

    # Everything a user can get wrong in the config is refused here, before any data is read (cifarlab-train has
    # checked it before Hydra made the run folder; a sweep's jobs and scripts/ come straight here).
    config.check(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = config.build_model(cfg.model)
    optimizer = config.build_optimizer(cfg.optimizer)
    scheduler = config.build_scheduler(cfg.scheduler)
    choices = config.choices(cfg, option_names)
    precision = training_precision(str(cfg.trainer.get("precision", "auto")), str(cfg.trainer.accelerator))
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for what runs in fp32 on a GPU that has it
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # the conv weights; the module makes batches match
    sha = config_sha(cfg)
    ckpt_path = resume_point(run_dir, model, sha, owner=not is_ddp_child()) if resume else None
    if cfg.get("init_from") and ckpt_path is None:  # a resumed run's weights come from its checkpoint
        init_weights(model, str(cfg.init_from))

    arrays = load_data(cfg.data, cfg.data.split_seed)
    datamodule = make_datamodule(cfg, arrays)
    # What resume= continues with, written once the data is read: a run refused for its data (none under data.root,
    # a data.val_size too large) leaves no config.yaml, so its folder does not pass for a stopped run, which resume=
    # would repeat with the same data and a new run in the same hydra.run.dir would be refused.
    if not (run_dir / SAVED_CONFIG).exists() and not is_ddp_child():
        write_text(run_dir / SAVED_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.compile:
        model.compile()  # in place: the state_dict keys, and so the checkpoints, stay those of the plain model
    module = CifarModule(model, optimizer, scheduler, label_smoothing=cfg.label_smoothing,
                         channels_last=cfg.channels_last, test_flips=cfg.test_flips,
                         test_shift=cfg.test_shift, steps_per_epoch=datamodule.train_batches,
                         accumulate_grad_batches=cfg.trainer.get("accumulate_grad_batches", 1),
                         gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
                         gradient_clip_algorithm=cfg.trainer.get("gradient_clip_algorithm") or "norm")

    loggers = [instantiate(node, save_dir=str(run_dir)) for node in cfg.logger.values() if node is not None]
    callbacks = [instantiate(node) for node in cfg.callbacks.values() if node is not None]
    callbacks += [*(extra_callbacks or []), checkpoint.ResumePoint(sha)]
    # The module steps the optimizer itself (CifarModule.training_step): it accumulates, clips and counts the
    # training batches per epoch, so Lightning's own settings for those stay off.
    trainer: L.Trainer = instantiate(cfg.trainer, precision=precision, logger=loggers, callbacks=callbacks,
                                     default_root_dir=str(run_dir), plugins=[checkpoint.AtomicCheckpointIO()],
                                     accumulate_grad_batches=1, gradient_clip_val=None, limit_train_batches=None)
    if arrays.source == "synthetic" and ckpt_path is None:  # a resumed run labelled itself when it first started
        for lg in loggers:
            if hasattr(lg, "experiment") and hasattr(lg.experiment, "add_text"):
                lg.experiment.add_text("data", "**SYNTHETIC DATA, NOT CIFAR-10**: made-up images from data=synthetic")

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after flushing the loggers
            raise interrupted(trainer, run_dir) from None
        raise
    # The checkpoint callback that keeps the best val/acc (callbacks.model_checkpoint), not merely the first one: with
    # ~callbacks.model_checkpoint, last_checkpoint (monitor: null) would otherwise pass for it.
    ckpt_cb = next((c for c in trainer.checkpoint_callbacks if c.monitor is not None), None)
    has_best = ckpt_cb is not None and bool(ckpt_cb.best_model_path)
    timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
    # Read before testing: loading the best checkpoint also loads the timer's state as it was at that epoch.
    timing = timer.summary() if timer else {"epoch_s": None, "train_img_per_s": None}
    # test_checkpoint=last scores the weights in memory: those training ended with (also those of last.ckpt)
    wanted = cfg.get("test_checkpoint", "best")
    tested = "best" if has_best and wanted == "best" else "last"
    if tested != wanted:
        log.warning("test_checkpoint=best, but no checkpoint keeps the best val/acc (callbacks.model_checkpoint "
                    "removed?): testing the weights training ended with; metrics.json says tested_checkpoint: last")
    try:
        test = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_cb.best_model_path if tested == "best"
                            else None, verbose=False)[0]
    except SystemExit:
        if trainer.interrupted:
            raise Interrupted(f"interrupted while testing; training had finished. Continue with: "
                              f"cifarlab-train resume={run_dir}") from None
        raise
    if timer:
        timing["test_img_per_s"] = timer.test_img_per_s
    best_val = ckpt_cb.best_model_score if has_best else None
    if not trainer.is_global_zero:  # DDP ranks 1..: rank 0 writes the results
        return {}
    metrics = {
        "test_acc": test["test/acc"],
        "test_loss": test["test/loss"],
        **({"test_acc_no_tta": test["test/acc_no_tta"]} if module.tta else {}),
        "best_val_acc": float(best_val) if best_val is not None else None,
        "params": count_parameters(model),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        **timing,
        "data_source": arrays.source,
        "data_root": arrays.root,
        "n_train": len(datamodule.train_y),
        "n_val": len(datamodule.val_y),
        "n_test": len(datamodule.test_y),
        "seed": cfg.seed,
        "device": str(trainer.strategy.root_device),
        "device_name": torch.cuda.get_device_name(trainer.strategy.root_device)
        if trainer.strategy.root_device.type == "cuda" else "cpu",
        "precision": precision,
        "channels_last": cfg.channels_last,
        "compile": cfg.compile,
        "threads": torch.get_num_threads(),
        "choices": choices,
        "best_checkpoint": os.path.relpath(ckpt_cb.best_model_path, run_dir) if has_best else None,
        "tested_checkpoint": tested,  # which weights test_acc scores: best (best_checkpoint) or last
        "overrides": overrides if overrides is not None else
        (list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []),
        "config_sha": sha,
        "resumed": resume,
        "wall_s": time.perf_counter() - started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    hparams = {
        **{f"model/{k}": v for k, v in choices.items()},
        "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
        "lr": cfg.optimizer.lr,
        "weight_decay": cfg.optimizer.get("weight_decay"),
        "scheduler": (cfg.scheduler._target_ or "none").rsplit(".", 1)[-1],
        "batch_size": cfg.data.batch_size,
        "epochs": cfg.trainer.max_epochs,
        "label_smoothing": cfg.label_smoothing,
        "augment": f"flip={str(cfg.data.augment.flip).lower()},crop={cfg.data.augment.crop_padding}",
        "seed": cfg.seed,
        "data_source": arrays.source,
    }
    inspection.log_hparams(trainer, hparams, {k: metrics[k] for k in ("test_acc", "best_val_acc", "params", "epoch_s")})
    write_json(run_dir / FINISHED, metrics)  # last: its presence marks the run finished
    return metrics


def interrupted(trainer: L.Trainer, run_dir: Path) -> Interrupted:
    done = trainer.fit_loop.epoch_progress.current.completed
    saved = (f"checkpoints/{checkpoint.LAST} was written after epoch {done}" if done
             else "no epoch had finished, so resuming starts it again")
    return Interrupted(f"interrupted in epoch {trainer.current_epoch + 1} of {trainer.max_epochs}; logs flushed, "
                       f"{saved}. Continue with: cifarlab-train resume={run_dir}")


def main(cfg: DictConfig) -> float | None:
    """The run that `cifarlab-train` starts (cli.py) once Hydra has composed the config and picked its folder."""
    runtime = HydraConfig.get().runtime
    run_dir = Path(runtime.output_dir)
    option_names, overrides = dict(runtime.choices), None
    resume = cfg.get("resume") is not None
    if resume:
        cfg, option_names, overrides = saved_run(run_dir)
    else:
        settle(cfg)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep_job(cfg, run_dir, option_names)
    if is_ddp_child():
        train(cfg, run_dir, option_names, resume=resume, overrides=overrides)
        return None
    print_config_tree(cfg)
    try:
        with claim(run_dir):
            metrics = train(cfg, run_dir, option_names, resume=resume, overrides=overrides)
    except (*USER_ERRORS, Diverged) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        refuse(str(e), status=1 if isinstance(e, Diverged) else 2)  # a diverged run is not a config mistake
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # before training (reading data) or after it (testing)
        print(f"\ninterrupted; continue with: cifarlab-train resume={run_dir}", file=sys.stderr)
        sys.exit(130)
    source = "" if metrics["data_source"] == "cifar10" else f" on {metrics['data_source']}"
    best_val = "none kept" if metrics["best_val_acc"] is None else f"{metrics['best_val_acc']:.4f}"
    print(f"test/acc {metrics['test_acc']:.4f}{source} ({metrics['tested_checkpoint']} checkpoint; best val/acc "
          f"{best_val}, {metrics['params']:,} params, {metrics['epoch_s']:.1f} s/epoch)")
    print(f"logs: {run_dir}  (tensorboard --logdir {run_dir} --host 127.0.0.1)")
    return metrics["best_val_acc"]


