"""TensorBoard's event checksums in C (cifarlab.checksums): the same values as TensorBoard's pure-Python ones, used by
every training run, and many times faster."""

from __future__ import annotations

import random
import struct
import time

import google_crc32c
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow
from tensorboard.summary.writer import record_writer

from cifarlab import checksums, train
from conftest import compose_config


def test_the_c_checksums_are_installed_and_equal_tensorboards_own():
    assert google_crc32c.implementation == "c", "google-crc32c has no compiled extension on this platform"
    assert checksums.install()
    own = checksums.tensorboards_own
    assert own is not None and own is not checksums.masked_crc32c
    assert pywrap_tensorflow.masked_crc32c is checksums.masked_crc32c  # the reader
    assert record_writer.masked_crc32c is checksums.masked_crc32c  # the writer
    rng = random.Random(0)
    # lengths around the 4- and 8-byte words a CRC loop may take at once, and a record as long as a pooling image
    for n in (0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 255, 4096, 100_003):
        data = rng.randbytes(n)
        assert checksums.masked_crc32c(data) == own(data), n
    for data in (b"\x00" * 64, b"\xff" * 64, struct.pack("<Q", 2**64 - 1)):  # the mask's carries and wrap-around
        assert checksums.masked_crc32c(data) == own(data)
    assert checksums.masked_crc32c(memoryview(b"abc")) == own(b"abc")


def test_the_c_checksums_are_many_times_faster_than_tensorboards_own():
    checksums.install()
    data = random.Random(1).randbytes(256 * 1024)  # about half an epoch's pooling images and histograms

    def seconds(crc) -> float:
        start = time.perf_counter()
        crc(data)
        return time.perf_counter() - start

    ours = min(seconds(checksums.masked_crc32c) for _ in range(5))
    theirs = min(seconds(checksums.tensorboards_own) for _ in range(2))
    assert theirs > 20 * ours, f"{theirs * 1000:.1f} ms (TensorBoard's) against {ours * 1000:.3f} ms (ours)"


def test_a_training_run_uses_them_and_its_event_files_pass_tensorboards_own_check(tmp_path, monkeypatch):
    checksums.install()
    own = checksums.tensorboards_own
    monkeypatch.setattr(pywrap_tensorflow, "masked_crc32c", own)  # as a fresh process finds TensorBoard
    monkeypatch.setattr(record_writer, "masked_crc32c", own)
    cfg = train.settle(compose_config("data=synthetic", "data.n_train=600", "data.n_test=100", "data.val_size=100",
                                      "data.batch_size=50", "trainer.max_epochs=1", "threads=2"))
    train.train(cfg, tmp_path)
    assert record_writer.masked_crc32c is checksums.masked_crc32c  # train() installed them
    monkeypatch.setattr(pywrap_tensorflow, "masked_crc32c", own)  # read back with TensorBoard's own checksums
    checked = 0
    for path in sorted(tmp_path.glob("events.out.tfevents.*")):
        # TensorBoard's own record reader, which raises DataLossError on a checksum that does not match (its
        # EventFileLoader would stop there without a word)
        reader = pywrap_tensorflow.PyRecordReader_New(str(path).encode())
        while True:
            try:
                reader.GetNext()
            except errors.OutOfRangeError:
                break
            checked += len(reader.record())
    assert checked > 500_000  # the pooling images, histograms, graph and test figures, not just a few scalars
