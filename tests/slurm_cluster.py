"""A one-node SLURM for the tests: munged, slurmctld and slurmd (Debian's slurm-wlm 22.05) on this machine, every
file in one temporary folder, stopped by the pids in their pid files.

Needs root (slurmd starts jobs as their user) and, where SLURM is missing, apt-get to install it (as .ci/run does
for Chromium). Elsewhere the tests skip saying why; on CI (CI set) a cluster that does not start fails them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PARTITION = "cifarlab"
PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmd", "slurmctld", "munged")  # stopped in this order: the node, the controller, then authentication
# sacct needs an accounting database (slurmdbd and MySQL), which this cluster has not: submitit asks sacct for job
# states, so sacct here answers from what squeue knows (pending, running and recently ended jobs), in the form
# `sacct -o JobID,State,NodeList --parsable2 -j <id> ...` prints.
SACCT = """#!/bin/sh
ids=""
while [ $# -gt 0 ]; do
  [ "$1" = "-j" ] && ids="$ids${ids:+,}$2" && shift
  shift
done
echo "JobID|State|NodeList"
[ -n "$ids" ] && squeue -h -r -t all -j "$ids" -o '%i|%T|%N' 2>/dev/null
exit 0
"""


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]  # what a client (sbatch, squeue, scontrol, submitit) needs to reach this cluster
    partition: str = PARTITION
    cpus: int = 1

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(command, env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout, check=True)

    def log(self, daemon: str) -> str:
        path = self.folder / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def why_not() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "SLURM's daemons need root (slurmd starts each job as its user)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return f"SLURM is not installed and there is no apt-get to install it ({' '.join(PACKAGES)})"
    return None


def install() -> None:
    if all(shutil.which(c) for c in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, check=True, capture_output=True,
                   timeout=600)


def write_config(folder: Path, cpus: int) -> Path:
    host = socket.gethostname().split(".")[0]
    mem_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    lines = {
        "ClusterName": "cifarlab-test",
        "SlurmctldHost": f"{host}(127.0.0.1)",
        "SlurmUser": "root",
        "SlurmctldPort": unused_port(),
        "SlurmdPort": unused_port(),
        "AuthType": "auth/munge",
        "AuthInfo": f"socket={folder / 'munge.socket'},cred_expire=10",  # cred_expire: s a requeued job waits (120)
        "StateSaveLocation": folder / "state",
        "SlurmdSpoolDir": folder / "spool",
        "SlurmctldPidFile": folder / "slurmctld.pid",
        "SlurmdPidFile": folder / "slurmd.pid",
        "SlurmctldLogFile": folder / "slurmctld.log",
        "SlurmdLogFile": folder / "slurmd.log",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "SlurmdParameters": "config_overrides",  # the node has the CPUs below, whatever the hardware has
        "ReturnToService": 2,
        "MpiDefault": "none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "KillWait": 5,  # s from SIGTERM to SIGKILL when a job is cancelled or requeued (30 by default)
        "SchedulerParameters": "sched_interval=1",
        "NodeName": f"{host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mib // 2} State=UNKNOWN",
        "PartitionName": f"{PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
    }
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    conf = folder / "slurm.conf"
    conf.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return conf


def start_munge(folder: Path) -> None:
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    # -f: it would otherwise refuse a key and folders it finds unsafe (a temporary folder)
    subprocess.run(["munged", f"--key-file={key}", f"--socket={folder / 'munge.socket'}",
                    f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
                    f"--seed-file={folder / 'munge.seed'}", "-f"], check=True, capture_output=True, timeout=30)


def wait_until_idle(cluster: Cluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t", "-p", cluster.partition], env={**os.environ, **cluster.env},
                             capture_output=True, text=True, timeout=30)
        state = out.stdout.strip()
        if out.returncode == 0 and state == "idle":
            return
        time.sleep(0.5)
    raise RuntimeError(f"the node is not idle after {timeout:.0f} s (sinfo says {state!r}); slurmd.log ends: "
                       f"{cluster.log('slurmd')[-1500:]}\nslurmctld.log ends: {cluster.log('slurmctld')[-1500:]}")


def start(folder: Path) -> Cluster:
    install()
    cpus = len(os.sched_getaffinity(0))
    conf = write_config(folder, cpus)
    (folder / "bin").mkdir()
    (folder / "bin" / "sacct").write_text(SACCT)
    (folder / "bin" / "sacct").chmod(0o755)
    path = f"{folder / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    cluster = Cluster(folder, {"SLURM_CONF": str(conf), "PATH": path}, cpus=cpus)
    env = {**os.environ, **cluster.env}
    start_munge(folder)
    subprocess.run(["slurmctld", "-c"], env=env, check=True, capture_output=True, timeout=30)  # -c: no saved state
    subprocess.run(["slurmd"], env=env, check=True, capture_output=True, timeout=30)
    wait_until_idle(cluster)
    return cluster


def cancel_jobs(folder: Path, timeout: float = 20) -> None:
    """Jobs a failed test left running would outlive slurmd (each runs under its own slurmstepd)."""
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["scancel", f"--partition={PARTITION}"], env=env, capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and subprocess.run(
                ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30).stdout.strip():
            time.sleep(0.5)


def stop(folder: Path) -> None:
    """Each daemon by the pid it wrote, then wait for it to go (its files live in folder, which pytest removes)."""
    if (folder / "slurmctld.pid").exists():
        cancel_jobs(folder)
    for daemon in DAEMONS:
        pid_file = folder / f"{daemon}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text().split()[0])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running(folder: Path):
    """A started cluster for the duration of the block; skips (fails on CI) where it cannot start."""
    on_ci = bool(os.environ.get("CI"))
    reason = why_not()
    if reason:
        (pytest.fail if on_ci else pytest.skip)(f"no SLURM cluster: {reason}")
    try:
        cluster = start(folder)
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        stop(folder)
        detail = getattr(e, "stderr", None) or ""
        (pytest.fail if on_ci else pytest.skip)(f"no SLURM cluster: it did not start: {e} {str(detail)[-1000:]}")
    try:
        yield cluster
    finally:
        stop(folder)
