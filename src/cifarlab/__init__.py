"""cifarlab: train and understand a small CIFAR-10 CNN, one config change at a time."""

import os

# Defaults for libraries that read the environment when they load, so set before torch or numpy is imported. A user's
# own setting wins. Figures for each: docs/performance.md.

# The same config and seed give the same metrics on a CPU: MKL picks neither its thread count nor its code path itself.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO")
# Transparent huge pages for torch's large CPU tensors: a step faults its activations in 2 MiB, not 4 KiB, at a time.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# numpy's own BLAS on one thread: its idle threads spin after each call and take a core from torch's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
