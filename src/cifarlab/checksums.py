"""TensorBoard's event-file checksums computed in C (google-crc32c) instead of in pure Python.

Every record of an event file carries two masked CRC32Cs (TFRecord format). Without TensorFlow installed, TensorBoard
computes them with a Python loop over each byte, on the writer's background thread when writing and on the caller's
when reading: about 0.3 s of CPU per MB on a 2-core Xeon, with the GIL held. A default run writes about 0.5 MB of
pooling images and histograms per epoch, and resuming a run reads its event files back (checkpoint.trim_events).
google-crc32c, Google's CRC32C library (the hardware instruction where the CPU has one), gives the same checksums in
microseconds. Figures: docs/results/event-checksums/.
"""

from __future__ import annotations

from typing import Callable

import google_crc32c

MASK_DELTA = 0xA282EAD8  # the TFRecord format's mask: rotate right by 15 bits, add this constant, modulo 2**32

# TensorBoard's own (pure-Python) function, as install() found it: the reference the tests hold this module's to
tensorboards_own: Callable[[bytes], int] | None = None


def masked_crc32c(data: bytes) -> int:
    """The masked CRC32C of `data`, as a TFRecord header or footer stores it: the same value as TensorBoard's."""
    crc = google_crc32c.value(bytes(data))
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + MASK_DELTA) & 0xFFFFFFFF


def install() -> bool:
    """Make TensorBoard's event writer and reader use masked_crc32c. Idempotent; True if installed.

    A no-op where google-crc32c has no compiled extension for this platform: its pure-Python fallback is no faster
    than TensorBoard's own, so TensorBoard keeps that."""
    global tensorboards_own
    if google_crc32c.implementation != "c":
        return False
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow  # the reader calls its module-level function
    from tensorboard.summary.writer import record_writer  # the writer imported the function by name

    if tensorboards_own is None:
        tensorboards_own = pywrap_tensorflow.masked_crc32c
    pywrap_tensorflow.masked_crc32c = masked_crc32c
    record_writer.masked_crc32c = masked_crc32c
    return True
