"""cifarlab: train and understand a small CIFAR-10 CNN, one config change at a time."""

import os

# Same config and seed -> same metrics on a CPU. torch's CPU BLAS is MKL, whose results may differ from run to run
# when it picks its thread count dynamically or its code path by CPU; these pin both (set before torch's first BLAS
# call; the Linear layers are the only GEMMs here, so the cost is negligible). A user's own setting wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO")
