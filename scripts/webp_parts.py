#!/usr/bin/env python
"""A cifar-10-batches-py folder packed losslessly into parts small enough to travel, and unpacked again.

    .venv/bin/python scripts/webp_parts.py pack SRC DEST [--parts 2]    # SRC holds cifar-10-batches-py/ (or is it)
    .venv/bin/python scripts/webp_parts.py unpack DEST PART [PART ...]  # DEST/cifar-10-batches-py/ is written

Why: a machine that receives at most 64 MiB per transfer (the GPU lent through this workplace's `device` tool)
cannot take `cifar10-full` (178 MB; 122 MB under xz). As lossless WebP, 100 images to a 320x320 mosaic, the 60,000
images take 86 MiB: two parts of 42 and 44 MiB (`pack` at its default effort 4: 2 minutes on 2 cores). `unpack`
rebuilds every batch file with the same images, labels, file names and batch label; the pickles' bytes differ, the
data read back is the same (`tests/test_benchmark.py` checks it on `cifar10-subset`).
"""

from __future__ import annotations

import argparse
import io
import pickle
import shutil
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from cifarlab import cifar10

BATCHES = [name for name, _ in cifar10.TRAIN_FILES + cifar10.TEST_FILES]  # the batch files, as torchvision lists them
PER_TILE = 100  # images per mosaic: 10 x 10 images of 32 x 32


def _folder(root: Path) -> Path:
    return root if root.name == cifar10.FOLDER else root / cifar10.FOLDER


def _encode(job: tuple[str, int, np.ndarray, int]) -> tuple[str, int, int, bytes]:
    name, index, images, method = job  # images: (n <= 100, 3072) uint8, rows of R, G, B planes
    n = len(images)
    tiles = np.zeros((PER_TILE, 3072), np.uint8)
    tiles[:n] = images
    mosaic = tiles.reshape(10, 10, 3, 32, 32).transpose(0, 3, 1, 4, 2).reshape(320, 320, 3)
    buf = io.BytesIO()
    Image.fromarray(mosaic).save(buf, "WEBP", lossless=True, quality=100, method=method)
    return name, index, n, buf.getvalue()


def _decode(blob: bytes, n: int) -> np.ndarray:
    mosaic = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))  # (320, 320, 3)
    return mosaic.reshape(10, 32, 10, 32, 3).transpose(0, 2, 4, 1, 3).reshape(PER_TILE, 3072)[:n]


def pack(src: Path, dest: Path, parts: int, method: int, processes: int) -> list[Path]:
    folder = _folder(src)
    jobs, meta = [], {}
    for name in BATCHES:
        batch = cifar10._unpickle(folder / name)  # the project's reader: a dict, str keys; nothing but numpy called
        images = np.asarray(batch["data"], np.uint8)  # (N, 3072)
        meta[name] = {k: v for k, v in batch.items() if k != "data"}  # labels, filenames, batch_label
        jobs += [(name, i, images[s : s + PER_TILE], method) for i, s in enumerate(range(0, len(images), PER_TILE))]
    with Pool(processes) as pool:
        tiles = pool.map(_encode, jobs, chunksize=8)
    out = []
    for p in range(parts):
        part = dest / f"part{p + 1}"
        part.mkdir(parents=True, exist_ok=True)
        share = tiles[p::parts]  # every parts-th mosaic: parts of about equal size
        with open(part / "tiles.pkl", "wb") as f:
            pickle.dump({"tiles": share, "meta": meta if p == 0 else None}, f, protocol=4)
        if p == 0:
            shutil.copy(folder / cifar10.META["filename"], part / cifar10.META["filename"])
        out.append(part)
    return out


def unpack(dest: Path, parts: list[Path]) -> Path:
    tiles, meta, meta_part = [], None, None
    for part in parts:
        with open(part / "tiles.pkl", "rb") as f:
            saved = pickle.load(f)  # written by pack: only open parts you made
        tiles += saved["tiles"]
        if saved["meta"] is not None:
            meta, meta_part = saved["meta"], part
    if meta is None:
        raise SystemExit("no part holds the labels (part1): give every part pack wrote")
    folder = _folder(dest)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(meta_part / cifar10.META["filename"], folder / cifar10.META["filename"])
    for name, labels in meta.items():
        mine = sorted((i, n, blob) for b, i, n, blob in tiles if b == name)
        if [i for i, _, _ in mine] != list(range(len(mine))):
            raise SystemExit(f"{name}: mosaics missing; give every part pack wrote")
        images = np.concatenate([_decode(blob, n) for _, n, blob in mine])
        if len(images) != len(labels["labels"]):
            raise SystemExit(f"{name}: {len(images)} images for {len(labels['labels'])} labels")
        with open(folder / name, "wb") as f:
            pickle.dump({**labels, "data": images}, f, protocol=4)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("src", type=Path)
    a.add_argument("dest", type=Path)
    a.add_argument("--parts", type=int, default=2)
    a.add_argument("--method", type=int, default=4, help="WebP effort 0-6: smaller files, slower (default 4)")
    a.add_argument("--processes", type=int, default=2)
    b = sub.add_parser("unpack")
    b.add_argument("dest", type=Path)
    b.add_argument("parts", type=Path, nargs="+")
    args = p.parse_args()
    if args.command == "pack":
        for part in pack(args.src, args.dest, args.parts, args.method, args.processes):
            print(f"{part}: {sum(f.stat().st_size for f in part.iterdir()) / 2**20:.1f} MiB")
    else:
        print(f"wrote {unpack(args.dest, args.parts)}")


if __name__ == "__main__":
    main()
