#!/usr/bin/env python
"""Where a training step's time goes, cifarlab against the bare loop, with torch.profiler on whatever device is present.

    .venv/bin/python scripts/profile_step.py --data-root <folder with cifar-10-batches-py/> [overrides]

1. cifarlab: cifarlab.train.train() for 2 epochs with the config and overrides given; steps 30-79 of the second epoch
   are profiled.
2. bare: benchmark.py's BareLoop (the same model, optimizer, batch size, precision and memory format) over pre-loaded
   tensors, shuffled batches: 30 steps of warm-up, 50 profiled, then 200 timed without the profiler.

For each, the ms per profiled step, the top operations by host (self CPU) and device time, and the calls that copy to
the host or wait for the device. On a GPU the question it answers is whether a step is bound by the host (Python,
kernel launches) or by the device: compare the host total per step with the device total per step.

--epoch times the parts of a whole epoch instead, for a cost paid once per epoch rather than per step (and for
batch sizes whose epochs are too short for 30 + --steps steps). cifarlab trains 3 epochs: the second is timed as
time/epoch_s times it (a device sync at its start and where validation begins), the third with a sync at every
group edge as well, split into the lead-in (Lightning's epoch start, the epoch's shuffle, and the augmented chunks
of the first two groups: Lightning fetches one group ahead), each group of steps_per_call steps, the gaps between
groups (Lightning's loop, the chunks of the group after next) and the tail (after the last group, up to
validation). Then the bare loop's epoch of as many steps (its shuffle untimed, as in benchmark.py). The fixed cost
per epoch is what cifarlab's epoch takes beyond its steps at the bare loop's rate.
"""

from __future__ import annotations

import argparse
import statistics
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
    """Profiles training steps [first, first + n) of epoch 1 (the second: cudnn.benchmark and caches settled).

    Lightning hands the module groups of steps_per_call batches, so the profile spans whole groups: from the one
    holding step `first` to the one holding step first + n - 1; `steps` is how many that is.
    """

    def __init__(self, device: torch.device, activities: list, first: int, n: int, title: str, rows: int):
        self.device, self.activities, self.first, self.n = device, activities, first, n
        self.title, self.rows = title, rows
        self.prof: torch.profiler.profile | None = None
        self.done = False
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and self.first in trainer.datamodule.group_batches(batch_idx) and not self.done:
            self.start, self.steps = benchmark.sync(self.device), 0
            self.prof = torch.profiler.profile(activities=self.activities)
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is None:
            return
        span = trainer.datamodule.group_batches(batch_idx)
        self.steps += len(span)
        if self.first + self.n - 1 in span:
            ms = (benchmark.sync(self.device) - self.start) * 1000 / self.steps
            print(f"cifarlab profiled {self.steps} steps: {ms:.3f} ms/step")
            self.prof.__exit__(None, None, None)
            report(self.prof, self.title, self.rows)
            self.prof, self.done = None, True


class EpochParts(L.Callback):
    """Wall times of cifarlab's second epoch (current_epoch 1; synced at its two ends, as EpochTimer) and of the parts
    of its third (current_epoch 2; synced at every group edge too): parts = [(name, steps, seconds), ...]."""

    def __init__(self, device: torch.device):
        self.device = device
        self.epoch1_s: float | None = None
        self.parts: list[tuple[str, int, float]] = []
        self._t: float | None = None
        self._groups = 0  # groups trained this epoch

    def _mark(self, name: str, steps: int = 0) -> None:
        now = benchmark.sync(self.device)
        self.parts.append((name, steps, now - self._t))
        self._t = now

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._groups = 0
        if trainer.current_epoch in (1, 2):
            self._t = benchmark.sync(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 2:
            self._mark("lead-in" if batch_idx == 0 else "gap")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._groups += 1
        if trainer.current_epoch == 2:
            self._mark(f"group {batch_idx}", len(trainer.datamodule.group_batches(batch_idx)))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._groups == trainer.num_training_batches:  # the epoch's end, not a val_check_interval inside it
            self._end(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._end(trainer)  # without validation

    def _end(self, trainer) -> None:
        if trainer.sanity_checking or self._t is None:
            return
        if trainer.current_epoch == 1:
            self.epoch1_s = benchmark.sync(self.device) - self._t
        elif trainer.current_epoch == 2:
            self._mark("tail")
        self._t = None


def epoch_parts(cfg, arrays, device: torch.device) -> None:
    """--epoch: cifarlab's epoch in parts, then the bare loop's epoch of as many steps."""
    from cifarlab import train

    probe = EpochParts(device)
    with tempfile.TemporaryDirectory() as tmp:
        train.train(cfg, Path(tmp), extra_callbacks=[probe])
    steps = sum(n for _, n, _ in probe.parts)
    if probe.epoch1_s is None or not steps:
        sys.exit("error: cifarlab's epochs 2 and 3 never ran whole (trainer.max_steps? several devices?)")
    total = sum(s for _, _, s in probe.parts)
    print(f"cifarlab epoch 2 (synced at its ends, as time/epoch_s): {probe.epoch1_s * 1000:.1f} ms")
    print(f"cifarlab epoch 3, synced at every group edge: {total * 1000:.1f} ms for {steps} steps")
    for name, n, sec in probe.parts:
        per_step = f" ({sec * 1000 / n:.3f} ms/step)" if n else ""
        print(f"  {name:<10} {n:>5} steps {sec * 1000:9.2f} ms{per_step}")

    loop = benchmark.BareLoop(cfg, arrays, device)
    bs = int(cfg.data.batch_size)
    loop.epoch(steps, bs)  # warm-up
    bare = statistics.median(loop.epoch(steps, bs) for _ in range(3))
    in_groups = sum(sec for name, _, sec in probe.parts if name.startswith("group"))
    print(f"bare epoch of {steps} steps (median of 3 after one of warm-up): {bare * 1000:.1f} ms "
          f"({bare * 1000 / steps:.3f} ms/step)")
    print(f"speed cifarlab / bare: {bare / probe.epoch1_s:.3f} (epoch 2); steps alone {bare / in_groups:.3f}; "
          f"fixed cost per epoch (epoch 2 - bare): {(probe.epoch1_s - bare) * 1000:.1f} ms, of which lead-in, gaps "
          f"and tail {(total - in_groups) * 1000:.1f} ms in epoch 3")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/ (or that folder itself)")
    p.add_argument("--steps", type=int, default=50, help="steps profiled (default 50)")
    p.add_argument("--rows", type=int, default=25, help="operations listed per table (default 25)")
    p.add_argument("--epoch", action="store_true", help="time the parts of a whole epoch instead (see above)")
    p.add_argument("overrides", nargs="*", help="cifarlab config overrides (e.g. callbacks=plain data.batch_size=1024)")
    args = p.parse_args()

    from cifarlab import data, train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    first = 30
    epochs = 3 if args.epoch else 2
    cfg = train.settle(benchmark.compose([f"data.root={Path(args.data_root).resolve()}",
                                          f"trainer.max_epochs={epochs}", *args.overrides]))
    arrays = data.load_cifar10(cfg.data.root, download=False)
    n_val = data.val_count(cfg.data.val_size, len(arrays.train_y))
    arrays.train_x, arrays.train_y = arrays.train_x[n_val:], arrays.train_y[n_val:]  # as many images as cifarlab's
    if args.epoch:
        return epoch_parts(cfg, arrays, device)
    bs = int(cfg.data.batch_size)
    steps_per_epoch = len(arrays.train_y) // bs
    if steps_per_epoch < first + args.steps:
        p.error(f"an epoch holds {steps_per_epoch} steps at data.batch_size={bs}; "
                f"{first + args.steps} are needed (--steps {args.steps} after {first} of warm-up)")
    probe = ProfileSteps(device, activities, first, args.steps, "cifarlab " + " ".join(args.overrides), args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        train.train(cfg, Path(tmp), extra_callbacks=[probe])
    if not probe.done:
        p.error(f"steps {first}-{first + args.steps - 1} of the second epoch never ran (trainer.limit_train_batches? "
                "several devices?); profile fewer --steps or train more batches")

    loop = benchmark.BareLoop(cfg, arrays, device)
    order = torch.randperm(len(arrays.train_y), device=device)

    def steps(n: int) -> None:
        for b in range(n):
            start = (b * bs) % (steps_per_epoch * bs)
            loop.step(order[start : start + bs])

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
