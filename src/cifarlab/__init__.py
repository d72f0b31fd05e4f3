"""cifarlab: train and understand a small CIFAR-10 CNN, one config change at a time."""

import os

# Same config and seed -> same metrics on a CPU. torch's CPU BLAS is MKL, whose results may differ from run to run
# when it picks its thread count dynamically or its code path by CPU; these pin both (set before torch's first BLAS
# call; the Linear layers are the only GEMMs here, so the cost is negligible). A user's own setting wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO")

# Transparent huge pages for torch's large CPU tensors (>= 2 MiB: a batch's activations, the augmented chunks). Without
# them each such tensor is a fresh mmap whose pages fault in one 4 KiB page at a time, and a step's speed then swings
# by a third with the process's allocation history (docs/performance.md, "Training speed ... (CPU)"). torch reads
# this at its first CPU allocation; no effect on a GPU's memory or on any result. A user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
