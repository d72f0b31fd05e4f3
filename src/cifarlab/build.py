"""The config's torch objects: layer factories, the network, the optimizer and the schedule.

Each is validated by building it, once: torch's own checks, plus one forward pass of the network, find what does not
fit, and the error is turned into one line naming the config key. Imports torch, not Lightning, so a mistake in a
layer is refused before Lightning loads (docs/results/cli-answers/).
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cifarlab.errors import ConfigError, first_line
from cifarlab.model import CifarNet, LayerFactory, ShrinksToNothing
from cifarlab.schema import CHANNELS, fmt

# Every _target_ the configs may name starts with one of these: Hydra's instantiate calls what it names.
ALLOWED_TARGETS = ("torch.nn.", "torch.optim.", "lightning.pytorch.Trainer", "lightning.pytorch.callbacks.",
                   "lightning.pytorch.loggers.", "cifarlab.")
LAYER_GROUPS = ("pool", "activation", "norm", "dropout")
EXAMPLE = {"pool": "avg", "activation": "relu", "norm": "batchnorm", "dropout": "dropout"}
# the config key behind each named layer of CifarNet, for error messages
LAYER_KEYS = {"conv": "model.conv_kernel", "norm": "model.norm", "act": "model.activation", "pool": "model.pool",
              "drop": "model.dropout", "head_act": "model.activation", "head_drop": "model.dropout",
              "fc1": "model.hidden", "fc2": "model.hidden"}


def seed_everything(seed: int) -> None:
    """Lightning's seed_everything (python, numpy, torch; PL_GLOBAL_SEED for DDP ranks), without loading Lightning."""
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_targets(plain: dict[str, Any]) -> None:
    """Every _target_ in the config, at any depth, must pass the allowlist: Hydra's instantiate builds nested ones
    too (a LambdaCallback's hook given as {_target_: ...}) and would call them before training starts."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("_target_") is not None:  # null: no layer (model/activation=none, ...)
                allowed(node["_target_"], path[1:])
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(plain, "")


def allowed(target: Any, key: str) -> None:
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGETS):
        names = ", ".join(t + ("*" if t.endswith(".") else "") for t in ALLOWED_TARGETS)
        raise ConfigError(f"{key}._target_={fmt(target)}: not an allowed target (allowed: {names})")


def resolve_target(target: Any, key: str) -> Any:
    """The class or function a _target_ names, if the allowlist admits it."""
    allowed(target, key)
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise ConfigError(f"{key}._target_={fmt(target)}: no such class or function") from None


def arguments(node: DictConfig) -> dict[str, Any]:
    """A node's arguments (no _target_/_partial_), resolved; lists as tuples ([h, w] -> (h, w))."""
    args = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def check_names(key: str, target: str, cls: type, args: dict[str, Any], supplied: tuple[str, ...] = ()) -> None:
    """Every argument must be one the class takes, and every one it needs must be there (but those the run supplies:
    the optimizer, the schedule's length): model/pool=lp swaps the class but keeps the values an experiment set under
    model.pool, so a name the new class lacks is a likely slip."""
    params = inspect.signature(cls).parameters
    named = {n: p for n, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in supplied}
    takes = ", ".join(n for n in named if n not in ("device", "dtype"))
    for name, value in args.items():
        if name not in named:
            raise ConfigError(f"{key}.{name}={fmt(value)}: {target} has no {name} (it takes {takes}); remove it with "
                              f"~{key}.{name} (values an experiment sets under {key} stay when "
                              f"{key.replace('.', '/')}=<option> swaps the class)")
    missing = [n for n, p in named.items() if p.default is p.empty and n not in args]
    if missing:
        raise ConfigError(f"{key}: {target} needs {', '.join(missing)}; set it with +{key}.{missing[0]}=<value>")


def layer_factory(node: Any, key: str) -> LayerFactory | None:
    """channels -> a new layer, for one layer group; None for a `none` choice. An argument whose value is "channels"
    receives the channel count of the stage (or head) the layer is built for."""
    group = key.rsplit(".", 1)[-1]
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{key}={fmt(node)}: {group} is a config group; choose an option with model/{group}=<option> "
                          f"(a slash, not a dot), e.g. model/{group}={EXAMPLE[group]}")
    if node.get("_target_") is None:
        return None
    cls = resolve_target(node._target_, key)
    args = arguments(node)
    check_names(key, node._target_, cls, args)
    if args.get("lower", 0) > args.get("upper", 1):
        raise ConfigError(f"{key}.lower={fmt(args['lower'])} > {key}.upper={fmt(args['upper'])}: RReLU draws its "
                          "slope from U(lower, upper), so lower must be <= upper")

    def build(channels: int) -> nn.Module:
        try:
            return cls(**{k: channels if v == CHANNELS else v for k, v in args.items()})
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{key} ({node._target_}) with {channels} channels: {first_line(e)}") from None

    return build


def network(model_cfg: DictConfig) -> CifarNet:
    """The CifarNet the config describes, checked by one forward pass of two images in eval mode (no randomness
    drawn, nothing learned): torch finds a window or padding that does not fit, and the message names the key."""
    factories = {group: layer_factory(model_cfg.get(group), f"model.{group}") for group in LAYER_GROUPS}
    if factories["pool"] is None:
        raise ConfigError("model.pool._target_=null: the network needs a pooling layer (max, avg, lp or blurmax)")
    head_drop = None
    if model_cfg.head_dropout and factories["dropout"] is not None:
        p = float(model_cfg.dropout.p)
        head_drop = lambda _: nn.Dropout(p)  # noqa: E731 - a vector gets element dropout, even with Dropout2d
    try:
        model = CifarNet(
            pool_layer=factories["pool"], act_layer=factories["activation"], norm_layer=factories["norm"],
            drop_layer=factories["dropout"], head_act_layer=factories["activation"] if model_cfg.head_activation
            else None, head_drop_layer=head_drop, channels=list(model_cfg.channels),
            conv_kernel=model_cfg.conv_kernel, conv_padding=model_cfg.conv_padding, hidden=model_cfg.hidden)
    except ShrinksToNothing as e:
        where = geometry(model_cfg, factories["pool"](1), e.layer)
        raise ConfigError(f"{where}: {e}; {remedy(model_cfg, e.layer)}") from None
    try_forward(model)
    return model


def geometry(model_cfg: DictConfig, pool: nn.Module, layer: str) -> str:
    """The keys that set the geometry that failed, with the values torch uses (stride null = kernel_size)."""
    if layer == "conv":
        return f"model.conv_kernel={model_cfg.conv_kernel}, model.conv_padding={model_cfg.conv_padding}"
    names = [n for n in ("kernel_size", "stride", "padding", "dilation", "ceil_mode") if n in model_cfg.pool]
    return ", ".join(f"model.pool.{n}={fmt(getattr(pool, n))}" for n in names)


def remedy(model_cfg: DictConfig, layer: str) -> str:
    if layer == "conv":
        return "use a smaller model.conv_kernel or a larger model.conv_padding"
    smaller = "/".join(n for n in ("kernel_size", "stride", "dilation") if n in model_cfg.pool)
    return f"use a smaller {smaller}" + (", or ceil_mode=true" if "ceil_mode" in model_cfg.pool else "")


@torch.no_grad()
def try_forward(model: CifarNet) -> None:
    """Two images through every layer in turn; the first that fails is named by its config key."""
    x = torch.zeros(2, 3, 32, 32)  # (B, C, H, W)
    model.eval()
    try:
        for name, part in model.named_children():
            for layer_name, layer in (part.named_children() if isinstance(part, nn.Sequential) else [(name, part)]):
                shape = "x".join(map(str, x.shape[1:]))
                try:
                    x = layer(x)
                except (RuntimeError, ValueError, TypeError) as e:
                    key = LAYER_KEYS.get(layer_name, "model")
                    raise ConfigError(f"{key} ({type(layer).__name__}) cannot take {name}'s {shape} input: "
                                      f"{first_line(e)}") from None
    finally:
        model.train()


def optimizer(node: DictConfig) -> Callable[[Any], torch.optim.Optimizer]:
    """parameters -> the optimizer (_partial_: true in its YAML)."""
    from hydra.utils import instantiate

    cls = resolve_target(node.get("_target_"), "optimizer")
    check_names("optimizer", node._target_, cls, arguments(node), supplied=("params",))
    factory = instantiate(node, _convert_="all")  # plain lists in the optimizer's state, for weights_only loading
    try:
        factory([nn.Parameter(torch.zeros(1))])  # torch checks its own arguments
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer ({node._target_}): {first_line(e)}") from None
    return factory


def scheduler(node: DictConfig) -> Callable[[torch.optim.Optimizer, int], Any] | None:
    """(optimizer, total optimizer steps) -> the scheduler stepped every step, or None for a constant rate."""
    from hydra.utils import instantiate

    if node.get("_target_") is None:
        return None
    cls = resolve_target(node._target_, "scheduler")
    params = inspect.signature(cls).parameters
    length = next((a for a in ("total_steps", "T_max") if a in params), None)
    if length is None:
        raise ConfigError(f"scheduler._target_={node._target_}: only schedulers taking total_steps or T_max are "
                          "supported (the run's length is passed in)")
    check_names("scheduler", node._target_, cls, arguments(node), supplied=("optimizer", length))
    partial = instantiate(node, _convert_="all")
    name = node._target_.rsplit(".", 1)[-1]

    def make(opt: torch.optim.Optimizer, total_steps: int) -> Any:
        try:
            return partial(opt, **{length: total_steps})
        except ZeroDivisionError:  # OneCycleLR divides by its warm-up's length
            raise ConfigError(f"scheduler={name} cannot schedule {total_steps} training steps (a warm-up of one step, "
                              f"which torch divides by; scheduler.pct_start={fmt(node.get('pct_start'))}); change "
                              "scheduler.pct_start, trainer.max_epochs or data.batch_size") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"scheduler ({node._target_}) for {total_steps} training steps: {first_line(e)}") from None

    return make


def check_schedule(make: Callable | None, total_steps: int) -> None:
    """Build the schedule once over a stand-in parameter, for the run's length."""
    if make is not None:
        make(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), total_steps)


def choices(cfg: DictConfig, option_names: dict[str, str] | None = None) -> dict[str, Any]:
    """The run's layer choices and their arguments, flat, for metrics.json and comparisons.

    option_names: Hydra's chosen option per group ({"model/pool": "avg", ...}); without it, the class name.
    """
    out: dict[str, Any] = {}
    for group in LAYER_GROUPS:
        node = cfg.model[group]
        target = node.get("_target_")
        out[group] = (option_names or {}).get(f"model/{group}") or (target.rsplit(".", 1)[-1] if target else "none")
        for k, v in OmegaConf.to_container(node, resolve=True).items():
            if not k.startswith("_") and v != CHANNELS:
                out[f"{group}.{k}"] = v
    return out
