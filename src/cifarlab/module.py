"""The LightningModule that trains a CifarNet: loss, torchmetrics accuracy, optimiser and schedule; and the epoch
timer callback that measures what a user waits for."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

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
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.example_input_array = torch.zeros(2, 3, 32, 32)  # (B, C, H, W), for the graph and the summary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, 10) logits

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # the sanity check's validation batch must not count as the best

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self.criterion(logits, y)
        self.train_acc.update(logits, y)
        # Tensors stay on the device; Lightning reads them only every log_every_n_steps.
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.train_acc.compute(), sync_dist=True)
        self.train_acc.reset()

    def _eval_step(self, batch, loss_metric: MeanMetric, acc_metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
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
        return self._eval_step(batch, self.test_loss, self.test_acc)

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss.compute(), sync_dist=True)
        self.log("test/acc", self.test_acc.compute(), sync_dist=True)
        self.test_loss.reset(), self.test_acc.reset()

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
        pl_module.log("time/epoch_s", seconds)
        pl_module.log("time/train_img_per_s", self._images / seconds)
        if pl_module.device.type == "cuda":
            pl_module.log("time/peak_gpu_mem_gib", torch.cuda.max_memory_allocated(pl_module.device) / 2**30)
        self._start = None

    def summary(self) -> dict[str, float | None]:
        median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        return {"epoch_s": median(self.epoch_s), "train_img_per_s": median(self.img_per_s)}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_s": self.epoch_s, "img_per_s": self.img_per_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_s, self.img_per_s = list(state_dict["epoch_s"]), list(state_dict["img_per_s"])
