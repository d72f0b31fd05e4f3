"""Batches cut, augmented and normalised on the training device, from uint8 tensors that already live there.

Augmentation (random crop, flip) and normalisation work on many images at once wherever the tensors live, CPU or
GPU (airbench's habit); the same seed gives the same batches, and a resumed epoch replays them.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

def val_count(val_size: int | float, n_train: int) -> int:
    """data.val_size as an image count: a fraction in (0, 1) of the training set, or a count."""
    n = math.floor(val_size * n_train) if isinstance(val_size, float) else int(val_size)
    if not 1 <= n < n_train:
        raise ValueError(f"{val_size} leaves {n} validation and {n_train - n} training images of {n_train}")
    return n


def split_indices(n: int, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]  # train, val


def crop_offsets(n: int, padding: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offsets (n, 1) each, uniform in 0..2*padding, drawn from g (rows first)."""
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=g, device=g.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=g, device=g.device)
    return dy, dx


def window_indices(
    dy: torch.Tensor | None, dx: torch.Tensor | None, flip: torch.Tensor | None, padding: int, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source rows (B, H) and columns (B, W) of each image's augmented view: the HxW window at offset (dy, dx) (B, 1)
    of the image reflect-padded by `padding` px (no crop where dy is None), mirrored left-right where flip (B,) is
    True (no mirror where it is None). images[i[:, None, None], :, rows[:, :, None], cols[:, None, :]] is the views of
    images[i], as (B, H, W, C): pad, crop and flip as pure indexing over uint8 pixels."""
    some = dy if dy is not None else flip
    if some is None:
        raise ValueError("window_indices needs crop offsets, flips, or both")
    rows = torch.arange(h, device=some.device).expand(len(some), h)  # (B, H)
    cols = torch.arange(w, device=some.device).expand(len(some), w)  # (B, W)
    if flip is not None:  # mirroring the window: its column j is the window's column w - 1 - j
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
    if dy is not None:  # window position -> padded position -> the source pixel the reflect padding copied there
        rows, cols = _reflect(rows + (dy - padding), h), _reflect(cols + (dx - padding), w)
    return rows, cols


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Positions i in [-(n - 1), 2(n - 1)] on an axis of n, mapped into [0, n) as mode="reflect" padding does."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def coin_flips(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) < 0.5  # (n,) bool


def alternating_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of n training images to mirror in this epoch (airbench's alternating flip).

    Epoch 0 mirrors a random half (seeded per run); every odd epoch mirrors exactly the other half, every even one the
    first half again. Each image is so seen both ways in every two epochs; with coin flips, half of the images are
    seen the same way round in two epochs running.
    """
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed * 100_003 + 7)) < 0.5  # (n,)
    return first ^ bool(epoch % 2)


# Training images augmented together: a few large operations instead of a dozen small ones per batch on a GPU; on a
# CPU large chunks fall out of the cache (docs/performance.md, "The data path").
PREP_IMAGES = {"cuda": 8192, "cpu": 1024}


class DeviceBatches:
    """(images, labels) batches cut from uint8 tensors that already live on the training device.

    Training batches are shuffled by a permutation seeded with (seed, epoch), then cropped, flipped and normalised
    several batches at a time (PREP_IMAGES) into float tensors in the model's memory format; a training step only
    takes a slice. Each batch's random draws come from a generator seeded with (seed, epoch, batch): the same seed
    gives the same batches, and a resumed epoch replays them exactly.
    """

    def __init__(
        self,
        images: torch.Tensor,  # (N, 3, 32, 32) uint8
        labels: torch.Tensor,  # (N,) int64
        batch_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor],  # uint8 batch -> normalised float batch
        *,
        train: bool = False,
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
        flip: bool | str = False,  # True: coin flips; "alternate": alternating_flips
        crop_padding: int = 0,
        rank: int = 0,
        world: int = 1,
        memory_format: torch.memory_format = torch.contiguous_format,  # of the training batches
    ):
        self.images, self.labels, self.batch_size, self.transform = images, labels, batch_size, transform
        self.train, self.seed, self.epoch, self.flip, self.crop_padding = train, seed, epoch, flip, crop_padding
        self.rank, self.world = rank, world  # under DDP each process takes every world-th image from rank on
        self.memory_format = memory_format
        # The pixels as (N, H, W, C) rows, from which training views are cut: no copy where images are channels_last
        # in memory, as CifarDataModule keeps its training split.
        self.pixel_rows = images.permute(0, 2, 3, 1).contiguous() if train and (flip or crop_padding) else None

    def __len__(self) -> int:
        if not self.train:
            return math.ceil(len(range(self.rank, len(self.labels), self.world)) / self.batch_size)
        return len(self.labels) // self.world // self.batch_size  # whole batches: drops the tail

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.batch_size
        if not self.train:
            images, labels = self.images[self.rank :: self.world], self.labels[self.rank :: self.world]
            for i in range(0, len(labels), bs):
                yield self.transform(images[i : i + bs]), labels[i : i + bs]
            return
        epoch = self.epoch()
        device = self.images.device
        # Same permutation on every rank (same seed), then each rank its own slice of it.
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        order = order[self.rank :: self.world][: len(self) * bs].to(device)  # whole batches only
        mirror = None
        if self.flip == "alternate":  # indexed by image (not by position in the epoch), so the halves swap each epoch
            mirror = alternating_flips(len(self.labels), self.seed, epoch).to(device)
        per_prep = max(1, PREP_IMAGES.get(device.type, PREP_IMAGES["cpu"]) // bs)  # batches
        for first in range(0, len(self), per_prep):
            batches = range(first, min(first + per_prep, len(self)))
            idx = order[first * bs : batches[-1] * bs + bs]
            x, y = self.augment(idx, epoch, batches, mirror), self.labels[idx]  # (P, 3, 32, 32) float, (P,)
            for b in range(0, len(idx), bs):
                yield x[b : b + bs], y[b : b + bs]  # views: a step launches no data kernels

    def augment(self, idx: torch.Tensor, epoch: int, batches: range, mirror: torch.Tensor | None) -> torch.Tensor:
        """The images at idx (those of `batches`) cropped, flipped and normalised: (P, 3, 32, 32) float in the
        model's memory format.

        Each batch's random numbers come from a generator of its own, seeded with (seed, epoch, batch), drawn as
        augmenting that batch alone would draw them (tests/test_data.py compares every batch).
        """
        dy, dx, flips = [], [], []
        for b in batches:
            step = (self.seed * 100_003 + epoch) * 100_003 + b
            g = torch.Generator(device=idx.device).manual_seed(step * self.world + self.rank)
            if self.crop_padding:
                dy_b, dx_b = crop_offsets(self.batch_size, self.crop_padding, g)
                dy.append(dy_b), dx.append(dx_b)
            if self.flip and self.flip != "alternate":
                flips.append(coin_flips(self.batch_size, g))
        flip = mirror[idx] if mirror is not None else torch.cat(flips) if flips else None  # (P,) bool
        if dy or flip is not None:
            n, h, w, c = self.pixel_rows.shape
            rows, cols = window_indices(torch.cat(dy) if dy else None, torch.cat(dx) if dx else None, flip,
                                        self.crop_padding, h, w)
            # Each view's rows as whole (W*C)-byte lines, then its columns within them: two plain gathers, 4x faster
            # than one 4-index advanced indexing (docs/results/cpu-row-gather/).
            source_rows = (idx[:, None] * h + rows).flatten()  # (P*H,) rows of the training split's pixel rows
            x = self.pixel_rows.view(n * h, w * c).index_select(0, source_rows).view(-1, h, w * c)  # (P, H, W*C)
            row_bytes = (cols[:, :, None] * c + torch.arange(c, device=cols.device)).view(-1, 1, w * c)  # (P, 1, W*C)
            x = x.gather(2, row_bytes.expand(-1, h, -1)).view(-1, h, w, c)  # (P, H, W, C) uint8
            x = x.permute(0, 3, 1, 2)  # (P, C, H, W), channels_last in memory
        else:
            x = self.images[idx]  # (P, 3, H, W) uint8
        x = x.contiguous(memory_format=self.memory_format)  # uint8: a copy only where the layout differs
        return self.transform(x).contiguous(memory_format=self.memory_format)  # floats in that layout


class Normalize:
    """uint8 or [0, 1] float images -> float, minus mean, over std, per channel (identity stats = ToTensor)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def to(self, device: torch.device) -> "Normalize":
        return Normalize(self.mean.to(device), self.std.to(device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return (x - self.mean) / self.std
        out = torch.empty_like(x, dtype=torch.float32)  # normalised in place: the same numbers, no temporaries
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # As (N*H, W*C) pixel lines, with the stats repeated along a line: 3x faster than broadcasting (1, C, 1, 1)
            # over NHWC memory (docs/performance.md, "The data path").
            n, c, h, w = x.shape
            lines = lambda t: t.permute(0, 2, 3, 1).view(n * h, w * c)  # noqa: E731
            lines(out).copy_(lines(x)).div_(255).sub_(self.mean.flatten().repeat(w)).div_(self.std.flatten().repeat(w))
            return out
        return out.copy_(x).div_(255).sub_(self.mean).div_(self.std)

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] images, for showing them."""
        return x * self.std + self.mean


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std in [0, 1] units of uint8 images (N, 3, H, W), from each channel's histogram of the
    256 values: exact float64 sums without a float64 copy of every pixel, 40x faster (docs/performance.md)."""
    c = images.shape[1]
    pixels = images.transpose(0, 1).reshape(c, -1)  # (C, N*H*W)
    counts = torch.stack([torch.bincount(pixels[i], minlength=256) for i in range(c)]).cpu().double()  # (C, 256)
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(1)  # (C,)
    mean = counts @ values / n
    var = (counts * (values - mean[:, None]) ** 2).sum(1) / (n - 1)  # the unbiased variance, as Tensor.std gives
    return mean.float(), var.sqrt().float()


def images_in(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """The images in an (images, labels) batch: the batch_size_fn Lightning's ThroughputMonitor asks for."""
    return len(batch[1])
