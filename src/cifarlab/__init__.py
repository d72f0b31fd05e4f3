"""cifarlab: train and understand a small CIFAR-10 CNN, one config change at a time."""

import os

# Same config and seed -> same metrics on a CPU. torch's CPU BLAS is MKL, whose results may differ from run to run
# when it picks its thread count dynamically or its code path by CPU; these pin both (set before torch's first BLAS
# call; the Linear layers are the only GEMMs here, so the cost is negligible). A user's own setting wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO")

# Transparent huge pages for torch's large CPU tensors (>= 2 MiB: a batch's activations, the augmented chunks). Without
# them each such tensor is faulted in 4 KiB at a time: a bare step of the documented model took 16,000 page faults
# instead of 1,000 and ran 19 % slower (docs/performance.md, "Training speed ... (CPU)"). torch reads this at its
# first CPU allocation; no effect on a GPU's memory or on any result. A user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# numpy's own BLAS (OpenBLAS, a pthreads build) on one thread. When it splits a call over threads, they spin for
# about 0.1 s afterwards. TensorBoard's weight histograms make such calls at every epoch's end (a dot product of each
# large weight), and the spinning thread took a core from torch's as the next epoch began: its augmentation ran more
# than twice as slow (86-95 against 38 ms an epoch in a short run on 2 cores; docs/results/openblas-spin/). Nothing
# here needs numpy's BLAS to be fast. OpenBLAS reads this when numpy loads (torch imports numpy); OpenMP builds of
# OpenBLAS (torch's own BLAS, where it has one) do not read it. A user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
