#!/usr/bin/env python
"""A short synthetic run with cifarlab's default callbacks: the median training epoch, the median time of each epoch's
first augmented chunk (the work that follows the inspection) and of the other chunks, and the median of each epoch's
chunks added up. Epoch 0 is left out. At 10 batches an epoch Lightning takes all of them in one group of 16, so every
chunk is augmented at the epoch's start, within 0.1 s of the inspection.

    .venv/bin/python docs/results/openblas-spin/epoch_probe.py [overrides]
    OPENBLAS_NUM_THREADS=2 .venv/bin/python docs/results/openblas-spin/epoch_probe.py    # numpy's BLAS as before

One line: the OpenBLAS setting, the overrides, then the medians in ms.
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))
import cifarlab  # noqa: E402,F401  first, as every entry point: its environment defaults precede numpy and torch
import benchmark  # noqa: E402
from cifarlab import data, train  # noqa: E402

chunks: list[tuple[int, int, float]] = []  # (epoch, first batch of the chunk, ms)
augment = data.DeviceBatches.augment


def timed_augment(self, idx, epoch, batches, mirror):
    start = time.perf_counter()
    out = augment(self, idx, epoch, batches, mirror)
    chunks.append((epoch, batches[0], (time.perf_counter() - start) * 1000))
    return out


data.DeviceBatches.augment = timed_augment
overrides = sys.argv[1:]
cfg = train.settle(benchmark.compose(["data=synthetic", "data.n_train=6000", "data.batch_size=512",
                                      "trainer.max_epochs=16", "trainer.limit_val_batches=1", *overrides]))
with tempfile.TemporaryDirectory() as tmp:
    metrics = train.train(cfg, Path(tmp))
n_train = cfg.data.n_train - data.val_count(cfg.data.val_size, cfg.data.n_train)
images = n_train // cfg.data.batch_size * cfg.data.batch_size  # an epoch's images: whole batches only
epoch_ms = statistics.median(images / rate * 1000 for rate in metrics["train_img_per_s_by_epoch"][1:])
first = statistics.median(ms for e, b, ms in chunks if e >= 1 and b == 0)
others = statistics.median(ms for e, b, ms in chunks if e >= 1 and b != 0)
per_epoch = statistics.median(sum(ms for e, _, ms in chunks if e == epoch)
                              for epoch in range(1, cfg.trainer.max_epochs))
print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')} {' '.join(overrides) or '(default callbacks)'}: "
      f"epoch {epoch_ms:.0f} ms, first chunk {first:.1f} ms, other chunks {others:.1f} ms, all the epoch's chunks "
      f"{per_epoch:.0f} ms")
