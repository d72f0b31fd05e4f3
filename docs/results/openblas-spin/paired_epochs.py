#!/usr/bin/env python
"""Epochs after an inspection whose histograms ran numpy's BLAS on 2 threads against epochs after one on 1 thread,
alternating in one process (so the machine's drift falls on both alike): the median training epoch of each.

    OPENBLAS_NUM_THREADS=2 .venv/bin/python docs/results/openblas-spin/paired_epochs.py [epochs] [phase] [overrides]

numpy's OpenBLAS must start with 2 threads (the variable, read when numpy loads); each epoch then sets how many its
end-of-epoch inspection uses (openblas_set_num_threads through ctypes): 2 in even epochs and 1 in odd ones, or the
other way round with phase 1 (run both: an epoch's parity could matter in itself). The epoch after it is the one
timed. A short synthetic run with the default callbacks (inspection every epoch), as epoch_probe.py.
"""

import ctypes
import glob
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))
import cifarlab  # noqa: E402,F401
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import benchmark  # noqa: E402
from cifarlab import data, train  # noqa: E402

if os.environ.get("OPENBLAS_NUM_THREADS") != "2":
    sys.exit("run with OPENBLAS_NUM_THREADS=2 (numpy's OpenBLAS must start a second thread to switch to)")
found = glob.glob(str(Path(np.__file__).parent.parent / "numpy.libs" / "libscipy_openblas64_*.so"))
if not found:
    sys.exit("numpy's own OpenBLAS (numpy.libs/libscipy_openblas64_*.so, as in numpy's wheels) was not found")
lib = ctypes.CDLL(found[0])


epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 24
phase = int(sys.argv[2]) if len(sys.argv) > 2 else 0


def threads_at(epoch: int) -> int:
    return 2 if (epoch + phase) % 2 == 0 else 1


class AlternateBlasThreads(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:  # before this epoch's inspection, at its end
        lib.scipy_openblas_set_num_threads64_(threads_at(trainer.current_epoch))


cfg = train.settle(benchmark.compose(["data=synthetic", "data.n_train=6000", "data.batch_size=512",
                                      f"trainer.max_epochs={epochs}", "trainer.limit_val_batches=1", *sys.argv[3:]]))
with tempfile.TemporaryDirectory() as tmp:
    metrics = train.train(cfg, Path(tmp), extra_callbacks=[AlternateBlasThreads()])
n_train = cfg.data.n_train - data.val_count(cfg.data.val_size, cfg.data.n_train)
images = n_train // cfg.data.batch_size * cfg.data.batch_size  # an epoch's images: whole batches only
ms = [images / rate * 1000 for rate in metrics["train_img_per_s_by_epoch"]]
# Epoch e follows epoch e-1's inspection. Epochs 0 and 1 are left out as warm-up.
after2 = [ms[e] for e in range(2, epochs) if threads_at(e - 1) == 2]
after1 = [ms[e] for e in range(2, epochs) if threads_at(e - 1) == 1]
print("epoch ms:", [round(x) for x in ms])
print(f"phase {phase}: epochs after a 2-thread inspection: median {statistics.median(after2):.0f} ms ({len(after2)}); "
      f"after a 1-thread one: {statistics.median(after1):.0f} ms ({len(after1)}); "
      f"difference {statistics.median(after2) - statistics.median(after1):+.0f} ms")
