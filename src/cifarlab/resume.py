"""Resuming, in one place: which folder a run continues (resume=<folder>, a sweep's stopped job, a SLURM requeue),
with which config, and from which checkpoint.

The rule: a folder whose state is STOPPED (run_folder.state: config.yaml or checkpoints/last.ckpt, no live run) is
continued with the config saved in it, from its last checkpoint, the TensorBoard events logged after that checkpoint
dropped (the resumed run logs those steps again); without a last checkpoint it starts again. The command line
checks resume= with it before Lightning is loaded.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from cifarlab.errors import CheckpointError, RunFolderError
from cifarlab.run_folder import FINISHED, RUNNING, SAVED_CONFIG, State, remove_partial_writes, state

if TYPE_CHECKING:
    import torch

log = logging.getLogger("cifarlab")


def stopped(run_dir: Path) -> bool:
    """Whether a sweep's job (or a requeued SLURM job) continues what an earlier attempt in its folder left."""
    return state(run_dir) is State.STOPPED


def resume_folder(folder: str, others: list[str]) -> Path:
    """`resume=<folder>` -> the stopped run's folder, absolute; refused in one line where there is nothing to resume
    there, or where the command changes anything else."""
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
    folder_state = state(run_dir)
    if folder_state is State.FINISHED:
        raise RunFolderError(f"resume={folder}: that run finished ({FINISHED}); nothing to resume")
    if folder_state is State.IN_USE:
        holder = (run_dir / RUNNING).read_text().strip()
        raise RunFolderError(f"resume={folder}: a run is still using this folder ({holder}); if it is dead, "
                             f"delete {run_dir / RUNNING} first")
    return run_dir


def saved_run(run_dir: Path) -> tuple[DictConfig, dict[str, str] | None, list[str] | None]:
    """The config a run started with, and its option names and overrides from Hydra's record of the first start."""
    cfg = OmegaConf.load(run_dir / SAVED_CONFIG)
    hydra_record = run_dir / ".hydra" / "hydra.yaml"
    record = OmegaConf.load(hydra_record) if hydra_record.exists() else None
    choices = OmegaConf.select(record, "hydra.runtime.choices") if record is not None else None
    overrides = OmegaConf.select(record, "hydra.overrides.task") if record is not None else None
    return (cfg, dict(choices) if choices is not None else None,
            OmegaConf.to_container(overrides) if overrides is not None else None)  # as typed, not resolved


def continue_from(run_dir: Path, model: torch.nn.Module, sha: str, owner: bool = True) -> str | None:
    """The checkpoint a stopped run continues from (None: it stopped before its first epoch ended, so it starts
    again), after dropping the TensorBoard events logged after that checkpoint."""
    from cifarlab import checkpoint, events  # tensorboard and Lightning: only once the run starts

    last = run_dir / "checkpoints" / checkpoint.LAST
    if not owner:  # a DDP rank > 0: rank 0 tidies the folder
        return str(last) if last.exists() else None
    for path in remove_partial_writes(run_dir / "checkpoints") + remove_partial_writes(run_dir):
        log.warning("%s: removed %s, a write the kill interrupted (the file it was replacing is whole)",
                    run_dir.name, path.name)
    if not last.exists():
        dropped = events.trim(run_dir, None)
        log.warning("%s: no checkpoint (stopped before its first epoch ended): starting it again; %d TensorBoard "
                    "events of the stopped attempt dropped", run_dir.name, dropped)
        return None
    ckpt = checkpoint.read_checkpoint(last, f"resume={last}")
    stamp = checkpoint.stamp(ckpt)
    if stamp.get("config_sha") != sha:
        raise CheckpointError(f"resume={last}: written by a run of another config than {run_dir / SAVED_CONFIG} "
                              "(edited since?); start a new run instead")
    checkpoint.check_architecture(checkpoint.network_weights(ckpt, f"resume={last}"), model, f"resume={last}")
    dropped = events.trim(run_dir, stamp["saved_at"])
    log.warning("%s: continuing after epoch %d (step %d) from %s; %d TensorBoard events logged after that "
                "checkpoint dropped (the resumed run logs those steps again)",
                run_dir.name, ckpt["epoch"] + 1, ckpt["global_step"], last.relative_to(run_dir), dropped)
    return str(last)
