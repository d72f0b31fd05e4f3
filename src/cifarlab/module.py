"""The LightningModule that trains a CifarNet: loss, torchmetrics accuracy, optimiser and schedule; the epoch timer
callback that measures what a user waits for; and the guard that stops a run whose loss is no longer a number."""

from __future__ import annotations

import copy
import math
import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ParallelStrategy
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
        steps_per_epoch: Callable[[], int] | None = None,  # training batches per epoch (for the schedule's length)
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ):
        super().__init__()
        # The module steps the optimizer itself, once per batch of each group of batches Lightning hands it
        # (data.StepGroups): Lightning's per-batch Python is paid once per group, not once per step.
        # trainer.global_step still counts optimizer steps (each LightningOptimizer.step() adds one).
        self.automatic_optimization = False
        self.steps_per_epoch = steps_per_epoch
        self.accumulate, self.clip_val, self.clip_algorithm = (accumulate_grad_batches, gradient_clip_val,
                                                               gradient_clip_algorithm)
        self._batch_in_epoch = 0  # training batches seen this epoch, for accumulation
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
        self.example_input_array = torch.zeros(2, 3, 32, 32)  # (B, C, H, W), for the graph and the summary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, 10) logits

    def training_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], group_idx: int) -> dict[str, Any]:
        """One optimizer step per (images, labels) batch of the group (fewer with accumulate_grad_batches).

        Returns what the callbacks read: the last batch's loss, every batch's loss (n,) on the device, the
        optimizer step each batch belongs to, and the learning rate each of those steps used.
        """
        if isinstance(batches[0], torch.Tensor):  # a plain loader's (images, labels): a group of one batch
            batches = [tuple(batches)]
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        last_group = group_idx + 1 == self.trainer.num_training_batches
        max_steps = self.trainer.max_steps
        losses, steps, lrs, stepped = [], [], [], []  # stepped: the batches that ended an optimizer step
        for i, (x, y) in enumerate(batches):
            step = self.trainer.global_step  # the optimizer step this batch belongs to
            if 0 <= max_steps <= step:
                break  # max_steps falls inside this group: stop where Lightning would have
            logits = self.model(x.contiguous(memory_format=self.memory_format))
            loss = self.criterion(logits, y)
            self._train_predictions.append((logits.detach().argmax(1), y))  # (B,) each; one kernel, no sync
            self._batch_in_epoch += 1
            # Lightning's rule: a step every accumulate_grad_batches batches, and at the epoch's last batch
            steps_now = self._batch_in_epoch % self.accumulate == 0 or (last_group and i + 1 == len(batches))
            with nullcontext() if steps_now else self._no_gradient_sync():
                self.manual_backward(loss / self.accumulate if self.accumulate > 1 else loss)
            losses.append(loss.detach())
            steps.append(step)
            lrs.append(optimizer.param_groups[0]["lr"])  # the rate this step uses
            if steps_now:
                stepped.append(i)
                optimizer.step()  # clips first (on_before_optimizer_step)
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
        # Lightning counts the calls to training_step in _batches_that_stepped (+1 after each) and logs with it as the
        # step: self.log in validation, LearningRateMonitor, DeviceStatsMonitor. Keep it counting optimizer steps.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step - 1
        if not losses:
            return {}
        step_losses = torch.stack(losses)  # (n,): one kernel
        self._log_steps(step_losses, [(steps[i], i) for i in stepped], lrs)
        return {"loss": losses[-1], "step_losses": step_losses, "steps": steps, "lrs": lrs,
                "images": sum(len(y) for _, y in batches[: len(losses)])}

    def _no_gradient_sync(self):
        """Under DDP, for a batch that only accumulates: its backward keeps the gradients on this process
        (DistributedDataParallel.no_sync), and the backward of the batch that steps averages their sum over the
        processes, as Lightning's own accumulation does. One all-reduce per optimizer step, not per batch."""
        strategy = self.trainer.strategy
        return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()

    def _log_steps(self, losses: torch.Tensor, stepped: list[tuple[int, int]], lrs: list[float]) -> None:
        """train/loss and train/lr of every log_every_n_steps-th optimizer step (and of the step where training is
        told to stop), written straight to the loggers at that step: one read from the device per group that holds
        such a step. stepped: (step, index of the batch that ended it) for the steps this group completed; with
        accumulation, a step's values are its last batch's. (self.log would cost about half a millisecond of Python
        per call, more than a training step of this model on a GPU.)"""
        every = self.trainer.log_every_n_steps
        wanted = [(s, i) for s, i in stepped
                  if (every and (s + 1) % every == 0) or (self.trainer.should_stop and (s, i) == stepped[-1])]
        if not wanted:
            return
        values = losses[[i for _, i in wanted]].tolist()  # the one host sync
        for (s, i), loss in zip(wanted, values):
            for lg in self.trainer.loggers:
                lg.log_metrics({"train/loss": loss, "train/lr": lrs[i]}, step=s)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints of the versions that left the optimizer to Lightning count their steps in the automatic loop's
        # progress; this module's global_step reads the manual loop's. Carry the count over, so that such a run
        # resumes at its step. (Lightning calls this hook before it restores the loops from the same dict.)
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        manual = loops.get("epoch_loop.manual_optimization.optim_step_progress")
        automatic = loops.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
        if manual is not None and automatic and not manual["total"]["completed"] and automatic["total"]["completed"]:
            loops["epoch_loop.manual_optimization.optim_step_progress"] = copy.deepcopy(automatic)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Called by the precision plugin after mixed precision has unscaled the gradients and before it steps.
        if self.clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.clip_val,
                                gradient_clip_algorithm=self.clip_algorithm)

    def on_train_epoch_start(self) -> None:
        self._train_predictions.clear()  # an epoch cut short (an exception, Ctrl-C) leaves nothing behind
        self._batch_in_epoch = 0

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
        scheduler = self.scheduler_factory(optimizer, self.total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_steps(self) -> int:
        """Optimizer steps in the whole run: what the schedule spans. (Lightning's estimated_stepping_batches counts
        the groups of batches Lightning hands out, not the steps taken from them.)"""
        batches = self._batches_per_epoch()
        per_epoch = math.ceil(batches / self.accumulate) if math.isfinite(batches) else math.inf
        epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
        total = per_epoch * epochs if epochs is not None and epochs >= 0 else math.inf
        if max_steps is not None and max_steps >= 0:
            total = min(total, max_steps)
        if total == math.inf:
            raise ValueError("the schedule needs a length: set trainer.max_epochs (with a training loader that has a "
                             "length) or trainer.max_steps")
        return int(total)

    def _batches_per_epoch(self) -> float:
        """Training batches per epoch: steps_per_epoch if given, else the datamodule's train_batches() (it hands them
        out in groups), else what Lightning counts in a plain loader (one batch per call; inf without a length)."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch()
        train_batches = getattr(self.trainer.datamodule, "train_batches", None)
        if callable(train_batches):
            return train_batches()
        self.trainer.estimated_stepping_batches  # sets up the training loader, and with it num_training_batches
        return self.trainer.num_training_batches


class EpochTimer(Callback):
    """Wall seconds of each training epoch (validation excluded) and training images per second.

    Logged as time/epoch_s and time/train_img_per_s (and time/peak_gpu_mem_gib on a GPU); the run's summary uses the
    median over epochs.
    """

    reads_every_step = True  # it counts each group's images (config._check_per_batch_hooks)

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
        self._images += outputs.get("images", 0)  # a group of batches (data.StepGroups)

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

    Each group of steps the module trains on (steps_per_call) hands over its losses as one tensor on the device (no
    host sync); after the group that holds a `check_every_n_steps`-th step (default: trainer.log_every_n_steps, when
    the module reads a loss anyway) and at the end of each epoch the kept losses are checked in one operation, and
    the error names the first bad step and the learning rate it used.
    """

    reads_every_step = True  # its batch hooks read each step of a group (config._check_per_batch_hooks)

    def __init__(self, check_every_n_steps: int | None = None):
        self.check_every = check_every_n_steps
        self._losses: list[tuple[list[int], torch.Tensor]] = []  # (steps, (n,) losses on the device) per group
        self._lrs: dict[int, float] = {}  # step -> learning rate, since the last check

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._losses.clear()  # left by an epoch that ended in an exception
        self._lrs.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not outputs:
            return
        self._losses.append((outputs["steps"], outputs["step_losses"]))  # the optimizer step each loss came from
        self._lrs.update(zip(outputs["steps"], outputs["lrs"]))
        every = self.check_every or trainer.log_every_n_steps or 1
        if trainer.global_step // every > outputs["steps"][0] // every:  # a check_every-th step was in the group
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)

    def _check(self, trainer) -> None:
        if not self._losses:
            return
        steps = [s for group, _ in self._losses for s in group]
        finite = torch.isfinite(torch.cat([losses for _, losses in self._losses]))  # (n,) bool
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
