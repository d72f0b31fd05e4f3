"""launcher=slurm on a real SLURM (a one-node cluster on this machine, tests/slurm_cluster.py): a sweep is one job
array whose jobs write their folders as local jobs do, the same command again skips them, a job SLURM stops comes
back and continues to the metrics of one never stopped, and a DDP job of two tasks trains as one run."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import slurm_cluster
from conftest import CLI, read_metrics, run_cli
from test_resume import assert_same_run, wait_for
from test_sweeps import job_folders

pytestmark = pytest.mark.slow  # trains end to end through the command line: make test runs it, test-fast does not

REPORT = Path(sys.executable).parent / "cifarlab-report"
EPOCHS = 4
# A job of a few seconds on the stand-in subset: 8 steps of 64 images an epoch. Dropout and RReLU draw from the
# RNG every step, so a resumed job only matches one never stopped if that stream is restored too.
STEPS, BATCH = 8, 64
JOB = [f"data.batch_size={BATCH}", f"trainer.limit_train_batches={STEPS}", "trainer.limit_val_batches=2",
       "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1", "callbacks=plain", "threads=1",
       "model/dropout=dropout", "model/activation=rrelu"]


def on(cluster: slurm_cluster.Cluster) -> list[str]:
    """launcher=slurm on a CPU-only cluster, as docs/cluster.md gives it: one core and 1 GB a task."""
    return ["launcher=slurm", "trainer.accelerator=cpu", "hydra.launcher.gpus_per_node=0",
            f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The cluster, and its address (SLURM_CONF) in this process's environment for cifarlab-train to submit to."""
    with slurm_cluster.running(tmp_path_factory.mktemp("slurm")) as cluster, pytest.MonkeyPatch.context() as env:
        for key, value in cluster.env.items():
            env.setenv(key, value)
        yield cluster


@pytest.fixture(scope="module")
def array_sweep(slurm, subset_root, tmp_path_factory):
    """2 poolings x 2 seeds, at most 2 jobs of the array at once."""
    work = tmp_path_factory.mktemp("array")
    sweep = work / "sweep"
    args = ["-m", "model/pool=max,avg", "seed=0,1", f"data.root={subset_root}", *JOB, f"trainer.max_epochs={EPOCHS}",
            *on(slurm), "hydra.launcher.array_parallelism=2", f"hydra.sweep.dir={sweep}"]
    return work, sweep, args, run_cli(*args, cwd=work, timeout=600)


def submission_scripts(sweep: Path) -> list[str]:
    return [p.read_text() for p in sorted(sweep.glob(".submitit/*/*_submission.sh"))]


def test_a_sweep_is_one_job_array_and_each_job_writes_its_folder_as_a_local_job_does(array_sweep):
    _, sweep, _, result = array_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"sweep: 4 jobs in {sweep}; the table: cifarlab-report {sweep}"
    (script,) = submission_scripts(sweep)
    for line in ("--array=0-3%2", "--partition=cifarlab", "--ntasks-per-node=1", "--cpus-per-task=1",
                 "--gpus-per-node=0", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script, script
    folders = job_folders(sweep)
    assert [f.name for f in folders] == [f"{i:03d}_{p}-rrelu-none-dropout_s{s}"
                                         for i, (p, s) in enumerate([("max", 0), ("max", 1), ("avg", 0), ("avg", 1)])]
    for f in folders:
        assert {p.name for p in f.iterdir() if not p.name.startswith("events.out.tfevents.")} == {
            ".hydra", "checkpoints", "config.yaml", "hparams.yaml", "metrics.json", "train.log"}
        assert {p.name for p in (f / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
        m = read_metrics(f)
        assert (m["device"], m["threads"], m["epochs"], m["steps"]) == ("cpu", 1, EPOCHS, STEPS * EPOCHS)
    # one SLURM job per sweep job, each with its own log
    logs = sorted(sweep.glob(".submitit/*_[0-9]/*_0_log.out"))
    assert len(logs) == 4
    for i, path in enumerate(logs):
        text = path.read_text()
        assert f"Starting with JobEnvironment(job_id={path.parent.name.split('_')[0]}_{i}," in text, text[-2000:]
        assert "Job completed successfully" in text


def test_cifarlab_report_reads_the_sweep(array_sweep):
    work, sweep, _, _ = array_sweep
    result = subprocess.run([str(REPORT), str(sweep), "--baseline", "pool=max"], capture_output=True, text=True,
                            timeout=120, cwd=work)
    assert result.returncode == 0, result.stderr
    rows = {r["configuration"]: r for r in csv.DictReader(open(sweep / "report.csv"))}
    assert set(rows) == {"pool=max", "pool=avg"}
    assert [(r["seeds"], r["failed"]) for r in rows.values()] == [("2", "0")] * 2
    assert rows["pool=max"]["verdict"] == "baseline" and rows["pool=avg"]["test"] == "paired t"
    assert "pool=avg" in result.stdout


def test_the_same_command_again_skips_every_finished_job(array_sweep):
    work, sweep, args, _ = array_sweep
    finished = {f: (f / "metrics.json").stat().st_mtime_ns for f in job_folders(sweep)}
    result = run_cli(*args, cwd=work, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(submission_scripts(sweep)) == 2  # submitted again, as a second array
    for f, mtime in finished.items():
        assert (f / "metrics.json").stat().st_mtime_ns == mtime  # not trained again
        assert f"{f.name}: finished before (test/acc " in (f / "train.log").read_text()


def running_job(cluster: slurm_cluster.Cluster) -> str:
    (job,) = cluster.run("squeue", "-h", "-t", "RUNNING", "-o", "%i").stdout.split()
    return job


def lock(job_dir: Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        return (job_dir / ".running").read_text()
    return ""


def test_a_job_slurm_stops_comes_back_and_ends_with_the_metrics_of_one_never_stopped(slurm, array_sweep, tmp_path):
    _, sweep, args, _ = array_sweep
    reference = job_folders(sweep)[0]  # model/pool=max seed=0, never stopped
    stopped = tmp_path / "stopped"
    one_job = [a for a in args[1:] if not a.startswith(("model/pool=", "seed=", "hydra.sweep.dir="))]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen([str(CLI), "-m", "model/pool=max", "seed=0", *one_job, f"hydra.sweep.dir={stopped}"],
                            cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    job_dir = stopped / reference.name
    last = job_dir / "checkpoints" / "last.ckpt"
    try:
        wait_for(last.exists, proc, "a checkpoint")
        job = running_job(slurm)
        # What SLURM sends signal_delay_s before the time limit, and on preemption: submitit requeues the job.
        slurm.run("scancel", "--signal=USR2", job)
        wait_for(lambda: "start 2)" in lock(job_dir), proc, "the job's second start")  # the folder's lock says
        written = last.stat().st_mtime_ns
        wait_for(lambda: last.stat().st_mtime_ns != written, proc, "a checkpoint of the second start")
        # An administrator's requeue (or a preemption in REQUEUE mode): SIGTERM, then SIGKILL after KillWait.
        slurm.run("scontrol", "requeue", job)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    log = (job_dir / "train.log").read_text()
    assert "Caught signal SIGUSR2" in log  # submitit's handler: requeued itself
    assert log.count("an earlier attempt was stopped; continuing it") == 2
    assert log.count("from checkpoints/last.ckpt") == 2 and not list(job_dir.glob("attempt-*"))
    assert_same_run(job_dir, reference)


def test_a_ddp_job_of_two_tasks_trains_as_one_run_in_one_folder(slurm, array_sweep, subset_root, tmp_path):
    _, sweep, _, _ = array_sweep
    single = read_metrics(job_folders(sweep)[0])
    ddp = tmp_path / "ddp"
    epochs = 2
    result = run_cli("-m", f"data.root={subset_root}", *JOB, f"trainer.max_epochs={epochs}", *on(slurm),
                     "trainer=ddp", "trainer.devices=2", "hydra.launcher.tasks_per_node=2",
                     f"hydra.sweep.dir={ddp}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (script,) = submission_scripts(ddp)
    assert "#SBATCH --ntasks-per-node=2\n" in script
    (job_dir,) = job_folders(ddp)  # one folder, not one per rank
    # two tasks, each a rank of one process group that Lightning found in SLURM's variables
    rank0, rank1 = (p.read_text() for p in sorted(ddp.glob(".submitit/*/*_log.out")))
    assert "global_rank=0(2))" in rank0 and "global_rank=1(2))" in rank1
    assert "All distributed processes registered. Starting with 2 processes" in rank0
    metrics = read_metrics(job_dir)
    assert set(metrics) == set(single)  # the same metrics.json as a single-process job
    assert (metrics["steps"], metrics["epochs"], metrics["device"]) == (epochs * STEPS, epochs, "cpu")
    text = (job_dir / "train.log").read_text()
    assert [text.count(f"epoch {e}/{epochs}: ") for e in (1, 2)] == [1, 1]  # rank 0 alone writes
    losses = []
    for path in job_dir.glob("events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            losses += [e.step for e in events.Scalars("train/loss")]
    assert sorted(losses) == list(range(metrics["steps"]))  # each step logged once, not once per rank


@pytest.mark.parametrize("args, message", [
    (["trainer=ddp", "trainer.devices=2"],
     "trainer.devices=2 with hydra.launcher.tasks_per_node=1: under SLURM each task is one DDP process (Lightning "
     "starts none itself), so the two must be equal; set hydra.launcher.tasks_per_node=2 or trainer.devices=1"),
    (["hydra.launcher.tasks_per_node=2"],
     "hydra.launcher.tasks_per_node=2 with trainer.strategy=auto: each task would train the whole job alone, in one "
     "folder; use trainer=ddp trainer.devices=2, or hydra.launcher.tasks_per_node=1"),
    (["trainer.accelerator=gpu"],
     "hydra.launcher.gpus_per_node=0 with trainer.accelerator=gpu: the jobs would have 0 GPU(s) for 1 process(es); "
     "on a CPU-only cluster add trainer.accelerator=cpu, otherwise set hydra.launcher.gpus_per_node"),
])
def test_tasks_devices_and_gpus_that_do_not_match_are_refused_before_anything_is_submitted(tmp_path, args, message):
    """No cluster needed: nothing reaches sbatch."""
    sweep = tmp_path / "s"
    result = run_cli("-m", "data=synthetic", "launcher=slurm", "trainer.accelerator=cpu",
                     "hydra.launcher.gpus_per_node=0", *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not sweep.exists()


def test_an_optuna_search_on_slurm_reports_each_epoch_from_the_jobs_and_prunes(slurm, tmp_path):
    """Trials are SLURM jobs in other processes: each reports val/acc per epoch to the study's journal file, and the
    pruner stops the trial that cannot learn (the search and its settings of tests/test_search.py)."""
    from optuna.trial import TrialState

    from test_search import SEARCH, study_of

    sweep = tmp_path / "search"
    search = [a for a in SEARCH if a != "launcher=parallel"]
    result = run_cli(*search, "hydra.sweeper.n_trials=4", *on(slurm), "hydra.launcher.array_parallelism=2",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s.count("#SBATCH --array=0-1%2") for s in submission_scripts(sweep)] == [1, 1]  # two arrays of 2 trials
    trials = study_of(sweep).trials
    assert [t.state for t in trials].count(TrialState.PRUNED) >= 1 and len(trials) == 4
    for t in trials:
        m = read_metrics(sweep / t.user_attrs["job_folder"])
        assert sorted(t.intermediate_values) == list(range(1, m["epochs"] + 1))  # reported by the job, every epoch
        assert m["pruned"] is (t.state == TrialState.PRUNED) and m["trial"] == t.number


def test_seeds_auto_on_slurm_submits_one_array_a_round_and_a_rerun_runs_no_job_again(slurm, subset_root, tmp_path):
    """The rounds of seeds=auto (tests/test_seeds.py) as SLURM job arrays: 2 identical rows x 2 seeds, then 1 seed
    more each; the tied row reaches the maximum. The folders are named by row and seed, so the same command again
    finds every job finished."""
    sweep = tmp_path / "seeds"
    args = ["-m", "data.download=false,true", "seeds=auto", "hydra.sweeper.first=2", "hydra.sweeper.step=1",
            "hydra.sweeper.max=3", "hydra.sweeper.baseline='data.download=False'", f"data.root={subset_root}", *JOB,
            "trainer.max_epochs=1", *on(slurm), "hydra.launcher.array_parallelism=2", f"hydra.sweep.dir={sweep}"]
    result = run_cli(*args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # one array a round: 2 rows x 2 seeds, then 2 rows x 1 seed
    assert [s.count(f"#SBATCH --array=0-{n - 1}%2\n") for s, n in zip(submission_scripts(sweep), (4, 2), strict=True)] == [1, 1]
    folders = {f.name: read_metrics(f) for f in job_folders(sweep)}
    assert sorted(folders) == [f"{i:03d}_data.download={d}_s{s}" for i, d in enumerate(("False", "True"))
                               for s in range(3)], sorted(folders)
    for name, metrics in folders.items():
        assert metrics["seed"] == int(name[-1]) and metrics["steps"] == STEPS
    row = json.loads((sweep / "seeds.json").read_text())["rows"]["data.download=True"]
    assert row["seeds"] == 3 and row["stopped"] == "reached the maximum (inconclusive)"
    log = result.stderr + result.stdout
    assert "look 1/2 (2 seeds a row)" in log and "look 2/2 (3 seeds a row)" in log

    written = {name: (sweep / name / "metrics.json").stat().st_mtime_ns for name in folders}
    again = run_cli(*args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {name: (sweep / name / "metrics.json").stat().st_mtime_ns for name in folders} == written
    for name in folders:
        assert f"{name}: finished before (test/acc " in (sweep / name / "train.log").read_text()
