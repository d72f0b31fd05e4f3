"""The composed config, checked and turned into plain objects: layer factories, the model, optimiser and schedule.

This, cli.py and train.py are the only modules that read the config (cli.py and train.py are the entry point; checking
is long enough to deserve its own file). Every check raises ConfigError with one line naming the key, the value and
what is allowed; check() runs them all, and the command line runs it before Hydra makes a run folder.

Imports torch (2 s) but not Lightning (8 s on the 2-core test machine): a mistake in a value is refused before
Lightning loads. Only the _target_ checks load it, through the classes they name (check_targets, last).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
from numbers import Real
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from cifarlab.model import CifarNet, LayerFactory, pool_geometry, pooled_size

# Every _target_ the configs may name starts with one of these.
ALLOWED_TARGETS = (
    "torch.nn.",
    "torch.optim.",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "cifarlab.",
)
CHANNELS = "channels"  # a layer argument with this value receives the channel count of where the layer sits
LAYER_GROUPS = ("pool", "activation", "norm", "dropout")
DATA_NAMES = ("cifar10", "synthetic")  # what data.name may be: the real images, or made-up ones (configs/data/)


class ConfigError(ValueError):
    """A user mistake in the config; the message names the key, the bad value and what is allowed."""


# How optimizer.lr follows data.batch_size: the factor applied to the base rate for batch_size / base_batch.
LR_RULES: dict[str, Callable[[float], float]] = {"linear": lambda r: r, "sqrt": math.sqrt}


def scaled_lr(base_lr: float, base_batch: int, batch_size: Any, rule: str) -> float:
    """${cifarlab.scaled_lr:base_lr,base_batch,${data.batch_size},rule}: the learning rate for the run's batch size.

    linear (SGD: k times the batch, k times the step) or sqrt (Adam-type: k times the batch, sqrt(k) times the step,
    since the gradient noise falls as 1/sqrt(batch)).
    """
    if rule not in LR_RULES:
        raise ConfigError(f"optimizer.lr: scaling rule {rule!r} is unknown; use one of {', '.join(LR_RULES)}")
    if not (_is_int(batch_size) and batch_size >= 1):
        return base_lr  # check_recipe refuses it, naming data.batch_size
    return base_lr * LR_RULES[rule](batch_size / base_batch)


OmegaConf.register_new_resolver("cifarlab.scaled_lr", scaled_lr, replace=True)
# Lightning's precision names; auto = bf16-mixed on a GPU with bf16 (16-mixed on an older one), 32-true elsewhere.
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def _fmt(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, tuple):
        value = list(value)  # echo [h, w] as the user wrote it
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, str) else str(value).replace(" ", "")


def resolve_target(target: Any, key: str) -> Any:
    """The class or function a _target_ names, if the allowlist admits it."""
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGETS):
        allowed = ", ".join(t + ("*" if t.endswith(".") else "") for t in ALLOWED_TARGETS)
        raise ConfigError(f"{key}._target_={_fmt(target)}: not an allowed target (allowed: {allowed})")
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise ConfigError(f"{key}._target_={_fmt(target)}: no such class or function") from None


# ---------------------------------------------------------------------------------------------------------------
# Value checks for the layer arguments the seeds describe. Each: (test, what is allowed).


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_or_pair(test: Callable[[int], bool]) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if isinstance(v, (list, tuple, ListConfig)):
            return len(v) == 2 and all(_is_int(x) and test(x) for x in v)
        return _is_int(v) and test(v)

    return check


def _number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


ARG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "kernel_size": (_int_or_pair(lambda x: x >= 1), "an int >= 1 or a pair [h, w] of them"),
    "stride": (lambda v: v is None or _int_or_pair(lambda x: x >= 1)(v), "null (= kernel_size), or an int >= 1 or a pair"),
    "padding": (_int_or_pair(lambda x: x >= 0), "an int >= 0 or a pair [h, w] of them"),
    "dilation": (_int_or_pair(lambda x: x >= 1), "an int >= 1 or a pair [h, w] of them"),
    "ceil_mode": (lambda v: isinstance(v, bool), "true or false"),
    "count_include_pad": (lambda v: isinstance(v, bool), "true or false"),
    "divisor_override": (lambda v: v is None or (_is_int(v) and v >= 1), "null (= window size) or an int >= 1"),
    "blur_size": (lambda v: _is_int(v) and 1 <= v <= 7, "an int in [1, 7] (1 = no blur)"),
    "norm_type": (lambda v: _number(v) and v > 0, "a number > 0"),
    "p": (lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "negative_slope": (_number, "a number"),
    "init": (_number, "a number"),
    "lower": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "upper": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "alpha": (_number, "a number"),
    "eps": (lambda v: _number(v) and v > 0, "a number > 0"),
    "momentum": (lambda v: v is None or (_number(v) and 0 <= v <= 1), "null or a number in [0, 1]"),
    "num_groups": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "num_parameters": (lambda v: v == CHANNELS or v == 1, f'1 (one shared slope) or "{CHANNELS}" (one per channel)'),
    "approximate": (lambda v: v in ("none", "tanh"), '"none" or "tanh"'),
}


def _check_args(key: str, args: dict[str, Any]) -> None:
    for name, value in args.items():
        rule = ARG_RULES.get(name)
        if rule and not rule[0](value):
            raise ConfigError(f"{key}.{name}={_fmt(value)}: must be {rule[1]}")
    if "lower" in args and "upper" in args and args["lower"] > args["upper"]:
        raise ConfigError(
            f"{key}.lower={_fmt(args['lower'])} > {key}.upper={_fmt(args['upper'])}: "
            "RReLU draws its slope from U(lower, upper), so lower must be <= upper"
        )
    if args.get("return_indices"):
        raise ConfigError(
            f"{key}.return_indices=true: the network needs a tensor from pooling, not (values, indices); "
            "the MaxUnpool2d view in TensorBoard pools with return_indices=True by itself"
        )


def _check_arg_names(key: str, target: str, cls: type, args: dict[str, Any]) -> None:
    """Every argument must be one the class takes, and every one it needs must be there.

    Choosing another option of a group (model/pool=lp) swaps the class but keeps the values an experiment set under
    the same key (experiment=best sets model.pool.padding), so a name the new class lacks is a likely mistake.
    """
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read: instantiation reports what is wrong
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes = ", ".join(n for n in named if n not in ("device", "dtype"))
    for name, value in args.items():
        if name not in named:
            raise ConfigError(
                f"{key}.{name}={_fmt(value)}: {target} has no {name} (it takes {takes}); remove it with "
                f"~{key}.{name} (values an experiment sets under {key} stay when "
                f"{key.replace('.', '/')}=<option> swaps the class)"
            )
    missing = [n for n, p in named.items() if p.default is p.empty and n not in args]
    if missing:
        raise ConfigError(f"{key}: {target} needs {', '.join(missing)}; set it with +{key}.{missing[0]}=<value>")


def layer_factory(node: DictConfig, key: str) -> tuple[LayerFactory | None, type | None, dict[str, Any]]:
    """(factory, class, arguments) for one layer group; factory is None for a `none` choice.

    Arguments whose value is "channels" receive the channel count of the stage (or head) the layer is built for.
    """
    target = node.get("_target_")
    if target is None:
        return None, None, {}
    cls = resolve_target(target, key)
    args = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}  # [h, w] -> (h, w)
    _check_arg_names(key, target, cls, args)
    _check_args(key, args)

    def build(channels: int) -> nn.Module:
        return cls(**{k: channels if v == CHANNELS else v for k, v in args.items()})

    return build, cls, args


# ---------------------------------------------------------------------------------------------------------------
# The model


def _check_pool_geometry(key: str, pool: nn.Module, model_cfg: DictConfig) -> None:
    g = pool_geometry(pool)
    for i in range(2):  # (H, W)
        k, pad = g["kernel_size"][i], g["padding"][i]
        if pad > k // 2:
            raise ConfigError(
                f"{key}.padding={_fmt(pool.padding)}: pads {pad} px on each side, more than half of "
                f"{key}.kernel_size={_fmt(pool.kernel_size)} ({k} // 2 = {k // 2}) allows"
            )
    hw = (32, 32)
    k_conv, p_conv = int(model_cfg.conv_kernel), int(model_cfg.conv_padding)
    trail: list[str] = []
    for stage in range(1, len(model_cfg.channels) + 1):
        conv = tuple(s + 2 * p_conv - k_conv + 1 for s in hw)
        if min(conv) < 1:
            raise ConfigError(
                f"model.conv_kernel={k_conv}, model.conv_padding={p_conv}: stage {stage}'s conv shrinks "
                f"{hw[0]}x{hw[1]} to nothing ({'; '.join(trail) or 'first stage'})"
            )
        out = pooled_size(pool, conv)
        trail.append(f"stage{stage} {conv[0]}x{conv[1]} -> {max(out[0], 0)}x{max(out[1], 0)}")
        if min(out) < 1:
            settable = [n for n in ("kernel_size", "stride", "padding", "dilation", "ceil_mode") if n in model_cfg.pool]
            params = ", ".join(f"{key}.{n}={_fmt(getattr(pool, n))}" for n in settable)
            smaller = "/".join(n for n in ("kernel_size", "stride", "dilation") if n in settable)
            raise ConfigError(
                f"{params}: pooling shrinks a feature map to nothing ({'; '.join(trail)}); "
                f"use a smaller {smaller}" + (", or ceil_mode=true" if "ceil_mode" in settable else "")
            )
        hw = out


def build_model(model_cfg: DictConfig) -> CifarNet:
    factories: dict[str, LayerFactory | None] = {}
    classes: dict[str, type | None] = {}
    args_of: dict[str, dict[str, Any]] = {}
    for group in LAYER_GROUPS:
        key = f"model.{group}"
        node = model_cfg.get(group)
        if not isinstance(node, DictConfig):
            raise ConfigError(
                f"{key}={_fmt(node)}: {group} is a config group; choose an option with model/{group}=<option> "
                f"(a slash, not a dot), e.g. model/{group}=" + {"pool": "avg", "activation": "relu",
                                                                 "norm": "batchnorm", "dropout": "dropout"}[group]
            )
        factories[group], classes[group], args_of[group] = layer_factory(node, key)
    if factories["pool"] is None:
        raise ConfigError("model.pool._target_=null: the network needs a pooling layer (max, avg, lp or blurmax)")

    channels = [int(c) for c in model_cfg.channels]
    if not channels or min(channels) < 1:
        raise ConfigError(f"model.channels={_fmt(model_cfg.channels)}: must list positive channel counts")
    groups = args_of["norm"].get("num_groups")
    if groups is not None and any(c % groups for c in channels):
        raise ConfigError(
            f"model.norm.num_groups={groups}: must divide every stage's channel count {channels} "
            f"(e.g. {', '.join(str(d) for d in range(1, min(channels) + 1) if all(c % d == 0 for c in channels))})"
        )
    try:
        pool = factories["pool"](channels[0])
    except Exception as e:
        raise ConfigError(f"model.pool ({model_cfg.pool._target_}): {e}") from None
    _check_pool_geometry("model.pool", pool, model_cfg)

    head_drop = None
    if model_cfg.head_dropout and factories["dropout"] is not None:
        p = float(args_of["dropout"]["p"])
        head_drop = lambda _: nn.Dropout(p)  # noqa: E731 - a vector input gets element dropout even for Dropout2d
    try:
        model = CifarNet(
            pool_layer=factories["pool"],
            act_layer=factories["activation"],
            norm_layer=factories["norm"],
            drop_layer=factories["dropout"],
            head_act_layer=factories["activation"] if model_cfg.head_activation else None,
            head_drop_layer=head_drop,
            channels=channels,
            conv_kernel=int(model_cfg.conv_kernel),
            conv_padding=int(model_cfg.conv_padding),
            hidden=int(model_cfg.hidden),
            num_classes=int(model_cfg.num_classes),
        )
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"model: {e}") from None
    return model


# ---------------------------------------------------------------------------------------------------------------
# The recipe


def build_optimizer(node: DictConfig) -> Callable:
    cls = resolve_target(node.get("_target_"), "optimizer")
    args = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    if not (_number(args.get("lr")) and args["lr"] > 0):
        raise ConfigError(f"optimizer.lr={_fmt(args.get('lr'))}: must be a number > 0")
    if "weight_decay" in args and not (_number(args["weight_decay"]) and args["weight_decay"] >= 0):
        raise ConfigError(f"optimizer.weight_decay={_fmt(args['weight_decay'])}: must be a number >= 0")
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    return functools.partial(cls, **args)


def build_scheduler(node: DictConfig) -> Callable | None:
    """(optimizer, total steps) -> scheduler, or None for a constant learning rate."""
    target = node.get("_target_")
    if target is None:
        return None
    cls = resolve_target(target, "scheduler")
    args = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    params = inspect.signature(cls).parameters
    steps_arg = next((a for a in ("total_steps", "T_max") if a in params), None)
    if steps_arg is None:
        raise ConfigError(f"scheduler._target_={target}: only schedulers taking total_steps or T_max are supported")

    def build(optimizer, total_steps: int):
        try:
            return cls(optimizer, **args, **{steps_arg: total_steps})
        except ZeroDivisionError:  # OneCycleLR when pct_start x total_steps is exactly 1
            raise ConfigError(
                f"scheduler={target.rsplit('.', 1)[-1]} cannot schedule {total_steps} training steps "
                f"(scheduler.pct_start={args.get('pct_start')} gives a warm-up of one step, which torch divides by); "
                "change scheduler.pct_start, trainer.max_epochs or data.batch_size"
            ) from None

    return build


def _check_per_batch_hooks(key: str, node: DictConfig, callback: Any, per_call: int) -> None:
    """With steps_per_call > 1, Lightning hands out groups of batches, and a callback's on_train_batch_start/_end run
    once per group: refuse a callback that acts on every training step (EMA, throughput, step-interval checkpoints),
    which would silently act once per steps_per_call steps instead. Allowed: callbacks without those hooks, progress
    bars and Timer (they only count or watch the clock), ModelCheckpoint without every_n_train_steps,
    LearningRateMonitor per epoch, and cifarlab's callbacks that read every step from the group's outputs."""
    from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar, Timer

    if not isinstance(callback, type) or not issubclass(callback, Callback):
        return
    hooks = [h for h in ("on_train_batch_start", "on_train_batch_end")  # overridden, or given (LambdaCallback)
             if getattr(callback, h) is not getattr(Callback, h) or node.get(h) is not None]
    fine = (not hooks or getattr(callback, "reads_every_step", False)
            or issubclass(callback, (ProgressBar, Timer))
            or (issubclass(callback, ModelCheckpoint) and not node.get("every_n_train_steps"))
            or (issubclass(callback, LearningRateMonitor) and node.get("logging_interval") == "epoch"))
    if fine:
        return
    rule = (f"steps_per_call={per_call}: Lightning hands out {per_call} training batches at a time, so "
            f"{'/'.join(hooks)} would run once per {per_call} optimizer steps")
    if issubclass(callback, ModelCheckpoint):
        raise ConfigError(f"{key}.every_n_train_steps={_fmt(node.get('every_n_train_steps'))} with {rule}; "
                          f"checkpoint per epoch (every_n_epochs), or set steps_per_call=1")
    if issubclass(callback, LearningRateMonitor):
        raise ConfigError(f"{key}.logging_interval={_fmt(node.get('logging_interval'))} with {rule}; set "
                          f"{key}.logging_interval=epoch, or steps_per_call=1 (train/lr is logged every "
                          f"log_every_n_steps steps without it)")
    raise ConfigError(f"{key} ({node.get('_target_')}) acts on every training step, but with {rule}; set "
                      f"steps_per_call=1 to use it (callbacks that act per epoch work with any steps_per_call)")


def check_recipe(cfg: DictConfig) -> None:
    if cfg.data.get("name") not in DATA_NAMES:
        raise ConfigError(f"data.name={_fmt(cfg.data.get('name'))}: must be one of {', '.join(DATA_NAMES)} (choose "
                          "the data with data=<option>)")
    positive_ints = {
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "trainer.max_epochs": cfg.trainer.max_epochs,
    }
    for key, value in positive_ints.items():
        if not (_is_int(value) and value >= 1):
            raise ConfigError(f"{key}={_fmt(value)}: must be an int >= 1")
    per_call = cfg.get("steps_per_call", 1)
    if not (_is_int(per_call) and per_call >= 1):
        raise ConfigError(f"steps_per_call={_fmt(per_call)}: must be an int >= 1 (training batches per Lightning "
                          "call; 1 = one step per call)")
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if not (_is_int(accumulate) and accumulate >= 1):
        raise ConfigError(f"trainer.accumulate_grad_batches={_fmt(accumulate)}: must be an int >= 1 (batches per "
                          "optimizer step)")
    clip = cfg.trainer.get("gradient_clip_val")
    if not (clip is None or (_number(clip) and clip >= 0)):
        raise ConfigError(f"trainer.gradient_clip_val={_fmt(clip)}: must be null (no clipping) or a number >= 0")
    clip_by = cfg.trainer.get("gradient_clip_algorithm")
    if clip_by not in (None, "norm", "value"):
        raise ConfigError(f"trainer.gradient_clip_algorithm={_fmt(clip_by)}: must be norm (the gradients' total "
                          "norm) or value (each element)")
    limit = cfg.trainer.get("limit_train_batches")
    if not (limit is None or (_is_int(limit) and limit >= 1) or (isinstance(limit, float) and 0 < limit <= 1)):
        raise ConfigError(f"trainer.limit_train_batches={_fmt(limit)}: must be null (all), a batch count >= 1 or "
                          "a fraction in (0, 1]")
    ls = cfg.label_smoothing
    if not (_number(ls) and 0 <= ls < 1):
        raise ConfigError(f"label_smoothing={_fmt(ls)}: must be a number in [0, 1)")
    flip = cfg.data.augment.flip
    if not (isinstance(flip, bool) or flip == "alternate"):
        raise ConfigError(f"data.augment.flip={_fmt(flip)}: must be true (coin flips), false or alternate "
                          "(each image mirrored every other epoch)")
    pad = cfg.data.augment.crop_padding
    if not (_is_int(pad) and 0 <= pad <= 16):
        raise ConfigError(f"data.augment.crop_padding={_fmt(pad)}: must be an int in [0, 16] (px; 0 = no crop)")
    vs = cfg.data.val_size
    if not ((_is_int(vs) and vs >= 1) or (isinstance(vs, float) and 0 < vs < 1)):
        raise ConfigError(f"data.val_size={_fmt(vs)}: must be a fraction in (0, 1) or an image count >= 1")
    precision = cfg.trainer.get("precision", "auto")
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={_fmt(precision)}: must be one of {', '.join(PRECISIONS)}")
    for key in ("channels_last", "compile", "test_flips", "data.normalize", "data.download"):
        value = OmegaConf.select(cfg, key, default=False)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={_fmt(value)}: must be true or false")
    shift = cfg.get("test_shift", 0)
    if not (_is_int(shift) and 0 <= shift <= 8):
        raise ConfigError(f"test_shift={_fmt(shift)}: must be an int in [0, 8] (px; 0 = no shifted test views)")
    tested = cfg.get("test_checkpoint", "best")
    if tested not in ("best", "last"):
        raise ConfigError(f"test_checkpoint={_fmt(tested)}: must be best (the epoch with the highest val/acc) or "
                          "last (the weights training ended with)")


def check_targets(cfg: DictConfig, plain: dict[str, Any]) -> None:
    """The callbacks, loggers and trainer: each _target_ allowed and importable (which loads Lightning), each callback
    usable with steps_per_call; then every _target_ at any depth of `plain`, the config resolved (resolved(cfg))."""
    per_call = cfg.get("steps_per_call", 1)
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is not None:
            callback = resolve_target(node.get("_target_"), f"callbacks.{name}")
            if per_call > 1:
                _check_per_batch_hooks(f"callbacks.{name}", node, callback, per_call)
    for name, node in (cfg.get("logger") or {}).items():
        if node is not None:
            resolve_target(node.get("_target_"), f"logger.{name}")
    resolve_target(cfg.trainer.get("_target_"), "trainer")
    _check_nested_targets(plain)


def check(cfg: DictConfig) -> None:
    """Everything a user can get wrong in the config, cheapest first: check_values, then the _target_s, which load
    Lightning. Reads no data."""
    check_targets(cfg, check_values(cfg))


def check_values(cfg: DictConfig) -> dict[str, Any]:
    """Interpolations that do not resolve, the values, the layers, optimizer and schedule (each built once, with torch
    alone). Returns the config resolved, for check_targets."""
    plain = resolved(cfg)
    check_recipe(cfg)
    build_model(cfg.model)
    build_optimizer(cfg.optimizer)
    build_scheduler(cfg.scheduler)
    return plain


def _check_nested_targets(plain: dict[str, Any]) -> None:
    """Every _target_ in the config, at any depth, must pass the allowlist: Hydra's instantiate builds nested ones
    too (a LambdaCallback's hook given as {_target_: ...}, say), and would call them before training starts."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("_target_") is not None:  # null: no layer (model/activation=none, ...)
                resolve_target(node["_target_"], path[1:])
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(plain, "")  # resolved: an interpolation (${oc.create:...}, say) can hold a _target_ as well


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data, every interpolation resolved; one that does not resolve is refused, naming its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "the config"
        # "KeyError raised while resolving interpolation: "Environment variable 'X' not found"" -> what went wrong
        why = re.sub(r'^\w+ raised while resolving interpolation: "?(.*?)"?$', r"\1", str(e).splitlines()[0])
        raise ConfigError(why if why.startswith(f"{key}: ") else f"{key}: {why}") from None  # scaled_lr names it


def choices(cfg: DictConfig, option_names: dict[str, str] | None = None) -> dict[str, Any]:
    """The run's layer choices and their arguments, flat, for metrics.json and comparisons.

    option_names: Hydra's chosen option per group ({"model/pool": "avg", ...}); without it, the class name.
    """
    out: dict[str, Any] = {}
    for group in LAYER_GROUPS:
        node = cfg.model[group]
        target = node.get("_target_")
        name = (option_names or {}).get(f"model/{group}")
        out[group] = name or (target.rsplit(".", 1)[-1] if target else "none")
        for k, v in OmegaConf.to_container(node, resolve=True).items():
            if not k.startswith("_") and v != CHANNELS:
                out[f"{group}.{k}"] = v
    return out
