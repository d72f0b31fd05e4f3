"""What a config may hold: types from a structured-config schema (Hydra refuses `seed=abc` while composing), ranges
from one table (RANGES), checked before anything is built. Imports no torch: cifarlab-train answers in a second.

register() must run in every process that composes or resolves a config: the command line calls it before Hydra
composes, and each job calls it again (a launcher's worker process restores Hydra's state of the parent, where the
resolvers must already be).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Callable, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cifarlab.errors import ConfigError

CHANNELS = "channels"  # a layer argument with this value receives the channel count of where the layer sits


# ---------------------------------------------------------------------------------------------------------------
# Types. Defaults live in the YAML files (configs/), once; MISSING here means "the YAML sets it".


@dataclass
class AugmentSchema:
    flip: Any = MISSING  # true, false or "alternate" (RANGES)
    crop_padding: int = MISSING


@dataclass
class DataSchema:
    name: str = MISSING
    root: str = MISSING
    download: bool = MISSING
    url: str = MISSING
    md5: str = MISSING
    val_size: Any = MISSING  # a fraction or an image count (RANGES)
    split_seed: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    normalize: bool = MISSING
    augment: AugmentSchema = field(default_factory=AugmentSchema)
    n_train: Optional[int] = None  # data=synthetic only
    n_test: Optional[int] = None
    noise: Optional[float] = None


@dataclass
class ModelSchema:
    pool: Any = MISSING  # each layer group: {_target_: a torch.nn class, its arguments}
    activation: Any = MISSING
    norm: Any = MISSING
    dropout: Any = MISSING
    channels: List[int] = MISSING
    conv_kernel: int = MISSING
    conv_padding: int = MISSING
    hidden: int = MISSING
    head_activation: bool = MISSING
    head_dropout: bool = MISSING


@dataclass
class TrainSchema:
    seed: int = MISSING
    label_smoothing: float = MISSING
    threads: Optional[int] = None
    channels_last: bool = MISSING
    compile: bool = MISSING
    test_flips: bool = MISSING
    test_shift: int = MISSING
    test_checkpoint: str = MISSING
    init_from: Optional[str] = None
    resume: Optional[str] = None
    trial: Optional[int] = None
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    optimizer: Dict[str, Any] = field(default_factory=dict)
    scheduler: Dict[str, Any] = field(default_factory=dict)
    trainer: Dict[str, Any] = field(default_factory=dict)
    logger: Dict[str, Any] = field(default_factory=dict)
    callbacks: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Resolvers


LR_RULES: dict[str, Callable[[float], float]] = {"linear": lambda r: r, "sqrt": math.sqrt}


def scaled_lr(base_lr: float, base_batch: int, batch_size: Any, rule: str) -> float:
    """${cifarlab.scaled_lr:base_lr,base_batch,${data.batch_size},rule}: the learning rate for the run's batch size:
    linear (SGD) or sqrt (Adam-type: the gradient noise falls as 1/sqrt(batch))."""
    if rule not in LR_RULES:
        raise ConfigError(f"optimizer.lr: scaling rule {rule!r} is unknown; use one of {', '.join(LR_RULES)}")
    if not (whole(batch_size) and batch_size >= 1):
        return base_lr  # RANGES refuses it, naming data.batch_size
    return base_lr * LR_RULES[rule](batch_size / base_batch)


def register() -> None:
    """The schema in Hydra's ConfigStore (configs/train.yaml extends it) and the project's resolvers. Idempotent."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="cifarlab_schema", node=TrainSchema)
    OmegaConf.register_new_resolver("cifarlab.scaled_lr", scaled_lr, replace=True)
    # sweep job folders 000_, 001_, ...: `ls` lists them in the order they ran
    OmegaConf.register_new_resolver("cifarlab.zfill", lambda n, width: str(n).zfill(int(width)), replace=True)


# ---------------------------------------------------------------------------------------------------------------
# Ranges: key pattern (fnmatch over the dotted key) -> (test, what is allowed). Every numeric key a user sets.

Rule = tuple[Callable[[Any], bool], str]


def fmt(value: Any) -> str:
    """A value as a user writes it on the command line."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, str) else str(value).replace(" ", "")


def whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ints(lo: int, hi: int | None = None) -> Rule:
    return (lambda v: whole(v) and lo <= v and (hi is None or v <= hi),
            f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]")


def numbers(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def test(v: Any) -> bool:
        return (_number(v) and (lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or (v < hi if hi_open else v <= hi)))

    if lo is None and hi is None:
        return test, "a number"
    if hi is None:
        return test, f"a number {'>' if lo_open else '>='} {lo}"
    return test, f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def pair(rule: Rule) -> Rule:
    test, text = rule
    return (lambda v: test(v) or (isinstance(v, list) and len(v) == 2 and all(test(x) for x in v)),
            f"{text}, or a pair [h, w] of them")


def null_or(rule: Rule) -> Rule:
    return lambda v: v is None or rule[0](v), f"null or {rule[1]}"


def one_of(*choices: Any) -> Rule:
    return (lambda v: any(v == c and type(v) is type(c) for c in choices),
            " or ".join(fmt(c) for c in choices))


def either(a: Rule, b: Rule) -> Rule:
    return lambda v: a[0](v) or b[0](v), f"{a[1]}, or {b[1]}"


BOOL = one_of(True, False)
FRACTION = numbers(0, 1, lo_open=True, hi_open=True)
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")

RANGES: dict[str, Rule] = {
    "seed": ints(0, 2**32 - 1),  # what seed_everything accepts
    "label_smoothing": numbers(0, 1, hi_open=True),
    "threads": null_or(ints(1)),
    "test_shift": ints(0, 8),  # px
    "test_checkpoint": one_of("best", "last"),
    "model.channels": (lambda v: isinstance(v, list) and len(v) > 0 and all(ints(1)[0](c) for c in v),
                       "a list of channel counts, each an int >= 1"),
    "model.conv_kernel": ints(1),
    "model.conv_padding": ints(0),
    "model.hidden": ints(1),
    # the layers' arguments, whichever group they are in
    "model.*.kernel_size": pair(ints(1)),
    "model.*.stride": null_or(pair(ints(1))),
    "model.*.padding": pair(ints(0)),
    "model.*.dilation": pair(ints(1)),
    "model.*.ceil_mode": BOOL,
    "model.*.count_include_pad": BOOL,
    "model.*.divisor_override": null_or(ints(1)),
    "model.*.return_indices": (lambda v: v is False, "false: the network needs a tensor from pooling, not (values, "
                               "indices); the MaxUnpool2d view in TensorBoard asks for the indices itself"),
    "model.*.blur_size": ints(1, 7),
    "model.*.norm_type": numbers(0, lo_open=True),
    "model.*.p": numbers(0, 1),
    "model.*.negative_slope": numbers(),
    "model.*.init": numbers(),
    "model.*.lower": numbers(0, 1),
    "model.*.upper": numbers(0, 1),
    "model.*.alpha": numbers(),
    "model.*.eps": numbers(0, lo_open=True),
    "model.*.momentum": null_or(numbers(0, 1)),
    "model.*.num_groups": ints(1),
    "model.*.num_parameters": one_of(1, CHANNELS),
    "model.*.approximate": one_of("none", "tanh"),
    "model.*.affine": BOOL,
    "model.*.track_running_stats": BOOL,
    "model.*.inplace": BOOL,
    "data.name": one_of("cifar10", "synthetic"),
    "data.val_size": either(FRACTION, ints(1)),
    "data.split_seed": ints(0),
    "data.batch_size": ints(1),
    "data.eval_batch_size": ints(1),
    "data.augment.flip": one_of(True, False, "alternate"),
    "data.augment.crop_padding": ints(0, 16),  # px
    "data.n_train": null_or(ints(2)),
    "data.n_test": null_or(ints(1)),
    "data.noise": null_or(numbers(0)),
    "optimizer.lr": numbers(0, lo_open=True),
    "optimizer.weight_decay": numbers(0),
    "optimizer.momentum": numbers(0, 1, hi_open=True),
    "optimizer.betas": (lambda v: isinstance(v, list) and len(v) == 2 and all(numbers(0, 1, hi_open=True)[0](b)
                                                                              for b in v), "a pair of numbers in [0, 1)"),
    "scheduler.pct_start": FRACTION,
    "scheduler.eta_min": numbers(0),
    "trainer.max_epochs": ints(1),
    "trainer.max_steps": either(one_of(-1), ints(1)),
    "trainer.log_every_n_steps": ints(1),
    "trainer.precision": one_of(*PRECISIONS),
    "trainer.accumulate_grad_batches": ints(1),
    "trainer.gradient_clip_val": null_or(numbers(0)),
    "trainer.gradient_clip_algorithm": null_or(one_of("norm", "value")),
    "trainer.limit_train_batches": null_or(either(ints(1), numbers(0, 1, lo_open=True))),
    "trainer.limit_val_batches": null_or(either(ints(0), numbers(0, 1))),
    "trainer.limit_test_batches": null_or(either(ints(1), numbers(0, 1, lo_open=True))),
    "callbacks.*.every_n_epochs": ints(1),
    "callbacks.pooling_images.per_class": ints(1),
    "callbacks.pooling_images.maps_images": ints(1),
    "callbacks.pooling_images.channels": ints(1),
    "callbacks.pooling_images.seed": ints(0),
    "callbacks.test_figures.misclassified": ints(0),
    "callbacks.test_figures.pr_thresholds": ints(2),
    "callbacks.projector.images": ints(1),
    "callbacks.projector.seed": ints(0),
}


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data, every interpolation resolved; one that does not resolve is refused, naming its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "the config"
        # 'KeyError raised while resolving interpolation: "Environment variable X not found"' -> what went wrong
        why = re.sub(r'^\w+ raised while resolving interpolation: "?(.*?)"?$', r"\1", str(e).splitlines()[0])
        raise ConfigError(why if why.startswith(f"{key}: ") else f"{key}: {why}") from None


def leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf; a list is one leaf."""
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in leaves(v, f"{prefix}{k}.")]
    return [(prefix[:-1], node)]


def check(cfg: DictConfig) -> dict[str, Any]:
    """Every value against RANGES, on the config resolved; returns that resolved config."""
    plain = resolved(cfg)
    for key, value in leaves(plain):
        for pattern, (test, allowed) in RANGES.items():
            if fnmatchcase(key, pattern) and not test(value):
                raise ConfigError(f"{key}={fmt(value)}: must be {allowed}")
    return plain
