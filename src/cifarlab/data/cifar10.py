"""CIFAR-10's files, found, fetched and read into uint8 tensors (and made-up images for smoke runs).

The official python layout (cifar-10-batches-py/, or the cifar-10-python.tar.gz archive it unpacks from) is read
straight into one (N, 3, 32, 32) uint8 tensor per split: no PIL, no per-image Python. Imports torch and torchvision
(its table of the official files and md5 sums, its download), not Lightning.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import calculate_md5, download_and_extract_archive, extract_archive

from cifarlab.errors import DataError

log = logging.getLogger(__name__)

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
# torchvision's table of the official files: [name, md5]; the first five are the training batches.
TRAIN_FILES = CIFAR10.train_list
TEST_FILES = CIFAR10.test_list
META = CIFAR10.meta  # {"filename": "batches.meta", "key": "label_names", "md5": ...}
FILES = [META["filename"]] + [name for name, _ in TRAIN_FILES + TEST_FILES]  # what the batches folder must hold
IMAGE_SHAPE = (3, 32, 32)


@dataclass
class CifarArrays:
    train_x: torch.Tensor  # (N, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, 3, 32, 32) uint8
    test_y: torch.Tensor  # (M,) int64
    classes: list[str]
    source: str  # "cifar10" (official files), "cifar10-copy:<folder>" (md5 differs), or "synthetic"
    root: str | None  # the folder the batches were read from


# ---------------------------------------------------------------------------------------------------------------
# Reading the official files


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: only numpy's array reconstruction may be called.

    A plain pickle.load would run whatever a file someone handed you asks for.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"it asks to call {module}.{name}, which a CIFAR-10 batch never does")


class _Refused(pickle.UnpicklingError):
    pass


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file missing; the folder must hold {_expected_files()}") from None
    except _Refused as e:
        raise DataError(f"{path}: refused, not unpickled: {e}") from None
    except Exception as e:  # truncated files raise EOFError, garbage raises UnpicklingError/ValueError/...
        raise DataError(
            f"{path}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); "
            "the file is truncated or corrupt: replace it or delete the folder to download again"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, a CIFAR-10 batch holds a dict")
    return obj


def _expected_files() -> str:
    return ", ".join(FILES)


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file -> images (N, 3, 32, 32) uint8 and labels (N,) int64, after checking shapes and labels."""
    batch = _unpickle(path)
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DataError(f"{path}: no {' or '.join(repr(k) for k in missing)} entry (it has {sorted(batch)})")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: 'data' is {dtype} of shape {shape}, expected uint8 of shape (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    if len(data) == 0:
        raise DataError(f"{path}: holds no images")
    if labels.min() < 0 or labels.max() > 9:
        bad = int(np.flatnonzero((labels < 0) | (labels > 9))[0])
        raise DataError(f"{path}: label {int(labels[bad])} at index {bad} is outside 0..9")
    # Each row is 1024 red, 1024 green, then 1024 blue values of a row-major 32x32 image.
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, *IMAGE_SHAPE)  # (N, 3, 32, 32)
    return images, torch.from_numpy(labels.astype(np.int64))


def _read_classes(folder: Path) -> list[str]:
    meta = _unpickle(folder / META["filename"])
    names = meta.get(META["key"])
    if not isinstance(names, list) or len(names) != 10:
        raise DataError(f"{folder / META['filename']}: '{META['key']}' should list 10 class names, got {names!r}")
    return [str(n) for n in names]


def _files_differing_from_official(folder: Path) -> list[str]:
    return [name for name, md5 in TRAIN_FILES + TEST_FILES if calculate_md5(str(folder / name)) != md5]


# ---------------------------------------------------------------------------------------------------------------
# Finding (or downloading) the files


def find(root: Path, download: bool) -> Path | None:
    """Where under root the files are, touching nothing: the cifar-10-batches-py folder (holding every file), the
    official archive to unpack, or None for a download to fetch. A DataError where they are not and data.download is
    false, or where the folder lacks a file. cifarlab-train asks before Hydra makes a run folder; locate() again."""
    if root.name == FOLDER and root.is_dir():  # pointed straight at the batches folder
        folder = root
    elif (root / FOLDER).is_dir():
        folder = root / FOLDER
    elif (root / ARCHIVE).is_file():
        return root / ARCHIVE
    elif download:
        return None
    else:
        raise DataError(f"CIFAR-10 not found: {_looked_for(root)}; data.download=false. {_HOW}")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        others = f" (and {', '.join(missing[1:])})" if missing[1:] else ""
        raise DataError(f"{folder / missing[0]}: file missing{others}; the folder must hold {_expected_files()}")
    return folder


def _looked_for(root: Path) -> str:
    return f"looked for {root / FOLDER}/ and {root / ARCHIVE}"


_HOW = ("Point data.root (or the CIFARLAB_DATA variable) at a folder holding cifar-10-batches-py/ or "
        "cifar-10-python.tar.gz, or run data=synthetic for a smoke run on made-up images.")


def locate(root: Path, download: bool, url: str, md5: str) -> Path:
    """The cifar-10-batches-py folder under root, unpacking or downloading the official archive if needed."""
    found = find(root, download)
    folder = root / FOLDER
    if found is None:
        log.info("CIFAR-10 not found under %s: downloading %s", root, url)
        created = not root.exists()
        try:
            download_and_extract_archive(url, download_root=str(root), filename=ARCHIVE, md5=md5)
        except Exception as e:
            if created and root.is_dir() and not any(root.iterdir()):
                root.rmdir()  # leave no empty folder behind a failed download
            raise DataError(
                f"CIFAR-10 not found ({_looked_for(root)}) and the download from {url} failed "
                f"({type(e).__name__}: {e}). {_HOW}"
            ) from None
        return folder
    if found.is_dir():
        return found
    # the official archive, there to unpack
    if calculate_md5(str(found)) != md5:
        log.warning("%s: md5 differs from the official archive (%s); unpacking it anyway", found, md5)
    try:
        extract_archive(str(found), str(root))
    except Exception as e:
        raise DataError(f"{found}: cannot unpack ({type(e).__name__}: {e}); delete it to download again") from None
    if not folder.is_dir():
        raise DataError(f"{found}: unpacked, but it holds no {FOLDER}/ folder")
    return folder


def load_cifar10(root: str | Path, download: bool = True, url: str = "", md5: str = "") -> CifarArrays:
    root = Path(root).expanduser().resolve()
    folder = locate(root, download, url, md5)
    classes = _read_classes(folder)
    train = [read_batch(folder / name) for name, _ in TRAIN_FILES]
    test_x, test_y = read_batch(folder / TEST_FILES[0][0])
    differing = _files_differing_from_official(folder)
    if differing:
        log.warning(
            "%s: %s differ from the official CIFAR-10 files (md5); using them as given", folder, ", ".join(differing)
        )
    source = "cifar10" if not differing else f"cifar10-copy:{folder.parent.name}"
    return CifarArrays(
        train_x=torch.cat([x for x, _ in train]),
        train_y=torch.cat([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
        classes=classes,
        source=source,
        root=str(folder),
    )


def make_synthetic(n_train: int, n_test: int, noise: float, seed: int) -> CifarArrays:
    """NOT CIFAR-10: one smooth random colour pattern per class, plus per-image noise. Learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=IMAGE_SHAPE[1:], mode="bilinear")

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        x = patterns[y] + noise * torch.randn(n, *IMAGE_SHAPE, generator=g)  # (n, 3, 32, 32) in ~[0, 1]
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    (train_x, train_y), (test_x, test_y) = split(n_train), split(n_test)
    classes = [f"synthetic-{i}" for i in range(10)]
    return CifarArrays(train_x, train_y, test_x, test_y, classes, source="synthetic", root=None)
