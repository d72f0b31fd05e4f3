"""The LightningModule that trains a CifarNet: loss, torchmetrics accuracy, optimiser and schedule; the epoch timer
callback that measures what a user waits for; and the guard that stops a run whose loss is no longer a number."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

def log_epoch_now(trainer: L.Trainer, metrics: dict[str, float | torch.Tensor]) -> None:
    """Write epoch-end scalars to the loggers now, at the step Lightning gives epoch-end values.

    self.log() in on_train_epoch_end would reach the loggers only after the epoch's checkpoint is written; a run
    killed in between and resumed from that checkpoint would never log them. Written here, they precede it.
    """
    if trainer.sanity_checking:
        return
    values = {k: float(v) for k, v in metrics.items()}
    for lg in trainer.loggers:
        lg.log_metrics(values, step=trainer.global_step - 1)


OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
# (optimizer, total training steps) -> a scheduler stepped every batch
SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


class CifarModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        num_classes: int = 10,
        channels_last: bool = False,
        test_flips: bool = False,
        test_shift: int = 0,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # NHWC batches for a model whose conv weights are NHWC (oneDNN on a CPU, tensor cores on a GPU)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Test-time augmentation: evaluate on several views of each image (its mirror image; copies shifted by
        # test_shift px) and average the logits. Validation uses it too, so the best checkpoint is chosen by it.
        self.test_flips, self.test_shift = test_flips, test_shift
        # validate_args=False: the argument checks read values back to the host, a sync on every step
        acc = lambda: MulticlassAccuracy(num_classes, average="micro", validate_args=False)  # noqa: E731
        self.train_acc, self.val_acc, self.test_acc = acc(), acc(), acc()
        self.test_acc_no_tta = acc()  # with test-time views: the same checkpoint on the images alone, for comparison
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in the checkpoint: a resumed run keeps the best so far
        # The epoch's training predictions and labels, kept on the device and scored once when the epoch ends: a
        # torchmetrics update per step costs more host time than the step's own kernels on a GPU.
        self._train_predictions: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._step_loss: torch.Tensor | None = None  # the current training step's loss and learning rate, for the
        self._step_lr = math.nan  # logging steps (Lightning's own outputs["loss"] is divided by accumulate_grad_batches)
        self.example_input_array = torch.zeros(2, 3, 32, 32)  # (B, C, H, W), for the graph and the summary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, 10) logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x.contiguous(memory_format=self.memory_format))
        loss = self.criterion(logits, y)
        self._train_predictions.append((logits.detach().argmax(1), y))  # (B,) each; one kernel, no sync
        self._step_loss = loss.detach()
        self._step_lr = self.trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step uses
        return loss

    def on_train_batch_end(self, outputs: dict[str, torch.Tensor], batch: Any, batch_idx: int) -> None:
        # Only on the steps Lightning writes to the loggers (every log_every_n_steps, and a step where training is
        # told to stop; the condition is Lightning's should_update_logs, whose _batches_that_stepped + 1 equals the
        # global_step here): each self.log call costs about half a millisecond of Python, more than a whole training
        # step of this model on a GPU. The loggers receive the same values at the same steps as if every step logged;
        # trainer.callback_metrics["train/loss"] changes only on those steps.
        every = self.trainer.log_every_n_steps
        if not ((every and self.global_step % every == 0) or self.trainer.should_stop):
            return
        self.log("train/loss", self._step_loss, on_step=True, on_epoch=False)  # stays a tensor until written
        # Read in training_step: by this hook the scheduler has already moved the rate on to the next step's.
        self.log("train/lr", self._step_lr, on_step=True, on_epoch=False)

    def on_train_epoch_start(self) -> None:
        self._train_predictions.clear()  # an epoch cut short (an exception, Ctrl-C) leaves nothing behind

    def on_train_epoch_end(self) -> None:
        if self._train_predictions:
            predictions, labels = (torch.cat(t) for t in zip(*self._train_predictions))  # (N,) and (N,)
            self.train_acc.update(predictions, labels)
            self._train_predictions.clear()
        log_epoch_now(self.trainer, {"train/acc": self.train_acc.compute()})  # compute() syncs DDP processes
        self.train_acc.reset()

    @property
    def tta(self) -> bool:
        return self.test_flips or self.test_shift > 0

    def test_views(self, x: torch.Tensor) -> torch.Tensor:
        """(V*B, C, H, W): the batch x (B, C, H, W) itself first, then the other test-time views of it.

        test_shift=s adds the image moved s px up-left and s px down-right (reflect-padded, as the training crops
        are); test_flips adds the mirror image of every view. The views are one batch: one forward pass.
        """
        views = [x]
        if self.test_shift:
            s, (h, w) = self.test_shift, x.shape[-2:]
            padded = F.pad(x, (s,) * 4, mode="reflect")  # (B, C, H+2s, W+2s)
            views += [padded[..., :h, :w], padded[..., 2 * s : 2 * s + h, 2 * s : 2 * s + w]]
        if self.test_flips:  # the mirror image is as likely a photo as the image itself
            views += [v.flip(3) for v in views]
        return torch.cat(views)

    def _logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 10) logits averaged over the test-time views, and (B, 10) logits of the images alone."""
        x = x.contiguous(memory_format=self.memory_format)
        if not self.tta:
            logits = self.model(x)
            return logits, logits
        views = self.test_views(x).contiguous(memory_format=self.memory_format)
        per_view = self.model(views).unflatten(0, (-1, len(x)))  # (V, B, 10)
        return per_view.mean(0), per_view[0]

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 10) logits for validation and testing (the model in eval mode), over the test-time views."""
        return self._logits(x)[0]

    def _eval_step(self, batch, loss_metric: MeanMetric, acc_metric: MulticlassAccuracy,
                   single_view_acc: MulticlassAccuracy | None = None) -> torch.Tensor:
        x, y = batch
        logits, alone = self._logits(x)
        if self.tta and single_view_acc is not None:
            single_view_acc.update(alone, y)
        loss_metric.update(self.criterion(logits, y), weight=len(y))
        acc_metric.update(logits, y)
        return logits.argmax(1)  # (B,) predictions, for the test figures

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss, self.val_acc)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        # compute() has already combined every DDP process's share; sync_dist only quiets Lightning's warning
        self.log("val/loss", self.val_loss.compute(), sync_dist=True)
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)
        self.val_loss.reset(), self.val_acc.reset()
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.test_loss, self.test_acc, self.test_acc_no_tta)

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss.compute(), sync_dist=True)
        self.log("test/acc", self.test_acc.compute(), sync_dist=True)
        if self.tta:  # what the test-time views bought, measured on the same checkpoint and images
            self.log("test/acc_no_tta", self.test_acc_no_tta.compute(), sync_dist=True)
        self.test_loss.reset(), self.test_acc.reset(), self.test_acc_no_tta.reset()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class EpochTimer(Callback):
    """Wall seconds of each training epoch (validation excluded) and training images per second.

    Logged as time/epoch_s and time/train_img_per_s (and time/peak_gpu_mem_gib on a GPU); the run's summary uses the
    median over epochs.
    """

    def __init__(self) -> None:
        self.epoch_s: list[float] = []
        self.img_per_s: list[float] = []
        self._start: float | None = None
        self._end: float | None = None
        self._images = 0
        self.test_img_per_s: float | None = None

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":  # once per epoch, never per step
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._end, self._images = self._now(pl_module), None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[1])

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        # Validation runs inside the training epoch, before on_train_epoch_end: stop the clock here.
        if self._start is not None and self._end is None and not trainer.sanity_checking:
            self._end = self._now(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._start is None:
            return
        end = self._end if self._end is not None else self._now(pl_module)
        seconds = end - self._start
        self.epoch_s.append(seconds)
        self.img_per_s.append(self._images / seconds)
        timing = {"time/epoch_s": seconds, "time/train_img_per_s": self._images / seconds}
        if pl_module.device.type == "cuda":
            timing["time/peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        log_epoch_now(trainer, timing)
        self._start = None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._test_start, self._test_images = self._now(pl_module), 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._test_images += len(batch[1])

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.test_img_per_s = self._test_images / (self._now(pl_module) - self._test_start)

    def summary(self) -> dict[str, Any]:
        median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        return {"epoch_s": median(self.epoch_s), "train_img_per_s": median(self.img_per_s),
                "train_img_per_s_by_epoch": list(self.img_per_s), "test_img_per_s": self.test_img_per_s}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_s": self.epoch_s, "img_per_s": self.img_per_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_s, self.img_per_s = list(state_dict["epoch_s"]), list(state_dict["img_per_s"])


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the learning rate there."""


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN/inf loss instead of training on NaN for hours.

    Each step only keeps its loss tensor (no kernel, no host sync); every `check_every_n_steps` steps (default:
    trainer.log_every_n_steps, when Lightning reads the loss anyway) and at the end of each epoch the kept losses are
    checked in one operation, and the error names the first bad step and the learning rate it used.
    """

    def __init__(self, check_every_n_steps: int | None = None):
        self.check_every = check_every_n_steps
        self._losses: list[tuple[int, torch.Tensor]] = []  # (step, () loss on the device) since the last check
        self._lrs: dict[int, float] = {}  # step -> learning rate, since the last check

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._losses.clear()  # left by an epoch that ended in an exception
        self._lrs.clear()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step uses

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._losses.append((trainer.global_step - 1, loss.detach()))  # the optimizer step this loss came from
        if trainer.global_step % (self.check_every or trainer.log_every_n_steps or 1) == 0:
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)

    def _check(self, trainer) -> None:
        if not self._losses:
            return
        steps, losses = zip(*self._losses)
        finite = torch.isfinite(torch.stack(losses))  # (n,) bool
        if bool(finite.all()):  # the one host sync, on a step where Lightning reads the loss anyway
            self._losses.clear()
            self._lrs.clear()
            return
        first_bad = steps[int(finite.int().argmin())]
        lr = self._lrs.get(first_bad, math.nan)
        raise Diverged(
            f"train/loss became NaN or infinite at step {first_bad} (epoch {trainer.current_epoch}), learning rate "
            f"{lr:.3g} there; the learning rate is the likely cause: lower optimizer.lr (or set "
            "trainer.gradient_clip_val)"
        )
