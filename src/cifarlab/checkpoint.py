"""Checkpoints that survive a kill and load safely, and what continuing an interrupted run needs.

- AtomicCheckpointIO: Lightning writes every checkpoint through it, to a temporary file beside the target that is
  flushed to disk and then renamed over it; a kill while saving leaves the previous checkpoint whole. Every load is
  torch.load(weights_only=True): tensors and plain data only, never code from a file someone handed you.
- read_checkpoint / network_weights / check_architecture: a user-given file, with one-line errors naming the file
  and, for another architecture, the layers that do not match.
- ResumePoint: stamps each checkpoint with the moment it was written (after flushing the TensorBoard writer), the
  config hash and the RNG state; a resumed run restores the RNG, and events.trim drops what was logged after that
  moment, so every step is logged exactly once.
"""

from __future__ import annotations

import pickle
import re
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from torch import nn

from cifarlab.errors import CheckpointError
from cifarlab.run_folder import atomic_write

LAST = "last.ckpt"
STAMP = "cifarlab"  # the checkpoint's key for what ResumePoint records


# ---------------------------------------------------------------------------------------------------------------
# Writing and reading


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, f"checkpoint={path}", map_location or "cpu")


def read_checkpoint(path: str | Path, where: str, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True, its failures turned into one line starting with `where` (key=value)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file" + ("" if where.endswith(f"={path}") else f" ({path})"))
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{where}: refused: it holds a Python object ({found.group(1)}) that loading would run; checkpoints "
                "are read with weights_only=True (tensors and plain data only), so use one written by cifarlab"
            ) from None
        raise CheckpointError(f"{where}: not a checkpoint (unreadable as tensors and plain data: corrupt?)") from None
    except Exception as e:  # a truncated zip, an empty file, random bytes: torch raises many kinds
        detail = str(e).split(". ")[0].strip() or type(e).__name__
        raise CheckpointError(f"{where}: not a readable checkpoint (truncated or corrupt: {detail})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{where}: not a checkpoint (holds a {type(ckpt).__name__}, not a dict of tensors)")
    return ckpt


def network_weights(ckpt: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The CifarNet's weights from a Lightning checkpoint (state_dict under 'model.') or a bare model.state_dict()."""
    state = ckpt.get("state_dict", ckpt)
    if "state_dict" in ckpt:
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where}: holds no model weights (neither a Lightning checkpoint nor a state_dict)")
    return state


def _layers(names: list[str]) -> str:
    """Parameter names -> the layers they belong to: 'stage1.norm.weight', 'stage1.norm.bias' -> 'stage1.norm'."""
    return ", ".join(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))


def check_architecture(weights: dict[str, torch.Tensor], model: nn.Module, where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} is {list(weights[k].shape)} in the file, {list(v.shape)} here"
              for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"layers this config has but the file lacks: {_layers(missing)}")
    if unexpected:
        problems.append(f"layers in the file this config lacks: {_layers(unexpected)}")
    problems += shapes
    if problems:
        raise CheckpointError(f"{where}: made for a different architecture: " + "; ".join(problems))


def load_weights(model: nn.Module, path: str | Path, where: str) -> None:
    """init_from=<checkpoint>: another run's weights (a Lightning checkpoint or a bare state_dict) into `model`."""
    weights = network_weights(read_checkpoint(path, where), where)
    check_architecture(weights, model, where)
    model.load_state_dict(weights)


# ---------------------------------------------------------------------------------------------------------------
# Resuming


class ResumePoint(Callback):
    """Records in every checkpoint what a resumed run needs to continue exactly where the checkpoint was written."""

    def __init__(self, config_sha: str):
        self.config_sha = config_sha
        self._rng: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Everything logged so far reaches the disk before the checkpoint does; whatever is logged after it is
        # dropped on resume (events.trim) and logged again by the resumed run.
        for lg in trainer.loggers:
            flush = getattr(getattr(lg, "experiment", None), "flush", None)
            if flush is not None:
                flush()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[STAMP] = {"config_sha": self.config_sha, "saved_at": time.time(), "rng": rng}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._rng = checkpoint.get(STAMP, {}).get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Dropout and RReLU draw from the global generator: continue its stream where the checkpoint left it.
        if self._rng is not None:
            torch.set_rng_state(self._rng["torch"])
            if "cuda" in self._rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng["cuda"])
            self._rng = None


def stamp(ckpt: dict[str, Any]) -> dict[str, Any]:
    return ckpt.get(STAMP) or {}
