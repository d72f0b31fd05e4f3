"""`cifarlab-train -m`: one job of a sweep, and what the sweep does before its first job and after its last.

A job that fails writes failed.json (its error and trace) and the sweep goes on; run again into the same folder
(hydra.sweep.dir=...), a sweep skips its finished jobs, continues killed ones and retries failed ones. The sweep fetches the data once before any job starts, and ends
with one line: how many jobs failed and where their failed.json are (exit status 1), or where the report comes from.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cifarlab.sweep import cluster, launcher_checks
from cifarlab.errors import ConfigError, UserError, refuse
from cifarlab.resume import stopped
from cifarlab.run_folder import (FAILED, FINISHED, RUNNING, State, claim, config_sha, override, set_aside, state,
                                 to_train_log, write_json)

log = logging.getLogger("cifarlab")


def job(cfg: DictConfig) -> float:
    """One job, in the folder Hydra made for it: returns the best validation accuracy (what a search maximises; never
    the test set, which would overstate the result), NaN when it did not run to the end."""
    from hydra.core.hydra_config import HydraConfig

    from cifarlab.prepare import settle

    run_dir, option_names = Path(HydraConfig.get().runtime.output_dir), dict(HydraConfig.get().runtime.choices)
    settle(cfg)  # the config as the run records it (absolute paths), so that config_sha compares like with like
    if cluster.rank() > 0:  # a DDP rank SLURM started beside rank 0, which alone decides about the folder
        return cluster.follow(cfg, run_dir, option_names)
    folder = state(run_dir)
    if folder is State.FINISHED:
        done = json.loads((run_dir / FINISHED).read_text())
        if done.get("config_sha") == config_sha(cfg):
            log.info("%s: finished before (%s); skipped", run_dir.name, "pruned" if done.get("pruned") else
                     f"test/acc {done['test_acc']:.4f}")
            return done["best_val_acc"]
        log.error("%s: holds a finished run of another config (see its config.yaml); left alone", run_dir)
        return float("nan")
    if folder is State.IN_USE:  # another process is running this job: leave its folder alone
        log.error("%s: in use by another run (%s); skipped", run_dir, (run_dir / RUNNING).read_text().strip())
        return float("nan")
    if (run_dir / FAILED).exists():
        log.warning("%s: an earlier attempt failed; its files are kept in %s", run_dir, set_aside(run_dir).name)
    # An earlier attempt that was killed or interrupted (with or without a checkpoint) is continued in place.
    resume = stopped(run_dir)
    if resume:
        log.warning("%s: an earlier attempt was stopped; continuing it", run_dir.name)
    from cifarlab.search import trial as search_trial
    from cifarlab.train import Interrupted, run  # Lightning (6 s to load): not for a job skipped above

    try:
        if str(cfg.trainer.get("strategy", "")).startswith("ddp") and cluster.tasks_per_node() is None:
            raise ConfigError("trainer.strategy=ddp inside a -m sweep: Lightning re-runs the command for each rank "
                              "with hydra.run.dir, which a sweep job does not use, so ranks would land in another "
                              "folder; use launcher=slurm with hydra.launcher.tasks_per_node=<trainer.devices> "
                              "(SLURM starts the ranks), or trainer=ddp "
                              "without -m")
        with claim(run_dir):
            return run(cfg, run_dir, option_names, resume=resume,
                       extra_callbacks=search_trial.callbacks(cfg.get("trial")))["best_val_acc"]
    except Interrupted as e:
        print(f"\n{e}\nThe sweep stopped; run the same command again to go on: finished jobs are skipped and this "
              "one continues where it stopped.", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if cluster.requeue_raced(e):  # SLURM stopped the job while submitit requeued it: no failed.json
            log.warning("%s: stopped by SLURM while requeuing itself (%s); its next start continues", run_dir.name, e)
            sys.exit(130)
        what = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        write_json(run_dir / FAILED, {"error": what, "traceback": traceback.format_exc()})
        to_train_log(f"failed: {what}", logging.ERROR, sys.exc_info())
        log.error("%s failed, the sweep goes on: %s", run_dir.name, what)
        return float("nan")


class SweepOutcome(Callback):
    """Hydra calls it in the process that launches the jobs (configs/train.yaml, hydra.callbacks)."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the launcher's and sweeper's settings, then fetch the data once, before Hydra makes the sweep folder
        and before anything is submitted: a mistake, or offline and without the data, is one line and no folder."""
        self.started = time.time()
        mistake = launcher_checks.mistake(config) or cluster.launcher_mistake(config)
        if mistake:
            refuse(mistake)
        from cifarlab.prepare import fetch_data  # torchvision: only for a sweep that goes ahead

        try:
            fetch_data(config.data)
        except UserError as e:
            refuse(str(e))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        def since_start(path: Path) -> bool:  # written by this sweep, not an earlier one in the same folder
            return path.exists() and path.stat().st_mtime >= self.started - 1

        folders = sorted(sweep.iterdir()) if sweep.is_dir() else []
        jobs = [f for f in folders if since_start(f / ".hydra" / "overrides.yaml")]
        failed = [f / FAILED for f in jobs if since_start(f / FAILED)]
        if failed:
            refuse(f"{len(failed)} of {len(jobs)} jobs failed; why is in {', '.join(map(str, failed))}; the same "
                   f"command with {override('hydra.sweep.dir', sweep)} retries them and skips the rest", status=1)
        print(f"sweep: {len(jobs)} jobs in {sweep}; the table: cifarlab-report {sweep}")
