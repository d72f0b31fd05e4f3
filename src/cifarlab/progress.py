"""What a run reports as it goes: one line per epoch in train.log (and on the console when no progress bar is drawn
there), the epoch's timing for TensorBoard and metrics.json, and the stop at a loss that is no longer a number."""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar

from cifarlab.errors import Diverged
from cifarlab.module import log_epoch_now
from cifarlab.run_folder import to_train_log

log = logging.getLogger("cifarlab")


def progress_bar_drawn(trainer: L.Trainer) -> bool:
    """A progress bar animates only on a terminal; in nohup, SLURM or CI output it shows nothing per epoch."""
    bar = trainer.progress_bar_callback
    stream = sys.stdout if isinstance(bar, RichProgressBar) else sys.stderr  # rich draws on stdout, tqdm on stderr
    return bar is not None and bar.is_enabled and stream.isatty()


class EpochSummary(Callback):
    """Each training epoch's wall seconds (validation excluded) and images per second, logged as time/epoch_s and
    time/train_img_per_s (time/peak_gpu_mem_gib on a GPU), and one line per epoch:

        epoch 3/10: train/loss 1.2345, val/loss 1.1002, val/acc 0.6012, lr 0.0021, 12.3 s
    """

    def __init__(self) -> None:
        self.epoch_s: list[float] = []
        self.img_per_s: list[float] = []
        self.test_img_per_s: float | None = None
        self._start: float | None = None
        self._end: float | None = None
        self._images = 0
        self._losses: list[torch.Tensor] = []
        self._lr = math.nan

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":  # once per epoch, never per step
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._end, self._images, self._losses, self._lr = self._now(pl_module), None, 0, [], math.nan

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step uses

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[1])
        if isinstance(outputs, dict) and "loss" in outputs:  # divided by accumulate_grad_batches under accumulation
            self._losses.append(outputs["loss"].detach() * trainer.accumulate_grad_batches)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        # Validation runs inside the training epoch, before on_train_epoch_end: stop the clock here.
        if self._start is not None and self._end is None and not trainer.sanity_checking:
            self._end = self._now(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._start is None:
            return
        seconds = (self._end if self._end is not None else self._now(pl_module)) - self._start
        self.epoch_s.append(seconds)
        self.img_per_s.append(self._images / seconds)
        timing = {"time/epoch_s": seconds, "time/train_img_per_s": self._images / seconds}
        if pl_module.device.type == "cuda":
            timing["time/peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        log_epoch_now(trainer, timing)
        self._start = None
        if trainer.is_global_zero:
            self.write_line(trainer, seconds)

    def write_line(self, trainer: L.Trainer, seconds: float) -> None:
        metrics = trainer.callback_metrics
        loss = float(torch.stack(self._losses).mean()) if self._losses else math.nan  # one read per epoch
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: train/loss {loss:.4f}"]
        parts += [f"{k} {float(metrics[k]):.4f}" for k in ("val/loss", "val/acc") if k in metrics]
        parts += [f"lr {self._lr:.3g}", f"{seconds:.1f} s"]  # the rate of the epoch's last step
        line = ", ".join(parts)
        if progress_bar_drawn(trainer):
            to_train_log(line)
        else:
            log.info(line)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._test_start, self._test_end, self._test_images = self._now(pl_module), None, 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._test_images += len(batch[1])
        if batch_idx + 1 == trainer.num_test_batches[dataloader_idx]:  # the pass ends here, before the test figures
            self._test_end = self._now(pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        end = self._test_end if self._test_end is not None else self._now(pl_module)
        self.test_img_per_s = self._test_images / (end - self._test_start)

    def summary(self) -> dict[str, Any]:
        median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        return {"epoch_s": median(self.epoch_s), "train_img_per_s": median(self.img_per_s),
                "train_img_per_s_by_epoch": list(self.img_per_s), "test_img_per_s": self.test_img_per_s}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_s": self.epoch_s, "img_per_s": self.img_per_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_s, self.img_per_s = list(state_dict["epoch_s"]), list(state_dict["img_per_s"])


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN/inf loss, naming the step and its learning rate, instead of training on NaN.

    The losses stay on the device and are checked together every trainer.log_every_n_steps steps (where Lightning
    reads the loss anyway) and at each epoch's end: one host sync, not one per step. (Lightning's
    EarlyStopping(check_finite=True) stops without failing and says neither.)
    """

    def __init__(self):
        self._losses: list[tuple[int, float, torch.Tensor]] = []  # (step, its learning rate, loss on the device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._losses.clear()  # left by an epoch that ended in an exception

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step, self._lr = trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]  # this step's

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(outputs, dict) or "loss" not in outputs:
            return
        self._losses.append((self._step, self._lr, outputs["loss"].detach()))
        if trainer.global_step % (trainer.log_every_n_steps or 1) == 0:
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        if not self._losses:
            return
        finite = torch.isfinite(torch.stack([loss for _, _, loss in self._losses]))  # (n,) bool
        if bool(finite.all()):  # the one host sync
            self._losses.clear()
            return
        step, lr, _ = self._losses[int(finite.int().argmin())]
        raise Diverged(f"train/loss became NaN or infinite at step {step} (epoch {trainer.current_epoch}), learning "
                       f"rate {lr:.3g} there; the learning rate is the likely cause: lower optimizer.lr (or set "
                       "trainer.gradient_clip_val)")
