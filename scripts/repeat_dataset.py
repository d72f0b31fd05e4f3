#!/usr/bin/env python
"""Write a CIFAR-10 folder in the official python layout whose images repeat those of a smaller one.

For speed measurements only, where the full data cannot be had: images per second do not depend on which images
they are, so a 5,438-image subset repeated to 50,000 training and 10,000 test images times a full-size epoch. No
accuracy measured on such a folder means anything (its test images are copies of its training images).

    .venv/bin/python scripts/repeat_dataset.py <folder with cifar-10-batches-py/> <new folder> \\
        [--train 50000 --test 10000]
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cifarlab import cifar10  # noqa: E402


def repeat(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(n) % len(labels)
    return images[idx], labels[idx]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="folder holding cifar-10-batches-py/ (or that folder itself)")
    p.add_argument("dest", type=Path, help="new folder; cifar-10-batches-py/ is written inside it")
    p.add_argument("--train", type=int, default=50_000, help="training images, split over 5 batch files")
    p.add_argument("--test", type=int, default=10_000, help="test images")
    args = p.parse_args()
    if args.train < 5 or args.test < 1:
        p.error(f"--train {args.train} --test {args.test}: need at least 5 training and 1 test image")
    arrays = cifar10.load_cifar10(args.source, download=False)
    out = args.dest / cifar10.FOLDER
    if out.exists():
        p.error(f"{out} exists; give a new folder")
    out.mkdir(parents=True)
    flat = lambda x: x.reshape(len(x), -1).numpy()  # noqa: E731  (N, 3, 32, 32) -> (N, 3072), the file's rows
    train_x, train_y = repeat(flat(arrays.train_x), arrays.train_y.numpy(), args.train)
    per_file = np.array_split(np.arange(args.train), len(cifar10.TRAIN_FILES))
    files = [(name, train_x[i], train_y[i]) for (name, _), i in zip(cifar10.TRAIN_FILES, per_file)]
    files.append((cifar10.TEST_FILES[0][0], *repeat(flat(arrays.test_x), arrays.test_y.numpy(), args.test)))
    for name, x, y in files:
        batch = {"batch_label": f"{name} (repeated from {arrays.root})", "data": np.ascontiguousarray(x),
                 "labels": [int(v) for v in y], "filenames": [f"repeat_{name}_{i}.png" for i in range(len(y))]}
        with open(out / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    shutil.copy(Path(arrays.root) / cifar10.META["filename"], out / cifar10.META["filename"])
    print(f"{out}: {args.train} training and {args.test} test images repeated from {arrays.root}")


if __name__ == "__main__":
    main()
