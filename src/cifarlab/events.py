"""TensorBoard event files of a run that continues after a kill: what was logged after its checkpoint is dropped,
so the resumed run logs those steps once."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter

from cifarlab.run_folder import atomic_write


def trim(log_dir: Path, until: float | None) -> int:
    """Drop the TensorBoard events written after `until` (a checkpoint's saved_at; None: all of them) from the event
    files in log_dir, and any record a kill cut short. Returns how many events were dropped."""
    dropped = 0
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        records = list(_records(path))
        kept = [r for r in records if until is not None and Event.FromString(r).wall_time <= until]
        whole = sum(len(r) + 16 for r in records) == path.stat().st_size  # 16: length, 2 CRCs
        dropped += len(records) - len(kept)
        if len(kept) == len(records) and whole:
            continue
        if len(kept) <= 1:  # nothing left but the file_version header
            path.unlink()
            continue
        atomic_write(path, lambda f, kept=kept: write_records(f, kept))
    return dropped


def write_records(f: BinaryIO, records: list[bytes]) -> None:
    writer = RecordWriter(f)
    for r in records:
        writer.write(r)


def _records(path: Path):
    yield from RawEventFileLoader(str(path)).Load()
