"""What goes to TensorBoard beyond scalars: images before and after pooling, MaxUnpool2d reconstructions, the graph,
test-set figures and PR curves, weight histograms (the embedding projector: projector.py).

Each piece is a Lightning callback switched on or off in configs/callbacks/. All of them work on a fixed small
batch or on what the test loop already computed, every N epochs: nothing here runs per training step.
"""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")  # no display: figures are rendered to PNG for TensorBoard

import lightning as L
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import make_grid

from cifarlab.model import BlurMaxPool2d, pool_geometry

GRID_PADDING = 2  # px of white between tiles; tests slice the grids with it
CELL_PADDING = 6  # px of white between the cells of a stage image, each holding one channel's maps side by side
WHITE = 255
TILE = 32  # px: feature maps smaller than this are zoomed by a whole factor


def tensorboard(trainer: L.Trainer) -> SummaryWriter | None:
    """The run's TensorBoard writer; None without a TensorBoard logger, and in every DDP process but rank 0, where
    Lightning hands out a stand-in that ignores every call."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and isinstance(logger.experiment, SummaryWriter):
            return logger.experiment
    return None


def add_image(writer: SummaryWriter, tag: str, image: torch.Tensor, step: int) -> None:
    """A uint8 (C, H, W) image, C = 1 (grey) or 3."""
    writer.add_image(tag, image.cpu(), step, dataformats="CHW")


# ---------------------------------------------------------------------------------------------------------------
# Images before and after pooling


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8, the exact pixels TensorBoard will store."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def scale_per_map(before: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale every (image, channel) map of `before` (K, C, H, W) to [0, 1] by its own min and max, and `others`
    (the same maps after pooling) by the same numbers, so the pooled tiles are the pooling of the shown tiles."""
    lo = before.amin(dim=(2, 3), keepdim=True)
    span = (before.amax(dim=(2, 3), keepdim=True) - lo).clamp_min(1e-12)
    return [((t - lo) / span).clamp(0, 1) for t in (before, *others)]


def tile_factor(h: int, w: int) -> tuple[int, int]:
    """Whole-number zoom that shows an h x w map at about TILE px, so a 4x4 map is as legible as a 32x32 one."""
    return max(1, TILE // h), max(1, TILE // w)


def zoom(maps: torch.Tensor) -> torch.Tensor:
    """uint8 maps (K, C, H, W), each pixel a block of tile_factor(H, W) identical pixels (nearest neighbour)."""
    fy, fx = tile_factor(*maps.shape[-2:])
    return maps.repeat_interleave(fy, 2).repeat_interleave(fx, 3)


def stage_grid(*views: torch.Tensor) -> torch.Tensor:
    """uint8 map sets (K, C, H_i, W_i) of the same images and channels (before pooling, after it, ...) -> one grey
    image (1, H', W'): row k holds image k's C channels left to right, and each channel's cell its maps side by side
    in the order given, each zoomed by a whole factor to about TILE px (and padded white below to the tallest)."""
    zoomed = [zoom(v) for v in views]
    k, c = views[0].shape[:2]
    height = max(z.shape[2] for z in zoomed)
    gap = torch.full((k, c, height, GRID_PADDING), WHITE, dtype=torch.uint8, device=views[0].device)
    parts: list[torch.Tensor] = []
    for z in zoomed:
        below = torch.full((k, c, height - z.shape[2], z.shape[3]), WHITE, dtype=torch.uint8, device=z.device)
        if parts:
            parts.append(gap)
        parts.append(torch.cat([z, below], dim=2))
    cells = torch.cat(parts, dim=3)  # (K, C, H, W_cell)
    grid = make_grid(cells.flatten(0, 1)[:, None], nrow=c, padding=CELL_PADDING, pad_value=WHITE)
    return grid[:1]  # make_grid repeats a grey channel


def views_grid(*views: torch.Tensor, per_row: int) -> torch.Tensor:
    """Equal-size uint8 RGB batches (K, 3, H, W), one per view -> a grid of rows of `per_row` images: images 0..n-1
    in each view, then images n..2n-1 in each view, and so on, so that each view sits right under the one before."""
    k = views[0].shape[0]
    rows = [view[i : i + per_row] for i in range(0, k, per_row) for view in views]
    return make_grid(torch.cat(rows), nrow=per_row, padding=GRID_PADDING, pad_value=WHITE)


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="nearest")  # blocky on purpose: each pooled pixel stays visible


def unpool(pooled: torch.Tensor, indices: torch.Tensor, pool: nn.MaxPool2d, size: torch.Size) -> torch.Tensor:
    """MaxUnpool2d back to `size`: each kept value at the place it came from, zero wherever pooling dropped one."""
    g = pool_geometry(pool)
    return nn.MaxUnpool2d(g["kernel_size"], g["stride"], g["padding"])(pooled, indices, output_size=size[-2:])


def max_with_indices(pool: nn.MaxPool2d) -> nn.MaxPool2d:
    g = pool_geometry(pool)
    return nn.MaxPool2d(g["kernel_size"], g["stride"], g["padding"], g["dilation"], return_indices=True,
                        ceil_mode=g["ceil_mode"])


def pick_images(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of `per_class` images of each class, chosen by seed: the same images every run and every epoch.

    Ordered class 0..9 for the first image of each class, then again for the second, and so on.
    """
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    labels = labels.cpu()[order]
    classes = range(int(labels.max()) + 1)
    return torch.stack([order[labels == c][:per_class] for c in classes], dim=1).flatten()  # (per_class * classes,)


class PoolingImages(Callback):
    """Logs, for a fixed set of validation images (a few per class, chosen by seed):

    once, at the start of training:
      pool/input              the images, one per class in each row of ten
      pool/input/configured   under each row of images, the same after the configured pooling (zoomed to 32x32)
      pool/input/max_vs_avg   under each row, max pooling, then average pooling, with the configured geometry
                              (the seed's CIFAR-10 demonstration)
      pool/input/unpool       under each row, MaxPool2d(return_indices) -> MaxUnpool2d (black = what was dropped)
    at the start and every `every_n_epochs` epochs, for stage i = 1, 2, 3, one image:
      pool/stage{i}           for the first `maps_images` images (a row each) and their first `channels` channels
                              (left to right), each channel's maps side by side: before pooling | after it
                              | (max pooling) its MaxUnpool2d reconstruction; for blurmax, before | the stride-1
                              max map the blur receives | after. Each map is scaled to [0, 1] by its own min/max
                              before pooling, and maps smaller than 32 px are zoomed by a whole factor.
    """

    def __init__(self, every_n_epochs: int = 1, per_class: int = 2, maps_images: int = 4, channels: int = 16,
                 seed: int = 0):
        self.every_n_epochs, self.per_class, self.maps_images = every_n_epochs, per_class, maps_images
        self.channels, self.seed = channels, seed
        self.images: torch.Tensor | None = None  # (K, 3, 32, 32) uint8

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard(trainer)
        if writer is None:
            return
        dm = trainer.datamodule
        self.images = dm.val_x[pick_images(dm.val_y, self.per_class, self.seed).to(dm.val_x.device)]
        self.per_row = len(dm.classes)
        if trainer.global_step > 0:  # a resumed run: logged when it first started
            return
        self.log_inputs(writer, pl_module.model.stage1.pool, trainer.global_step)
        self.log_stages(writer, pl_module, trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard(trainer)
        if writer is not None and self.images is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.log_stages(writer, pl_module, trainer.global_step)

    @torch.no_grad()
    def log_inputs(self, writer: SummaryWriter, pool: nn.Module, step: int) -> None:
        x = self.images.float().cpu() / 255  # (K, 3, 32, 32) in [0, 1]: the images, not the normalised inputs
        size = x.shape[-2:]
        g = pool_geometry(pool)
        max_pool = nn.MaxPool2d(g["kernel_size"], g["stride"], g["padding"], g["dilation"], ceil_mode=g["ceil_mode"])
        avg_pool = nn.AvgPool2d(g["kernel_size"], g["stride"], g["padding"], ceil_mode=g["ceil_mode"])
        pool = pool.cpu()
        kept, indices = max_with_indices(max_pool)(x)
        views = {
            "pool/input": [x],
            "pool/input/configured": [x, upsample(pool(x), size)],
            "pool/input/max_vs_avg": [x, upsample(max_pool(x), size), upsample(avg_pool(x), size)],
            "pool/input/unpool": [x, unpool(kept, indices, max_pool, x.shape)],
        }
        for tag, images in views.items():
            add_image(writer, tag, views_grid(*map(to_uint8, images), per_row=self.per_row), step)

    @torch.no_grad()
    def log_stages(self, writer: SummaryWriter, pl_module: L.LightningModule, step: int) -> None:
        model, was_training = pl_module.model, pl_module.training
        model.eval()  # what the model computes at evaluation: BatchNorm running stats, no dropout
        try:
            x = pl_module.trainer.datamodule.normalizer(self.images[: self.maps_images])
            for i, stage in enumerate(model.stages, start=1):
                before, after, x = stage.pool_io(x)  # (K, C, H, W), (K, C, H', W')
                before, after = before[:, : self.channels].float(), after[:, : self.channels].float()
                add_image(writer, f"pool/stage{i}", stage_grid(*map(to_uint8, stage_views(stage.pool, before, after))),
                          step)
        finally:
            model.train(was_training)


def stage_views(pool: nn.Module, before: torch.Tensor, after: torch.Tensor) -> list[torch.Tensor]:
    """What a stage image shows side by side, each map scaled by its own min and max before pooling: before, after,
    and for max pooling the MaxUnpool2d reconstruction; for blurmax the stride-1 max map between the two."""
    shown_before, shown_after = scale_per_map(before, after)
    if isinstance(pool, BlurMaxPool2d):  # max is monotone, so the before-map's scaling holds for the dense max
        return [shown_before, pool.dense_max(shown_before), shown_after]
    if isinstance(pool, nn.MaxPool2d):
        kept, indices = max_with_indices(pool)(shown_before)
        return [shown_before, shown_after, unpool(kept, indices, pool, shown_before.shape)]
    return [shown_before, shown_after]


# ---------------------------------------------------------------------------------------------------------------
# The graph


def log_graph(writer: SummaryWriter, model: nn.Module, example: torch.Tensor) -> None:
    """add_graph traced in eval mode: RReLU's random slopes and dropout's masks are neither traced nor shown. The
    model must not be compiled yet (torch.jit.trace cannot trace a compiled one): CifarModule compiles it after the
    callbacks' on_train_start."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # add_graph is built on torch.jit.trace, which torch now calls deprecated; GroupNorm's own batch-size check
            # warns when traced. Neither says anything about this graph.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean",
                                    category=torch.jit.TracerWarning)
            writer.add_graph(model, example)
    finally:
        model.train(was_training)


class ModelGraph(Callback):
    """The model's graph, once, at the start of training."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard(trainer)
        if writer is not None and trainer.global_step == 0:  # a resumed run logged it when it first started
            log_graph(writer, pl_module.model, pl_module.example_input_array.to(pl_module.device))  # (2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# Weight histograms


class WeightHistograms(Callback):
    """A histogram of every conv and linear weight, at the start and every `every_n_epochs` epochs."""

    def __init__(self, every_n_epochs: int = 1):
        self.every_n_epochs = every_n_epochs

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard(trainer)
        if writer is None:
            return
        for name, param in pl_module.model.named_parameters():
            writer.add_histogram(f"weights/{name}", param.detach().float().cpu(), trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:  # a resumed run logged it when it first started
            self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._log(trainer, pl_module)


# ---------------------------------------------------------------------------------------------------------------
# Test-set figures


class EvaluationFigures(Callback):
    """On the test set, from the tested checkpoint: a confusion matrix, per-class accuracy (a figure; the scalars are
    the module's), a grid of misclassified images with their true and predicted classes, and one PR curve per class
    (test/pr_curve/<class>: that class's softmax probability as the score, one class against the rest)."""

    def __init__(self, misclassified: int = 32, pr_thresholds: int = 127):
        self.max_wrong, self.pr_thresholds = misclassified, pr_thresholds  # 127: 0.5 is one of the thresholds

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.confmat = MulticlassConfusionMatrix(num_classes=len(trainer.datamodule.classes)).to(pl_module.device)
        self.wrong: list[tuple[torch.Tensor, int, int]] = []
        self.probs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def on_test_batch_end(self, trainer, pl_module, logits: torch.Tensor, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        outputs = logits.argmax(1)
        self.confmat.update(outputs, y)
        self.probs.append(logits.float().softmax(1))
        self.labels.append(y)
        if len(self.wrong) < self.max_wrong:
            for i in (outputs != y).nonzero().flatten()[: self.max_wrong - len(self.wrong)].tolist():
                self.wrong.append((x[i], int(y[i]), int(outputs[i])))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        classes = trainer.datamodule.classes
        counts = self.confmat.compute().cpu()  # (true, predicted)
        per_class = counts.diag() / counts.sum(1).clamp_min(1)  # the module logs test/acc_class/<name>
        writer = tensorboard(trainer)
        if writer is None:
            return
        step = trainer.global_step
        fig, _ = self.confmat.plot(labels=classes)
        fig.set_size_inches(8, 8)
        writer.add_figure("test/confusion_matrix", fig, step)

        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(classes, per_class.numpy(), color="tab:blue")
        ax.set_ylim(0, 1), ax.set_ylabel("test accuracy"), ax.tick_params(axis="x", rotation=45)
        for i, acc in enumerate(per_class.tolist()):
            ax.text(i, acc + 0.02, f"{acc:.0%}", ha="center", fontsize=8)
        fig.tight_layout()
        writer.add_figure("test/per_class_acc", fig, step)

        probs, labels = torch.cat(self.probs).cpu(), torch.cat(self.labels).cpu()
        for c, name in enumerate(classes):
            writer.add_pr_curve(f"test/pr_curve/{name}", labels == c, probs[:, c], step,
                                num_thresholds=self.pr_thresholds)

        if self.wrong:
            undo = trainer.datamodule.normalizer.undo
            writer.add_figure("test/misclassified", labelled_grid(
                [undo(img[None])[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() for img, _, _ in self.wrong],
                [f"{classes[true]}\n→ {classes[pred]}" for _, true, pred in self.wrong]), step)


def labelled_grid(images: list, labels: list[str], cols: int = 8) -> plt.Figure:
    """Images (H, W, 3) in [0, 1], each under its two-line label, `cols` to a row, in one set of axes: a subplot per
    image made the test-set figures take 2.3 s on a 2-core CPU, one set of axes 0.9 s (docs/results/inspection-png/)."""
    rows = (len(images) + cols - 1) // cols
    fig = plt.figure(figsize=(cols * 1.6, rows * 1.9))
    ax = fig.add_axes((0.005, 0.005, 0.99, 0.99))
    ax.axis("off")
    step_x, step_y, label_h = 1.25, 1.45, 0.4  # in image widths: a tile and the gap after it, the label's room
    for k, (img, label) in enumerate(zip(images, labels)):
        x, y = (k % cols) * step_x, (k // cols) * step_y + label_h
        ax.imshow(img, extent=(x, x + 1, y + 1, y), interpolation="nearest")
        ax.text(x + 0.5, y - 0.04, label, ha="center", va="bottom", fontsize=8, color="tab:red")
    ax.set_xlim(-0.05, cols * step_x - 0.2)
    ax.set_ylim(rows * step_y + 0.05, 0)
    ax.set_aspect("equal")
    return fig
