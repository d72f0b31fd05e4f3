"""launcher=slurm: what a sweep checks before it submits anything, and how the ranks of one DDP job share its folder.

Hydra's submitit launcher submits the sweep as a job array; each job runs the sweep's job function (sweep.job) in
the folder the launcher fixed before submission. With hydra.launcher.tasks_per_node=N and trainer=ddp, SLURM starts
N processes of that job, and Lightning finds its ranks in SLURM's variables (SLURMEnvironment) instead of starting
them itself: every rank runs the job in the same folder. Rank 0 owns it (skips a finished job, claims the folder,
continues a stopped one, writes every file); the others wait until rank 0 has claimed it, then train beside it from
the same checkpoint and write nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig

from cifarlab.run_folder import FINISHED, RUNNING, slurm_run

log = logging.getLogger("cifarlab")
RANK_ZERO_WAIT_S = 300  # how long a rank > 0 waits for rank 0 to claim the folder (it does so before reading data)


def rank() -> int:
    """This process's rank among the tasks SLURM started for the job (0 outside SLURM)."""
    return int(os.environ.get("SLURM_PROCID", "0"))


def tasks_per_node() -> int | None:
    """The processes SLURM started per node for this job step; None outside a SLURM step."""
    return int(os.environ["SLURM_NTASKS_PER_NODE"]) if "SLURM_NTASKS_PER_NODE" in os.environ else None


def launcher_mistake(config: DictConfig) -> str | None:
    """launcher=slurm's resources against the trainer, read before submission: the line that refuses them, or None."""
    launcher = config.hydra.launcher
    if not str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
        return None
    trainer = config.trainer
    tasks, nodes, gpus = launcher.tasks_per_node, launcher.nodes, launcher.get("gpus_per_node")
    devices, num_nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    ddp = str(trainer.get("strategy", "")).startswith("ddp")
    if tasks > 1 and not ddp:
        return (f"hydra.launcher.tasks_per_node={tasks} with trainer.strategy={trainer.get('strategy', 'auto')}: each "
                f"task would train the whole job alone, in one folder; use trainer=ddp trainer.devices={tasks}, or "
                "hydra.launcher.tasks_per_node=1")
    if (ddp or str(devices) not in ("1", "auto")) and str(devices) != str(tasks):  # Lightning: a process a device
        return (f"trainer.devices={devices} with hydra.launcher.tasks_per_node={tasks}: under SLURM each task is one "
                f"DDP process (Lightning starts none itself), so the two must be equal; set "
                f"hydra.launcher.tasks_per_node={devices} or trainer.devices={tasks}")
    if ddp and str(num_nodes) != str(nodes):
        key = "trainer.num_nodes" if "num_nodes" in trainer else "+trainer.num_nodes"
        return (f"trainer.num_nodes={num_nodes} with hydra.launcher.nodes={nodes}: the two must be equal; set "
                f"{key}={nodes}")
    if str(trainer.get("accelerator")) in ("gpu", "cuda") and gpus is not None and not launcher.get("gres"):
        wanted = tasks if ddp else 1
        if gpus < wanted:
            return (f"hydra.launcher.gpus_per_node={gpus} with trainer.accelerator={trainer.accelerator}: the jobs "
                    f"would have {gpus} GPU(s) for {wanted} process(es); on a CPU-only cluster add "
                    "trainer.accelerator=cpu, otherwise set hydra.launcher.gpus_per_node")
    return None


def requeue_raced(e: BaseException) -> bool:
    """The error came from submitit's own requeue (its USR2 handler runs `scontrol requeue`), which SLURM's stop of
    the job cut short: the job is being requeued, not failing, and its next start continues from last.ckpt."""
    return any(frame.f_code.co_name == "checkpoint_and_try_requeue" for frame, _ in traceback.walk_tb(e.__traceback__))


def follow(cfg: DictConfig, run_dir: Path, option_names: dict[str, str]) -> float:
    """A rank > 0 of a DDP job SLURM started: trains beside rank 0 in its folder and writes nothing. Returns NaN
    (the sweep reads rank 0's result)."""
    from cifarlab.search import trial as search_trial
    from cifarlab.train import Interrupted, run

    this_run, deadline = slurm_run(), time.monotonic() + RANK_ZERO_WAIT_S
    lock = run_dir / RUNNING
    while not (lock.exists() and f"({this_run})" in lock.read_text()):
        if (run_dir / FINISHED).exists():  # rank 0 skips it, or leaves alone a finished run of another config
            return float("nan")
        if time.monotonic() > deadline:
            log.error("%s: rank %d gave up after %d s: rank 0 did not take the folder (its log says why)",
                      run_dir.name, rank(), RANK_ZERO_WAIT_S)
            return float("nan")
        time.sleep(0.2)
    # Rank 0 has set aside a failed attempt and decided: a last.ckpt there now is the one it continues from.
    resume = (run_dir / "checkpoints" / "last.ckpt").exists()
    try:
        run(cfg, run_dir, option_names, resume=resume, extra_callbacks=search_trial.callbacks(cfg.get("trial")))
    except Interrupted:  # SLURM stopped the job: no result, so that submitit sees it as unfinished (requeued)
        sys.exit(130)
    except Exception as e:  # rank 0 fails the same way and records it in failed.json
        log.error("%s: rank %d stopped: %s: %s", run_dir.name, rank(), type(e).__name__, e)
    return float("nan")
