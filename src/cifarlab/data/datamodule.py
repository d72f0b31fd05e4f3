"""Lightning's handle on the data: the three splits of a cifar10.CifarArrays, moved once to the training device and
handed out as batches.DeviceBatches (shuffled, cropped, flipped and normalised there)."""

from __future__ import annotations

import lightning as L
import torch

from cifarlab.data.batches import DeviceBatches, Normalize, channel_stats, split_indices
from cifarlab.data.cifar10 import CifarArrays


class CifarDataModule(L.LightningDataModule):
    """Holds the three splits as uint8 tensors on the training device and hands out DeviceBatches."""

    def __init__(
        self,
        arrays: CifarArrays,
        n_val: int,
        split_seed: int,
        batch_size: int,
        eval_batch_size: int,
        normalize: bool,
        flip: bool | str,
        crop_padding: int,
        seed: int,
        channels_last: bool = False,
    ):
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.arrays, self.seed = arrays, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.flip, self.crop_padding = flip, crop_padding
        train_idx, val_idx = split_indices(len(arrays.train_y), n_val, split_seed)
        # channels_last: the training views are cut from whole pixel rows (DeviceBatches.pixel_rows) without a copy
        self.train_x = arrays.train_x[train_idx].contiguous(memory_format=torch.channels_last)
        self.train_y = arrays.train_y[train_idx]
        self.val_x, self.val_y = arrays.train_x[val_idx], arrays.train_y[val_idx]
        self.test_x, self.test_y = arrays.test_x, arrays.test_y
        if normalize:  # statistics of the training split itself, so stand-in or synthetic data is centred too
            self.normalizer = Normalize(*channel_stats(self.train_x))
        else:
            self.normalizer = Normalize(torch.zeros(3), torch.ones(3))
        self._device: torch.device | None = None

    @property
    def classes(self) -> list[str]:
        return self.arrays.classes

    def setup(self, stage: str) -> None:
        # Move every split to the training device once; afterwards a batch is an index into device memory.
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if device != self._device:
            for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
                setattr(self, name, getattr(self, name).to(device))
            self.normalizer = self.normalizer.to(device)
            self._device = device

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _shard(self) -> dict[str, int]:
        if self.trainer is None:
            return {"rank": 0, "world": 1}
        return {"rank": self.trainer.global_rank, "world": self.trainer.world_size}

    def train_dataloader(self) -> DeviceBatches:
        return DeviceBatches(self.train_x, self.train_y, self.batch_size, self.normalizer, train=True, seed=self.seed,
                             epoch=self._epoch, flip=self.flip, crop_padding=self.crop_padding,
                             memory_format=self.memory_format, **self._shard())

    def val_dataloader(self) -> DeviceBatches:
        return DeviceBatches(self.val_x, self.val_y, self.eval_batch_size, self.normalizer, **self._shard())

    def test_dataloader(self) -> DeviceBatches:
        return DeviceBatches(self.test_x, self.test_y, self.eval_batch_size, self.normalizer, **self._shard())
