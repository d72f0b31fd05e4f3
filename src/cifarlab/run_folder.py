"""A run folder, and what its files say about the run: finished (metrics.json), stopped and resumable (config.yaml
without metrics.json), in use (.running). The checks that keep two runs out of one folder and never overwrite a finished
one, and what `resume=<folder>` continues with.

Imports no torch or Lightning: the command line (cli.py) runs these checks before a run starts, without waiting
for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO, Callable

from omegaconf import DictConfig, OmegaConf

from cifarlab.errors import RunFolderError

FINISHED = "metrics.json"  # its presence marks a finished run
RUNNING = ".running"  # held while a run uses its folder (created exclusively), so two runs never share one
FAILED = "failed.json"  # a sweep job that raised: its error, so the sweep goes on and the report can say why
SAVED_CONFIG = "config.yaml"  # the resolved config, written once the run has read its data; what resume= continues with


def to_train_log(message: str, level: int = logging.INFO, exc_info: Any = None) -> None:
    """A record for the run's train.log alone (Hydra's file handler), not for the console."""
    log = logging.getLogger("cifarlab")
    record = log.makeRecord(log.name, level, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def quiet_lightning_console() -> None:
    """`import lightning` gives the `lightning` logger a console handler of its own, and its lines also reach the
    handlers of a process whose logging is set up (Hydra's console and train.log): without it, each shows once."""
    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write `path` through a temporary file beside it, flushed to disk and renamed over it: a reader, or a kill,
    never sees half a file (a checkpoint, metrics.json, a trimmed event file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def remove_partial_writes(folder: Path) -> list[Path]:
    """The temporary files of writes a kill interrupted (atomic_write); the file each would have replaced is whole."""
    leftovers = sorted(folder.glob(".*.partial-*")) if folder.is_dir() else []
    for path in leftovers:
        path.unlink()
    return leftovers


def latest(pattern: str) -> Path | None:
    """The newest folder matching pattern under outputs/ ("runs/*/*" or "multirun/*/*"), by name: date, then time."""
    found = sorted(p for p in Path("outputs").glob(pattern) if p.is_dir())
    return found[-1] if found else None


def config_sha(cfg: DictConfig) -> str:
    """What makes two runs the same run: the resolved config, less the thread count, the resume request and the
    search trial it reports to (a trial asked again continues the folder of the one a killed sweep left)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("threads", "resume", "trial"):
        plain.pop(key, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_ddp_child() -> bool:
    """A DDP rank other than 0, which owns the folder: Lightning starts ranks 1.. by running this command again with
    LOCAL_RANK set; under launcher=slurm, SLURM starts every rank (SLURM_PROCID)."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("SLURM_PROCID", "0") != "0"


def slurm_run() -> str:
    """This SLURM job and how many times SLURM has started it ('' outside SLURM): a requeued job keeps its id, and
    SLURM never runs two starts of one job at once."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm job {job} start {int(os.environ.get('SLURM_RESTART_COUNT', '0')) + 1}" if job else ""


class State(str, Enum):
    """What a run folder holds, as its files say it."""

    NEW = "new"  # nothing of a run, or only what a run killed before it read its data left (a dead lock)
    FINISHED = "finished"  # metrics.json
    STOPPED = "stopped"  # config.yaml or a last checkpoint, and no live run: resume= (a sweep: its job) continues it
    IN_USE = "in use"  # a live run holds its lock


def state(run_dir: Path) -> State:
    """The one reading of a folder's state: the command line, resume=, sweep jobs and SLURM requeues act on it."""
    if (run_dir / FINISHED).exists():
        return State.FINISHED
    if (run_dir / RUNNING).exists() and not lock_is_stale(run_dir):
        return State.IN_USE
    if (run_dir / SAVED_CONFIG).exists() or (run_dir / "checkpoints" / "last.ckpt").exists():
        return State.STOPPED
    return State.NEW


def in_use(run_dir: Path, key: str = "hydra.run.dir") -> str:
    lock = run_dir / RUNNING
    return (f"{key}={run_dir}: another run is using this folder ({lock.read_text().strip()}); if that run is dead, "
            f"delete {lock} first")


def stopped_run(run_dir: Path) -> str:
    return (f"hydra.run.dir={run_dir}: holds a stopped run; continue it with `cifarlab-train resume={run_dir}` or "
            "choose another folder")


def finished_run(run_dir: Path) -> str:
    return f"hydra.run.dir={run_dir}: holds a finished run ({FINISHED}); choose another folder"


def holder() -> str:
    """Who holds a lock, as its file says it: this process, its machine, and since when (lock_is_stale reads it)."""
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} since {since}"


@contextlib.contextmanager
def claim(run_dir: Path):
    """Hold the run folder for this run alone, taking over the lock of a dead run; refuse a folder that holds a
    finished run or one in progress."""
    folder = state(run_dir)
    if folder is State.FINISHED:
        raise RunFolderError(finished_run(run_dir))
    lock = run_dir / RUNNING
    if folder is not State.IN_USE:
        lock.unlink(missing_ok=True)  # its process is gone: killed
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise RunFolderError(in_use(run_dir)) from None
    slurm = f" ({slurm_run()})" if slurm_run() else ""  # what a requeued start of the job, or its other ranks, look for
    with os.fdopen(fd, "w") as f:
        f.write(f"{holder()}{slurm}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def lock_is_stale(run_dir: Path) -> bool:
    """The folder's lock names a process on this machine that no longer exists (a killed run), or an earlier start
    of this SLURM job (requeued, on this node or another)."""
    text = (run_dir / RUNNING).read_text()
    held_by = re.search(r"\((slurm job \S+) start \d+\)", text)
    if held_by and slurm_run().startswith(f"{held_by[1]} ") and f"({slurm_run()})" not in text:
        return True
    words = text.split()
    if len(words) < 4 or words[0] != "pid" or words[3] != socket.gethostname():
        return False
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def set_aside(run_dir: Path) -> Path:
    """Move what a dead attempt left (events, checkpoints, log, lock) into attempt-<time>/: kept, not mixed in."""
    attempt = run_dir / f"attempt-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    attempt.mkdir()
    for path in run_dir.iterdir():
        if path.name == "train.log":  # the new attempt's log handler has it open already: copy it, then empty it
            shutil.copy2(path, attempt / path.name)
            path.write_text("")
        elif path.name not in (".hydra", attempt.name) and not path.name.startswith("attempt-"):
            path.rename(attempt / path.name)
    return attempt


def override(key: str, value: str | Path) -> str:
    """key='value' as Hydra's override parser reads any value back unchanged (a path with , = ( ' or spaces)."""
    # Hydra unescapes backslashes only before a quote or at the end of a quoted value
    quoted = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), str(value))
    return f"{key}='{quoted}'"
