"""Reading CIFAR-10: the stand-ins, the archive, every broken-file case, and batches on the device."""

from __future__ import annotations

import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab.data import batches, cifar10, datamodule
from cifarlab.data.batches import DeviceBatches, Normalize
from cifarlab.errors import DataError

UNREACHABLE = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # refused at once: no test ever downloads


def write_batch(path: Path, n: int, seed: int, **replace) -> None:
    """A batch file in the official format (a protocol-2 pickle of a dict), with made-up pixels."""
    rng = np.random.default_rng(seed)
    batch = {
        "batch_label": "made up",
        "labels": [int(v) for v in rng.integers(0, 10, n)],
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }
    batch.update(replace)
    path.write_bytes(pickle.dumps(batch, protocol=2))


def make_folder(root: Path, n: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, (name, _) in enumerate(cifar10.TRAIN_FILES + cifar10.TEST_FILES):
        write_batch(folder / name, n, seed=i)
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                      "ship", "truck"], "num_cases_per_batch": n}, protocol=2)
    )
    return folder


def test_subset_matches_a_plain_pickle_read(subset_root, caplog):
    with caplog.at_level(logging.WARNING):
        arrays = cifar10.load_cifar10(subset_root, download=False)
    folder = subset_root / "cifar-10-batches-py"
    plain = [pickle.load(open(folder / n, "rb"), encoding="latin1") for n, _ in cifar10.TRAIN_FILES]
    assert len(arrays.train_y) == sum(len(b["labels"]) for b in plain)
    test = pickle.load(open(folder / "test_batch", "rb"), encoding="latin1")
    assert arrays.test_y.tolist() == test["labels"]
    # Image 5 of the test batch, row layout (1024 R, 1024 G, 1024 B) -> (3, 32, 32)
    assert torch.equal(arrays.test_x[5], torch.from_numpy(test["data"][5].reshape(3, 32, 32)))
    assert arrays.train_x.dtype == torch.uint8 and arrays.train_x.shape[1:] == (3, 32, 32)
    assert arrays.classes[:3] == ["airplane", "automobile", "bird"]
    # The stand-in's files differ from the official ones: used, with one warning naming them.
    assert arrays.source == "cifar10-copy:cifar10-subset"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "data_batch_1" in warnings[0] and "test_batch" in warnings[0]


def test_root_may_be_the_batches_folder_itself(tmp_path):
    folder = make_folder(tmp_path)
    assert len(cifar10.load_cifar10(folder, download=False).train_y) == 100


def test_reads_the_official_archive(tmp_path):
    folder = make_folder(tmp_path / "src")
    archive_root = tmp_path / "root"
    archive_root.mkdir()
    with tarfile.open(archive_root / cifar10.ARCHIVE, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    arrays = cifar10.load_cifar10(archive_root, download=False, md5="not-the-official-md5")
    assert len(arrays.train_y) == 100 and len(arrays.test_y) == 20


def test_unreadable_archive_is_named(tmp_path):
    (tmp_path / cifar10.ARCHIVE).write_bytes(b"this is not a gzip file")
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz: cannot unpack") as e:
        cifar10.load_cifar10(tmp_path, download=False)
    assert "\n" not in str(e.value)


def test_offline_without_data_says_where_it_looked_and_what_to_do(tmp_path):
    root = tmp_path / "nothing-here"
    with pytest.raises(DataError) as e:
        cifar10.load_cifar10(root, download=True, url=UNREACHABLE, md5="x")
    msg = str(e.value)
    assert f"{root}/cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg
    assert "download from http://127.0.0.1:9" in msg and "Connection refused" in msg
    assert "data.root" in msg and "CIFARLAB_DATA" in msg and "data=synthetic" in msg
    assert not root.exists()  # no empty folder left behind


def test_find_says_what_the_run_will_use_and_touches_nothing(tmp_path):
    folder = make_folder(tmp_path / "complete")
    assert cifar10.find(tmp_path / "complete", download=False) == folder
    assert cifar10.find(folder, download=False) == folder  # pointed at the batches folder itself
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / cifar10.ARCHIVE).write_bytes(b"unpacked only by the run")
    assert cifar10.find(tmp_path / "packed", download=False) == tmp_path / "packed" / cifar10.ARCHIVE
    assert cifar10.find(tmp_path / "empty", download=True) is None  # the run downloads
    with pytest.raises(DataError, match=r"CIFAR-10 not found: .*empty/cifar-10-batches-py/ .*data.download=false"):
        cifar10.find(tmp_path / "empty", download=False)
    for name in ("batches.meta", "data_batch_5"):
        (folder / name).unlink()
    with pytest.raises(DataError) as e:
        cifar10.find(folder, download=True)  # a download would not complete a folder that is there
    assert str(e.value) == (f"{folder}/batches.meta: file missing (and data_batch_5); the folder must hold "
                            f"{', '.join(cifar10.FILES)}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["complete", "packed"]
    assert [p.name for p in (tmp_path / "packed").iterdir()] == [cifar10.ARCHIVE]


def test_download_false_does_not_try(tmp_path):
    with pytest.raises(DataError, match="data.download=false"):
        cifar10.load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize(
    "breakage,expected",
    [
        ("missing", r"data_batch_3: file missing"),
        ("truncated", r"data_batch_3: not a readable CIFAR-10 python batch \(.*truncated or corrupt"),
        ("garbage", r"data_batch_3: not a readable CIFAR-10 python batch"),
        ("shape", r"data_batch_3: 'data' is uint8 of shape \(20, 1024\), expected uint8 of shape \(N, 3072\)"),
        ("dtype", r"data_batch_3: 'data' is float64 of shape \(20, 3072\)"),
        ("labels", r"data_batch_3: label 10 at index 4 is outside 0..9"),
        ("count", r"data_batch_3: 19 labels for 20 images"),
        ("no-data", r"data_batch_3: no 'data' entry"),
        ("not-a-dict", r"data_batch_3: holds a list, a CIFAR-10 batch holds a dict"),
        ("code", r"data_batch_3: refused, not unpickled: it asks to call posix.system"),
    ],
)
def test_a_broken_batch_file_is_named(tmp_path, breakage, expected):
    folder = make_folder(tmp_path)
    path = folder / "data_batch_3"
    rng = np.random.default_rng(0)
    if breakage == "missing":
        path.unlink()
    elif breakage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif breakage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif breakage == "shape":
        write_batch(path, 20, 0, data=rng.integers(0, 256, (20, 1024), dtype=np.uint8))
    elif breakage == "dtype":
        write_batch(path, 20, 0, data=rng.random((20, 3072)))
    elif breakage == "labels":
        write_batch(path, 20, 0, labels=[0, 1, 2, 3, 10] + [0] * 15)
    elif breakage == "count":
        write_batch(path, 20, 0, labels=[0] * 19)
    elif breakage == "no-data":
        write_batch(path, 20, 0)
        batch = pickle.loads(path.read_bytes())
        del batch["data"]
        path.write_bytes(pickle.dumps(batch, protocol=2))
    elif breakage == "not-a-dict":
        path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    elif breakage == "code":

        class Evil:
            def __reduce__(self):
                import os

                return (os.system, ("echo pwned",))

        path.write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match=expected) as e:
        cifar10.load_cifar10(tmp_path, download=False)
    assert "\n" not in str(e.value)  # one line


def test_val_split_is_seeded_and_disjoint():
    train, val = batches.split_indices(100, 10, seed=3)
    again, _ = batches.split_indices(100, 10, seed=3)
    assert torch.equal(train, again) and len(val) == 10
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert batches.val_count(0.1, 5438) == 543 and batches.val_count(500, 5438) == 500
    with pytest.raises(ValueError, match="leaves 5438 validation and 0 training"):
        batches.val_count(5438, 5438)


def _batches(epoch: int, seed: int = 0, **kw) -> list[torch.Tensor]:
    images = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 3, 32, 32).contiguous()
    it = DeviceBatches(images, torch.arange(64), 16, Normalize(torch.zeros(3), torch.ones(3)), train=True,
                       seed=seed, epoch=lambda: epoch, **kw)
    return [y for _, y in it]


def test_training_order_depends_on_seed_and_epoch_only():
    assert [b.tolist() for b in _batches(0)] == [b.tolist() for b in _batches(0)]
    assert [b.tolist() for b in _batches(0)] != [b.tolist() for b in _batches(1)]
    assert [b.tolist() for b in _batches(0)] != [b.tolist() for b in _batches(0, seed=1)]
    assert sorted(torch.cat(_batches(2)).tolist()) == list(range(64))  # each image once per epoch


@pytest.mark.parametrize("pad", [1, 4, 16])  # 16: the largest data.augment.crop_padding allows
def test_window_indices_give_the_reflect_padded_crop_then_its_mirror(pad):
    """The training view of each image is picked by index from its uint8 pixels: it must be the window of the image
    reflect-padded by F.pad at the drawn offset, mirrored where the coin says, whatever the offset and padding."""
    g = torch.Generator().manual_seed(0)
    n = 64
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    dy, dx = batches.crop_offsets(n, pad, g)
    flip = batches.coin_flips(n, g)
    assert 0 < int(flip.sum()) < n and len(set(dy.flatten().tolist())) > 1
    padded = torch.nn.functional.pad(x.float(), (pad,) * 4, mode="reflect")
    for mirror in (flip, None):
        rows, cols = batches.window_indices(dy, dx, mirror, pad, 32, 32)
        views = x[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        for i in range(n):
            window = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
            assert torch.equal(views[i].float(), window.flip(2) if mirror is not None and flip[i] else window), i
    rows, cols = batches.window_indices(None, None, flip, 0, 32, 32)  # no crop: the image or its mirror image
    views = x[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    assert all(torch.equal(views[i], x[i].flip(2) if flip[i] else x[i]) for i in range(n))


# The transform DeviceBatches takes turns uint8 batches into floats; this one only scales them to [0, 1] (ToTensor).
TO_UNIT = Normalize(torch.zeros(3), torch.ones(3))


def test_alternating_flip_mirrors_each_image_in_exactly_one_of_two_epochs():
    """flip=alternate: a seeded random half in epoch 0, the other half in epoch 1, the first half again in epoch 2."""
    n = 64
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)  # no image is its own mirror
    epoch = {"now": 0}

    def mirrored(seed: int) -> torch.Tensor:  # (n,) bool: which images this epoch's batches hold mirrored
        it = DeviceBatches(images, torch.arange(n), 16, TO_UNIT, train=True, seed=seed, flip="alternate",
                           epoch=lambda: epoch["now"])
        out = torch.zeros(n, dtype=torch.bool)
        seen = []
        for x, y in it:
            for img, i in zip(x, y.tolist()):
                original = images[i].float() / 255
                assert torch.equal(img, original) or torch.equal(img, original.flip(2))
                out[i] = not torch.equal(img, original)
                seen.append(i)
        assert sorted(seen) == list(range(n))
        return out

    by_epoch = []
    for e in range(3):
        epoch["now"] = e
        by_epoch.append(mirrored(seed=0))
    assert 16 < int(by_epoch[0].sum()) < 48  # about half
    assert torch.equal(by_epoch[1], ~by_epoch[0]) and torch.equal(by_epoch[2], by_epoch[0])
    epoch["now"] = 0
    assert not torch.equal(mirrored(seed=1), by_epoch[0])  # the halves are the run seed's


def test_alternating_flip_is_the_same_per_image_when_ranks_share_the_epoch():
    """Under DDP each rank takes its own slice of the permutation; an image is mirrored or not whatever rank has it."""
    n, images = 64, torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    for epoch in (0, 1):
        expected = batches.alternating_flips(n, seed=3, epoch=epoch)
        seen = []
        for rank in (0, 1):
            it = DeviceBatches(images, torch.arange(n), 8, TO_UNIT, train=True, seed=3, flip="alternate",
                               epoch=lambda: epoch, rank=rank, world=2)
            for x, y in it:
                for img, i in zip(x, y.tolist()):
                    original = images[i].float() / 255
                    assert torch.equal(img, original.flip(2) if expected[i] else original)
                    seen.append(i)
        assert sorted(seen) == list(range(n))  # the two ranks together cover the epoch once


def test_eval_batches_cover_every_image_in_order():
    images = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    it = DeviceBatches(images, torch.arange(10), 4, Normalize(torch.zeros(3), torch.ones(3)))
    assert len(it) == 3 and torch.cat([y for _, y in it]).tolist() == list(range(10))


def test_synthetic_data_is_labelled_and_class_dependent():
    arrays = cifar10.make_synthetic(500, 100, noise=0.35, seed=0)
    assert arrays.source == "synthetic" and arrays.train_x.shape == (500, 3, 32, 32)
    means = torch.stack([arrays.train_x[arrays.train_y == c].float().mean(0) for c in range(10)])
    assert (means[0] - means[1]).abs().mean() > 10  # classes differ by much more than noise averages out to


@pytest.mark.parametrize("prep_images", [32, 4096])  # several preparations per epoch, and one for the whole epoch
def test_training_batches_are_crops_and_mirrors_of_each_image_once_per_epoch(monkeypatch, prep_images):
    """The epoch is augmented several batches at a time, then sliced: each image still arrives once, as one of the
    reflect-padded crop windows of itself or of its mirror image, normalised, in the asked memory format."""
    monkeypatch.setitem(batches.PREP_IMAGES, "cpu", prep_images)
    n, pad = 96, 2
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    norm = Normalize(torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3]))
    it = DeviceBatches(images, torch.arange(n), 16, norm, train=True, seed=0, flip=True, crop_padding=pad,
                       memory_format=torch.channels_last)
    seen, mirrored = [], 0
    for x, y in it:
        assert x.shape == (16, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
        for img, i in zip(norm.undo(x), y.tolist()):
            original = torch.nn.functional.pad(images[i][None].float() / 255, (pad,) * 4, mode="reflect")[0]
            windows = [v[:, dy : dy + 32, dx : dx + 32] for v in (original, original.flip(2))
                       for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
            match = [k for k, w in enumerate(windows) if torch.allclose(img, w, atol=1e-5)]
            assert match, i
            mirrored += match[0] >= len(windows) // 2
            seen.append(i)
    assert sorted(seen) == list(range(n))
    assert 0 < mirrored < n  # some mirrored, some not
    again = [y.tolist() for _, y in DeviceBatches(images, torch.arange(n), 16, norm, train=True, seed=0, flip=True,
                                                  crop_padding=pad)]
    assert [s for b in again for s in b] == seen  # the same seed and epoch: the same order, prepared in any chunks


def _per_batch_reference(images, labels, bs, norm, seed, epoch, flip, pad, rank=0, world=1):
    """Training batches as earlier versions made them, written out again here (none of data.py's augmentation
    code): each batch cropped and flipped on its own, with its own generator."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    order = order[rank::world][: len(labels) // world]
    for b in range(len(order) // bs):
        idx = order[b * bs : (b + 1) * bs]
        x = images[idx].float().div_(255)
        g = torch.Generator().manual_seed(((seed * 100_003 + epoch) * 100_003 + b) * world + rank)
        if pad:
            padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
            dy, dx = (torch.randint(0, 2 * pad + 1, (bs,), generator=g) for _ in range(2))
            x = torch.stack([padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(bs)])
        if flip:
            mirror = torch.rand(bs, generator=g) < 0.5
            x = torch.stack([img.flip(2) if m else img for img, m in zip(x, mirror)])
        yield norm(x), labels[idx]


@pytest.mark.parametrize("prep_images,flip,pad,rank,fmt", [
    (32, True, 2, 0, torch.contiguous_format), (4096, True, 4, 0, torch.channels_last),
    (32, False, 1, 1, torch.contiguous_format), (64, True, 0, 1, torch.channels_last),
    (64, True, 16, 0, torch.channels_last),  # the largest crop_padding the config allows
])
def test_training_batches_are_exactly_those_of_per_batch_augmentation(monkeypatch, prep_images, flip, pad, rank, fmt):
    """Augmenting several batches at once changes nothing: every batch, pixel for pixel, is what augmenting it on its
    own with its (seed, epoch, batch) generator gave, so runs of earlier versions replay exactly."""
    monkeypatch.setitem(batches.PREP_IMAGES, "cpu", prep_images)
    n, bs = 200, 16
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    norm = Normalize(torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3]))
    # The images stored either way round in memory: CifarDataModule keeps its training split channels_last.
    for epoch, stored in ((0, torch.contiguous_format), (3, torch.contiguous_format), (3, torch.channels_last)):
        got = list(DeviceBatches(images.contiguous(memory_format=stored), torch.arange(n), bs, norm, train=True,
                                 seed=5, epoch=lambda: epoch, flip=flip, crop_padding=pad, rank=rank, world=2,
                                 memory_format=fmt))
        expected = list(_per_batch_reference(images, torch.arange(n), bs, norm, 5, epoch, flip, pad, rank, 2))
        assert len(got) == len(expected) == (n // 2) // bs
        for (x, y), (x_ref, y_ref) in zip(got, expected):
            assert torch.equal(y, y_ref) and torch.equal(x, x_ref) and x.is_contiguous(memory_format=fmt)


def test_training_views_are_cut_from_the_training_split_without_a_copy_of_it():
    """The training split is kept channels_last, so the (N, H, W, C) pixel rows the views are cut from are the split
    itself, not a second copy of it in device memory."""
    dm = datamodule.CifarDataModule(cifar10.make_synthetic(300, 10, noise=0.5, seed=0), n_val=50, split_seed=0, batch_size=32,
                              eval_batch_size=64, normalize=True, flip="alternate", crop_padding=4, seed=0)
    loader = dm.train_dataloader()
    assert dm.train_x.is_contiguous(memory_format=torch.channels_last)
    assert loader.pixel_rows.data_ptr() == dm.train_x.data_ptr() and loader.pixel_rows.shape == (250, 32, 32, 3)
    assert DeviceBatches(dm.val_x, dm.val_y, 64, dm.normalizer).pixel_rows is None  # evaluation cuts no views


def test_crop_offsets_do_not_follow_from_the_shuffle():
    """Each batch draws its crops from a generator of its own, not the shuffle's. Seeded alike, a CPU generator
    replays the shuffle's random numbers, and the crop offset at position k becomes a function of the image the
    shuffle put there: where 3 divides the number of images left to place, offset == image index mod 3 held at 90 %
    of the positions in an interim version, against a third for independent draws. (Seed 0's first batch of epoch 0
    is the one batch whose generator seed, 0, is the shuffle's: kept, so that runs replay earlier versions.) Each
    image's rows are numbered, so the offset is read back from the cropped image."""
    n, pad = 3000, 1
    rows = torch.arange(32, dtype=torch.uint8).mul(8).view(1, 1, 32, 1)  # row r holds 8r
    images = rows.expand(n, 3, 32, 32).contiguous()
    for seed, epoch in ((3, 0), (0, 1)):
        it = DeviceBatches(images, torch.arange(n), 100, TO_UNIT, train=True, seed=seed, crop_padding=pad,
                           epoch=lambda: epoch)
        x, y = (torch.cat(t) for t in zip(*it))
        dy = (x[:, 0, 1, 0] * 255 / 8).round().long()  # output row 1 is input row dy (0, 1 or 2)
        assert set(dy.tolist()) == {0, 1, 2}
        positions = [k for k in range(n) if (n - k) % 3 == 0]
        agree = sum(int(dy[k]) == int(y[k]) % 3 for k in positions) / len(positions)
        assert 0.28 < agree < 0.39, (seed, epoch, agree)  # a third, as for independent draws (±2.5 sigma)


def test_channel_stats_are_the_float64_mean_and_std_of_each_channel():
    """From per-channel histograms: the same mean and (unbiased) std as summing every pixel in float64."""
    images = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8)
    images[:, 1] //= 3  # channels with different statistics
    mean, std = batches.channel_stats(images)
    pixels = images.double().div(255).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mean, pixels.mean(1).float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(std, pixels.std(1).float(), rtol=0, atol=1e-7)
    assert mean[1] < 0.25 < mean[0]


@pytest.mark.parametrize("shape", [(7, 3, 32, 32), (2, 3, 5, 9), (1, 3, 32, 32)])
def test_normalize_gives_the_same_numbers_whatever_the_memory_format(shape):
    """uint8 images normalised in NHWC memory (as training batches are) are the same to the bit as the same images
    in NCHW memory, and as (x / 255 - mean) / std written out; the result keeps the input's memory format."""
    norm = Normalize(torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3]))
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    expected = (x.float() / 255 - norm.mean) / norm.std
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = norm(x.contiguous(memory_format=fmt))
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=fmt)
        assert torch.equal(got, expected), fmt
