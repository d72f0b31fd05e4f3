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
import shlex
import shutil
import socket
from datetime import datetime, timezone
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
    """Hold the run folder for this run alone; refuse a folder that holds a finished run or one in progress."""
    if (run_dir / FINISHED).exists():
        raise RunFolderError(finished_run(run_dir))
    lock = run_dir / RUNNING
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise RunFolderError(
            f"hydra.run.dir={run_dir}: another run is using this folder ({lock}: {lock.read_text().strip()}); "
            f"if that run is dead, delete {lock} first"
        ) from None
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


def resume_overrides(folder: str, others: list[str]) -> list[str]:
    """`resume=<folder>` -> the overrides that run Hydra in that folder without rewriting its .hydra/ record."""
    run_dir = Path(folder).expanduser().resolve()  # the spelling Lightning's checkpoint paths were saved with
    if others:
        raise RunFolderError(f"resume={folder} with {' '.join(others)}: a resumed run continues with the config it "
                             "started with; give resume=<run folder> alone, or start a new run to change anything")
    if not run_dir.is_dir():
        raise RunFolderError(f"resume={folder}: no such folder; give the run folder a run printed as 'logs: <folder>'")
    if not (run_dir / SAVED_CONFIG).is_file():
        record = run_dir / ".hydra" / "overrides.yaml"
        if record.is_file():  # Hydra made it for a run that stopped (was refused, or killed) before it read its data
            again = [str(o) for o in OmegaConf.load(record)]  # the task's overrides; Hydra's own are not in it
            raise RunFolderError(f"resume={folder}: that run stopped before it had read its data (no {SAVED_CONFIG}), "
                                 f"so there is nothing to continue; start it again: cifarlab-train "
                                 f"{shlex.join([*again, f'hydra.run.dir={run_dir}'])}")
        raise RunFolderError(f"resume={folder}: not a cifarlab run folder (no {SAVED_CONFIG}); give the folder a run "
                             "printed as 'logs: <folder>'")
    if (run_dir / FINISHED).exists():
        raise RunFolderError(f"resume={folder}: that run finished ({FINISHED}); nothing to resume")
    if (run_dir / RUNNING).exists():
        if not lock_is_stale(run_dir):
            holder = (run_dir / RUNNING).read_text().strip()
            raise RunFolderError(f"resume={folder}: a run is still using this folder ({holder}); if it is dead, "
                                 f"delete {run_dir / RUNNING} first")
        (run_dir / RUNNING).unlink()  # its process is gone: killed
    return [override("hydra.run.dir", run_dir), "hydra.output_subdir=null", override("resume", run_dir)]


def saved_run(run_dir: Path) -> tuple[DictConfig, dict[str, str] | None, list[str] | None]:
    """The config a run started with, and its option names and overrides from Hydra's record of the first start."""
    cfg = OmegaConf.load(run_dir / SAVED_CONFIG)
    hydra_record = run_dir / ".hydra" / "hydra.yaml"
    record = OmegaConf.load(hydra_record) if hydra_record.exists() else None
    choices = OmegaConf.select(record, "hydra.runtime.choices") if record is not None else None
    overrides = OmegaConf.select(record, "hydra.overrides.task") if record is not None else None
    return (cfg, dict(choices) if choices is not None else None,
            OmegaConf.to_container(overrides) if overrides is not None else None)  # as typed, not resolved
