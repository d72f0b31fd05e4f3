"""A run's objects, built once from its config: everything a user can get wrong fails here, cheapest check first.

schema ranges and the _target_ allowlist (no torch) -> the network, optimizer and schedule (torch: build.py) -> the
data, fetched and read (torchvision: data/cifar10.py) -> the datamodule, module, callbacks, loggers and trainer
(Lightning, imported only then). cifarlab-train runs it before Hydra makes the run folder and hands the
result to the run; a sweep's job, a resumed run and a DDP rank run it themselves.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from cifarlab import build, schema
from cifarlab.data.batches import val_count
from cifarlab.errors import ConfigError, first_line
from cifarlab.run_folder import config_sha

if TYPE_CHECKING:
    import lightning as L

    from cifarlab.data.cifar10 import CifarArrays
    from cifarlab.data.datamodule import CifarDataModule
    from cifarlab.module import CifarModule
    from cifarlab.progress import EpochSummary

# Lightning's advertising, its notes on what it does by design here, and a deprecation inside Lightning itself.
NOISE = ("💡 Tip", "Trainer already configured with model summary", "Loading `train_dataloader` to estimate")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: not str(r.msg).startswith(NOISE))
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# Given only outside any SLURM job, where srun is installed (a login node): cifarlab reaches SLURM with launcher=slurm.
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")


@dataclass
class Prepared:
    """Every object of one run, built from its config before it starts."""

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


# The float functions ATen hands to MKL's vector math library (VML): the IMPLEMENT_VML_MKL lines of torch's
# include/ATen/cpu/vml.h (tests/test_train.py checks this list against it).
VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt", "tan",
           "tanh", "trunc")


def settle(cfg: DictConfig) -> DictConfig:
    """Make the run independent of where it is resumed from: the data folder and init_from as absolute paths."""
    if cfg.data.get("root") is not None:
        cfg.data.root = str(Path(str(cfg.data.root)).expanduser().resolve())
    if cfg.get("init_from"):
        cfg.init_from = str(Path(str(cfg.init_from)).expanduser().resolve())
    return cfg


def resolve_vml_kernels() -> None:
    """Make every VML function pick its kernel now, on this thread alone: when the intra-op threads make a
    function's first call together, one can run a low-accuracy kernel once, and the same seed gives other metrics
    (pytorch/pytorch#188792; docs/results/vml-first-call/)."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for op in VML_OPS:
            getattr(torch, op)(x)


def fetch_data(data_cfg: DictConfig) -> None:
    """Download or unpack CIFAR-10 where data.root lacks it (nothing for data=synthetic): a sweep does it once,
    before its jobs start."""
    from cifarlab.data import cifar10  # torchvision: only where there is data to fetch

    if data_cfg.name == "cifar10":
        cifar10.locate(Path(data_cfg.root).expanduser().resolve(), data_cfg.download, data_cfg.url, data_cfg.md5)


def load_data(data_cfg: DictConfig, seed: int) -> CifarArrays:
    from cifarlab.data import cifar10  # torchvision: only once the values have passed

    if data_cfg.name == "synthetic":  # the run says so in its log and in TensorBoard
        return cifar10.make_synthetic(data_cfg.n_train or 5000, data_cfg.n_test or 1000, data_cfg.noise or 0.0, seed)
    return cifar10.load_cifar10(data_cfg.root, data_cfg.download, data_cfg.url, data_cfg.md5)


# CPU features that compute bf16 natively, as torch.cpu.get_capabilities() names them (x86: AVX512-BF16 on AMD Zen 4
# and newer and Intel since Cooper Lake, AMX on Sapphire Rapids); there autocast to bf16 trains the documented model
# about 1.8x faster than fp32 (docs/performance.md). Elsewhere autocast only adds casts.
CPU_BF16 = ("amx_bf16", "avx512_bf16")


def cpu_bf16() -> str | None:
    """The feature that lets this CPU compute bf16 natively, or None."""
    capabilities = torch.cpu.get_capabilities()
    return next((name for name in CPU_BF16 if capabilities.get(name)), None)


def training_precision(requested: str, accelerator: str) -> tuple[str, str]:
    """The precision to train in and why. trainer.precision=auto: bf16-mixed on a GPU that has bf16 (Ampere and
    newer), 16-mixed on an older GPU, bf16-mixed on a CPU that computes bf16 natively, 32-true on any other CPU."""
    if requested != "auto":
        return requested, f"trainer.precision={requested}"
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", "auto: the GPU computes bf16"
        return "16-mixed", "auto: the GPU has no bf16"
    feature = cpu_bf16()
    if feature is not None:
        return "bf16-mixed", f"auto: the CPU computes bf16 ({feature})"
    return "32-true", "auto: the CPU has no bf16 units (no avx512_bf16 or amx_bf16)"


def schedule_length(cfg: DictConfig, n_train: int) -> int:
    """The optimizer steps Lightning will count (Trainer.estimated_stepping_batches), from the config alone."""
    devices, ddp = cfg.trainer.get("devices"), str(cfg.trainer.get("strategy", "")).startswith("ddp")
    batches = n_train // (devices if ddp and isinstance(devices, int) else 1) // cfg.data.batch_size
    limit = cfg.trainer.get("limit_train_batches")
    if isinstance(limit, float):
        batches = int(batches * limit)
    elif limit is not None:
        batches = min(batches, limit)
    per_epoch = -(-batches // cfg.trainer.get("accumulate_grad_batches", 1))
    total = per_epoch * cfg.trainer.max_epochs
    max_steps = cfg.trainer.get("max_steps", -1)
    return min(total, max_steps) if max_steps != -1 else total


def prepare(cfg: DictConfig, run_dir: Path, option_names: dict[str, str] | None = None, resume: bool = False,
            extra_callbacks: Sequence[Any] = ()) -> Prepared:
    """Every object of the run, each built once; a ConfigError, DataError or CheckpointError before any is used."""
    started = time.perf_counter()
    settle(cfg)
    build.check_targets(schema.check(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    resolve_vml_kernels()  # before any tensor maths: the same config and seed give the same numbers on a CPU
    build.seed_everything(cfg.seed)
    model = build.network(cfg.model)
    if cfg.init_from and not resume:  # a resumed run's weights come from its checkpoint
        from cifarlab.checkpoint import load_weights

        load_weights(model, cfg.init_from, f"init_from={cfg.init_from}")
    optimizer, scheduler = build.optimizer(cfg.optimizer), build.scheduler(cfg.scheduler)
    arrays = load_data(cfg.data, cfg.data.split_seed)
    try:
        n_val = val_count(cfg.data.val_size, len(arrays.train_y))
    except ValueError as e:
        raise ConfigError(f"data.val_size={e}; use a fraction in (0, 1) or a smaller count") from None
    build.check_schedule(scheduler, schedule_length(cfg, len(arrays.train_y) - n_val))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # the conv weights; the module makes batches match
    precision, precision_why = training_precision(str(cfg.trainer.get("precision", "auto")),
                                                  str(cfg.trainer.accelerator))
    sha = config_sha(cfg)
    # The Lightning half: Lightning (5 s to import) is loaded once every value above has passed; a mistake it finds
    # in its own arguments is refused naming the config key.
    from cifarlab.checkpoint import AtomicCheckpointIO, ResumePoint
    from cifarlab.data.datamodule import CifarDataModule
    from cifarlab.module import CifarModule
    from cifarlab.progress import EpochSummary, StopOnNonFiniteLoss

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
    trainer = instantiated(cfg.trainer, "trainer", precision=precision, logger=loggers, callbacks=callbacks,
                           default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()])
    return Prepared(cfg=cfg, started=started, model=model, arrays=arrays, datamodule=datamodule, module=module,
                    trainer=trainer, summary=summary, choices=build.choices(cfg, option_names), precision=precision,
                    precision_why=precision_why, sha=sha)


def instantiated(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """Hydra's instantiate, its failure as one line naming the key (the cause, not Hydra's wrapper)."""
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except Exception as e:
        cause = e.__cause__ or e
        why = f"{type(cause).__name__}: {first_line(cause)}"
        raise ConfigError(f"{key} ({node.get('_target_')}): {why}") from None
