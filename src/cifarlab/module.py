"""The LightningModule that trains a CifarNet: loss, torchmetrics accuracy, optimiser and schedule, with Lightning's
own loop (automatic optimization), so the Trainer's arguments and a user's callbacks work as they do anywhere."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
# (optimizer, total optimizer steps) -> a scheduler stepped every step
SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


def log_epoch_now(trainer: L.Trainer, metrics: dict[str, float | torch.Tensor]) -> None:
    """Write epoch-end scalars to the loggers now, at the epoch's last step.

    self.log() in on_train_epoch_end reaches the loggers after the epoch's checkpoint is written; a run killed in
    between and resumed from that checkpoint would never log them. Written here, they precede it.
    """
    if trainer.sanity_checking:
        return
    values = {k: float(v) for k, v in metrics.items()}
    for lg in trainer.loggers:
        lg.log_metrics(values, step=trainer.global_step - 1)


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
        compile: bool = False,
    ):
        super().__init__()
        # load_from_checkpoint(path, model=<a CifarNet>, optimizer=None) restores the rest; not shown in the loggers
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"], logger=False)
        self.model = model
        self.compile_model = compile  # torch.compile in place: the state_dict keys, and so checkpoints, stay the same
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
        per_class = lambda: MulticlassAccuracy(num_classes, average=None, validate_args=False)  # noqa: E731
        self.test_acc_class, self.test_acc_class_no_tta = per_class(), per_class()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in the checkpoint: a resumed run keeps the best so far
        self.example_input_array = torch.zeros(2, 3, 32, 32)  # (B, C, H, W), for the graph and the summary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, 10) logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x.contiguous(memory_format=self.memory_format))
        loss = self.criterion(logits, y)
        self.train_acc.update(logits.detach(), y)  # on the device; read once, when the epoch ends
        self.log("train/loss", loss)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])  # the rate this step uses
        return loss

    def on_train_start(self) -> None:
        # Lightning calls the callbacks' on_train_start first: ModelGraph has traced the eager model by now.
        if self.compile_model and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def on_train_epoch_end(self) -> None:
        acc = self.train_acc.compute()  # compute() syncs DDP processes
        # For the callbacks (EarlyStopping(monitor="train/acc"), ModelCheckpoint), which run after this hook...
        self.log("train/acc", acc, on_epoch=True, logger=False, sync_dist=True)
        log_epoch_now(self.trainer, {"train/acc": acc})  # ...and for the loggers, before the epoch's checkpoint
        self.train_acc.reset()

    @property
    def tta(self) -> bool:
        return self.test_flips or self.test_shift > 0

    def test_views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The batch x (B, C, H, W) itself first, then its other test-time views, each (B, C, H, W).

        test_shift=s adds the image moved s px up-left and s px down-right (reflect-padded, as the training crops
        are); test_flips adds the mirror image of every view.
        """
        views = [x]
        if self.test_shift:
            s, (h, w) = self.test_shift, x.shape[-2:]
            padded = F.pad(x, (s,) * 4, mode="reflect")  # (B, C, H+2s, W+2s)
            views += [padded[..., :h, :w], padded[..., 2 * s : 2 * s + h, 2 * s : 2 * s + w]]
        if self.test_flips:  # the mirror image is as likely a photo as the image itself
            views += [v.flip(3) for v in views]
        return views

    def tta_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 10) logits averaged over the test-time views, and (B, 10) logits of the images alone.

        One forward pass a view, never one over all the views at once: on a CPU, a batch whose activations outgrow
        the cache is several times slower per image (docs/performance.md, "Evaluation in batches that fit the cache").
        """
        views = self.test_views(x)  # [x] alone without test-time views
        per_view = [self.model(v.contiguous(memory_format=self.memory_format)) for v in views]  # V x (B, 10)
        if len(per_view) == 1:
            return per_view[0], per_view[0]
        return torch.stack(per_view).mean(0), per_view[0]

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 10) logits for validation and testing (the model in eval mode), over the test-time views."""
        return self.tta_logits(x)[0]

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.eval_logits(x)
        self.val_loss.update(self.criterion(logits, y), weight=len(y))
        self.val_acc.update(logits, y)

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
        x, y = batch
        logits, alone = self.tta_logits(x)
        self.test_loss.update(self.criterion(logits, y), weight=len(y))
        self.test_acc.update(logits, y), self.test_acc_class.update(logits, y)
        if self.tta:
            self.test_acc_no_tta.update(alone, y), self.test_acc_class_no_tta.update(alone, y)
        return logits  # (B, 10), for the test figures and PR curves

    def on_test_epoch_end(self) -> None:
        names = getattr(self.trainer.datamodule, "classes", None) or range(self.hparams.num_classes)
        self.log("test/loss", self.test_loss.compute(), sync_dist=True)
        self.log("test/acc", self.test_acc.compute(), sync_dist=True)
        for name, acc in zip(names, self.test_acc_class.compute()):
            self.log(f"test/acc_class/{name}", acc, sync_dist=True)
        if self.tta:  # what the test-time views bought, measured on the same checkpoint and images
            self.log("test/acc_no_tta", self.test_acc_no_tta.compute(), sync_dist=True)
            for name, acc in zip(names, self.test_acc_class_no_tta.compute()):
                self.log(f"test/acc_class_no_tta/{name}", acc, sync_dist=True)
        for metric in (self.test_loss, self.test_acc, self.test_acc_class, self.test_acc_no_tta,
                       self.test_acc_class_no_tta):
            metric.reset()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        # the schedule spans the run's optimizer steps: Lightning counts them (epochs, limits, accumulation, max_steps)
        scheduler = self.scheduler_factory(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
