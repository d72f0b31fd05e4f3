#!/usr/bin/env python
"""What TensorBoard's event checksums cost a run, with TensorBoard's own pure-Python CRC32C ("python") or
cifarlab.checksums's ("c"): a short synthetic run with the default callbacks, then its event files read back as a
resume does (checkpoint.trim_events reads every record and checks both checksums).

    .venv/bin/python docs/results/event-checksums/probe.py python [overrides]
    .venv/bin/python docs/results/event-checksums/probe.py c [overrides]

One line: the checksum, the event bytes written per epoch (with the run's start and test figures shared out), the
CPU seconds spent in checksums when writing (all on TensorBoard's writer thread), the run's wall seconds
(train.train: training, validation, inspection, test) and those outside its training epochs, and the seconds to read the event files back.
"""

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))
import cifarlab  # noqa: E402,F401  first, as every entry point: its environment defaults precede numpy and torch
import benchmark  # noqa: E402
from cifarlab import checkpoint, checksums, train  # noqa: E402
import lightning as L  # noqa: E402
from tensorboard.summary.writer import record_writer  # noqa: E402

which, overrides = sys.argv[1], sys.argv[2:]
assert which in ("python", "c"), "first argument: python or c"
if which == "c":
    assert checksums.install()
crc = record_writer.masked_crc32c
checksums.install = lambda: which == "c"  # train() keeps the checksum chosen here
spent = {"cpu_s": 0.0, "bytes": 0}


def timed(data):
    start = time.thread_time()  # this thread's CPU only: the writer thread's, not the GIL waits
    value = crc(data)
    spent["cpu_s"] += time.thread_time() - start
    spent["bytes"] += len(data)
    return value


record_writer.masked_crc32c = timed


class TrainingEpochs(L.Callback):
    """Wall seconds inside training epochs (validation, inspection and checkpoints excluded), added up."""

    def __init__(self):
        self.seconds, self.start = 0.0, None

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module):
        if self.start is not None:
            self.seconds += time.perf_counter() - self.start
            self.start = None


cfg = train.settle(benchmark.compose(["data=synthetic", "data.n_train=6000", "data.batch_size=512",
                                      "trainer.max_epochs=8", "trainer.limit_val_batches=1", *overrides]))
with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    timer = TrainingEpochs()
    train.train(cfg, Path(tmp), extra_callbacks=[timer])
    wall = time.perf_counter() - start
    start = time.perf_counter()
    records = sum(1 for path in Path(tmp).glob("events.out.tfevents.*") for _ in checkpoint._records(path))
    read = time.perf_counter() - start
epochs = cfg.trainer.max_epochs
print(f"{which:6s} {' '.join(overrides) or '(default callbacks)'}: {spent['bytes'] / epochs / 1024:.0f} KiB of events "
      f"an epoch, checksums {spent['cpu_s'] * 1000 / epochs:.1f} ms CPU an epoch ({spent['cpu_s']:.3f} s a run), "
      f"run {wall:.2f} s ({wall - timer.seconds:.2f} s outside the training epochs), reading {records} records back {read * 1000:.0f} ms")
