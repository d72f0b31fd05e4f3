#!/usr/bin/env python
"""Where a training step's time goes, cifarlab against the bare loop, with torch.profiler on whatever device is present.

    .venv/bin/python scripts/profile_step.py --data-root <folder with cifar-10-batches-py/> [overrides]

1. cifarlab: cifarlab.train.run() for 2 epochs with the config and overrides given; steps 30-79 of the second epoch
   are profiled.
2. bare: benchmark.py's BareLoop (the same model, optimizer, batch size, precision and memory format) over pre-loaded
   tensors, shuffled batches: 30 steps of warm-up, 50 profiled, then 200 timed without the profiler.

For each, the ms per profiled step, the top operations by host (self CPU) and device time, and the calls that copy to
the host or wait for the device. On a GPU the question it answers is whether a step is bound by the host (Python,
kernel launches) or by the device: compare the host total per step with the device total per step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cifarlab  # noqa: F401  first: its environment defaults must precede lightning's first tensor
import lightning as L
import torch

import benchmark

SYNC_NAMES = ("Synchronize", "MemcpyDtoH", "cudaMemcpy", "Memcpy DtoH", "aten::item", "aten::_local_scalar_dense")


def report(prof: torch.profiler.profile, title: str, rows: int) -> None:
    ops = prof.key_averages()
    print(f"==== {title}: top by self CPU")
    print(ops.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50))
    if torch.cuda.is_available():
        print(f"==== {title}: top by device time")
        print(ops.table(sort_by="self_device_time_total", row_limit=rows // 2, max_name_column_width=50))
    for op in ops:
        if any(name in op.key for name in SYNC_NAMES):
            print(f"  {op.key}: {op.count} calls")


class ProfileSteps(L.Callback):
    """Profiles training steps [first, first + n) of epoch 1 (the second: cudnn.benchmark and caches settled)."""

    def __init__(self, device: torch.device, activities: list, first: int, n: int, title: str, rows: int):
        self.device, self.activities, self.first, self.n = device, activities, first, n
        self.title, self.rows = title, rows
        self.prof: torch.profiler.profile | None = None
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == self.first and not self.done:
            self.start = benchmark.sync(self.device)
            self.prof = torch.profiler.profile(activities=self.activities)
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is not None and batch_idx == self.first + self.n - 1:
            ms = (benchmark.sync(self.device) - self.start) * 1000 / self.n
            print(f"cifarlab profiled {self.n} steps: {ms:.3f} ms/step")
            self.prof.__exit__(None, None, None)
            report(self.prof, self.title, self.rows)
            self.prof, self.done = None, True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/ (or that folder itself)")
    p.add_argument("--steps", type=int, default=50, help="steps profiled (default 50)")
    p.add_argument("--rows", type=int, default=25, help="operations listed per table (default 25)")
    p.add_argument("overrides", nargs="*", help="cifarlab config overrides (e.g. callbacks=plain data.batch_size=1024)")
    args = p.parse_args()

    from cifarlab import prepare, train

    from cifarlab.data import batches, cifar10

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    first = 30
    cfg = prepare.settle(benchmark.compose([f"data.root={Path(args.data_root).resolve()}", "trainer.max_epochs=2",
                                            *args.overrides]))
    arrays = cifar10.load_cifar10(cfg.data.root, download=False)
    n_val = batches.val_count(cfg.data.val_size, len(arrays.train_y))
    arrays.train_x, arrays.train_y = arrays.train_x[n_val:], arrays.train_y[n_val:]  # as many images as cifarlab's
    bs = int(cfg.data.batch_size)
    steps_per_epoch = len(arrays.train_y) // bs
    if steps_per_epoch < first + args.steps:
        p.error(f"an epoch holds {steps_per_epoch} steps at data.batch_size={bs}; "
                f"{first + args.steps} are needed (--steps {args.steps} after {first} of warm-up)")
    probe = ProfileSteps(device, activities, first, args.steps, "cifarlab " + " ".join(args.overrides), args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        train.run(cfg, Path(tmp), extra_callbacks=[probe])
    if not probe.done:
        p.error(f"steps {first}-{first + args.steps - 1} of the second epoch never ran (trainer.limit_train_batches? "
                "several devices?); profile fewer --steps or train more batches")

    loop = benchmark.BareLoop(cfg, arrays, device)
    order = torch.randperm(len(arrays.train_y), device=device)

    def steps(n: int) -> None:
        for b in range(n):
            start = (b * bs) % (steps_per_epoch * bs)
            idx = order[start : start + bs]
            loop.step(loop.train_x[idx], loop.train_y[idx])

    steps(first)
    start = benchmark.sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        steps(args.steps)
        benchmark.sync(device)
    print(f"bare profiled {args.steps} steps: {(time.perf_counter() - start) * 1000 / args.steps:.3f} ms/step")
    report(prof, "bare", args.rows)
    start = benchmark.sync(device)
    steps(4 * args.steps)
    print(f"bare unprofiled: {(benchmark.sync(device) - start) * 1000 / (4 * args.steps):.3f} ms/step")


if __name__ == "__main__":
    sys.exit(main())
