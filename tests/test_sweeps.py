"""Sweeps: every named grid runs, jobs land in their own folders, a re-run resumes, failures are reported."""

from __future__ import annotations

import collections
import csv
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from scipy import stats as scipy_stats
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarlab import board

from cifarlab.report import stats
from cifarlab.prepare import prepare
from conftest import CONFIG_DIR, compose_config, get, option_names, read_metrics, run_cli

pytestmark = pytest.mark.slow  # trains end to end through the command line: make test runs it, test-fast does not

# A job shrunk to seconds: made-up data, one batch of each split, no inspection.
TINY = ["data=synthetic", "data.n_train=300", "data.n_test=100", "trainer.max_epochs=1",
        "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "callbacks=plain"]
REPORT = Path(sys.executable).parent / "cifarlab-report"


def sweep_params(name: str) -> dict[str, str]:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=[f"sweep={name}"], return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params)


def job_folders(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())


# The grids run here as sweeps. Every option another grid names is in one of these, so the others (pool_x_activation,
# norm, dropout) are checked by composing and building each of their configurations, which takes seconds, not minutes.
RUN_GRIDS = ("pool", "activation", "norm_dropout", "best_ablation")


@pytest.mark.parametrize("name", option_names("sweep"))
def test_every_named_grid_runs_one_job_per_configuration(tmp_path, name):
    params = sweep_params(name)
    assert params.pop("seed") == "0,1,2"
    if name not in RUN_GRIDS:
        ran = {(k, v) for grid in RUN_GRIDS for k, vs in sweep_params(grid).items() for v in vs.split(",")}
        options = {(k, v) for k, vs in params.items() for v in vs.split(",")}
        assert options <= ran, f"{name} names an option no sweep runs: {sorted(options - ran)}"
        axes = [[f"{k}={v}" for v in vs.split(",")] for k, vs in params.items()]
        for overrides in itertools.product(*axes):
            prepare(compose_config(f"sweep={name}", *overrides, *TINY), tmp_path)  # refuses what a job would
        return
    seeds = "0,1" if name == "pool" else "0"  # seed=... on the command line replaces the grid's seeds (README)
    expected = math.prod(len(v.split(",")) for v in params.values()) * len(seeds.split(","))
    sweep = tmp_path / name
    result = run_cli("-m", f"sweep={name}", f"seed={seeds}", *TINY, f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = job_folders(sweep)
    assert len(folders) == expected
    assert all((f / "metrics.json").exists() for f in folders)
    # Each folder is named by its place in the grid and its choices; no two jobs share one.
    for f in folders:
        m = read_metrics(f)
        c = m["choices"]
        if "ablate" in params:  # an ablation of a recipe: named by what it takes out
            choice = dict(o.split("=", 1) for o in m["overrides"])["ablate"]
            assert f.name == f"{f.name.split('_')[0]}_{choice}_s{m['seed']}"
        else:
            assert f.name == f"{f.name.split('_')[0]}_{c['pool']}-{c['activation']}-{c['norm']}-{c['dropout']}_s{m['seed']}"


SEEDS = (0, 1, 2)
EPOCHS = 2  # a band over seeds in the report's TensorBoard run needs more than one point


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """2 x 2 grid, 3 seeds, one configuration made to fail (a pooling that leaves nothing), 2 epochs a job."""
    work = tmp_path_factory.mktemp("sweep")
    sweep = work / "grid"
    tiny = [a for a in TINY if not a.startswith("trainer.max_epochs=")] + [f"trainer.max_epochs={EPOCHS}"]
    args = ["-m", "model/pool=max,avg", "model.pool.kernel_size=2,40", f"seed={','.join(map(str, SEEDS))}", *tiny,
            f"hydra.sweep.dir={sweep}"]
    result = run_cli(*args, cwd=work, timeout=600)
    return work, sweep, args, result


def test_a_failing_job_does_not_stop_the_others_and_the_sweep_exits_1_saying_where_they_are(small_sweep):
    _, sweep, _, result = small_sweep
    folders = job_folders(sweep)
    assert len(folders) == 4 * len(SEEDS)
    failed = [f for f in folders if (f / "failed.json").exists()]
    finished = [f for f in folders if (f / "metrics.json").exists()]
    assert len(failed) == len(finished) == 2 * len(SEEDS)
    error = json.loads((failed[0] / "failed.json").read_text())["error"]
    assert error.startswith("model.pool.kernel_size=40") and "shrinks a feature map to nothing" in error
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    where = ", ".join(str(f / "failed.json") for f in failed)
    assert last == (f"error: {len(failed)} of {len(folders)} jobs failed; why is in {where}; the "
                    f"same command with hydra.sweep.dir='{sweep}' retries them and skips the rest")
    assert "Traceback" not in result.stderr


def test_lightning_lines_show_once_per_job_on_the_console_and_in_its_train_log(small_sweep):
    """`import lightning` gives its logger a console handler that would repeat each line beside Hydra's."""
    _, sweep, _, result = small_sweep
    finished = [f for f in job_folders(sweep) if (f / "metrics.json").exists()]  # the others fail before a Trainer
    assert len(re.findall(r"GPU available: ", result.stdout + result.stderr)) == len(finished) > 0
    assert all(len(re.findall(r"GPU available: ", (f / "train.log").read_text())) == 1 for f in finished)


def finished_accs(sweep: Path, pool: str) -> dict[int, float]:
    """{seed: test accuracy %} of the sweep's finished jobs with this pooling."""
    return {m["seed"]: 100 * m["test_acc"] for f in job_folders(sweep) if (f / "metrics.json").exists()
            and (m := read_metrics(f))["choices"]["pool"] == pool}


def test_report_compares_each_row_with_the_baseline_paired_by_seed(small_sweep):
    work, sweep, _, _ = small_sweep
    result = subprocess.run([str(REPORT), str(sweep)], capture_output=True, text=True, timeout=120, cwd=work)
    assert result.returncode == 0, result.stderr
    rows = {r["configuration"]: r for r in csv.DictReader(open(sweep / "report.csv"))}
    assert set(rows) == {f"pool={p} pool.kernel_size={k}" for p in ("max", "avg") for k in (2, 40)}
    base, avg = rows["pool=max pool.kernel_size=2"], rows["pool=avg pool.kernel_size=2"]
    assert base["verdict"] == "baseline" and base["seeds"] == str(len(SEEDS)) and base["failed"] == "0"
    b, a = finished_accs(sweep, "max"), finished_accs(sweep, "avg")
    assert set(a) == set(b) == set(SEEDS)
    assert float(base["test_acc_mean"]) == pytest.approx(statistics.fmean(b.values()), abs=1e-4)
    assert avg["test"] == "paired t" and avg["pairs"] == str(len(SEEDS))
    assert float(avg["delta"]) == pytest.approx(statistics.fmean(a[s] - b[s] for s in SEEDS), abs=1e-4)
    for row in (base, avg):
        assert float(row["ci95_low"]) <= float(row["test_acc_mean"]) <= float(row["ci95_high"])
    paired = scipy_stats.ttest_rel([a[s] for s in SEEDS], [b[s] for s in SEEDS])
    ci = paired.confidence_interval(0.95)  # one row compared: nothing to adjust
    assert float(avg["p"]) == pytest.approx(paired.pvalue, rel=1e-3) and avg["p_adjusted"] == avg["p"]
    assert (float(avg["delta_ci_low"]), float(avg["delta_ci_high"])) == pytest.approx((ci.low, ci.high), abs=1e-3)
    decided = ci.low > 0 or ci.high < 0
    assert avg["verdict"].startswith("better" if ci.low > 0 else "worse") if decided else avg["verdict"] == "inconclusive"
    assert decided or avg["seeds_needed"] == "inf" or int(avg["seeds_needed"]) > len(SEEDS)
    broken = rows["pool=avg pool.kernel_size=40"]
    assert (broken["seeds"], broken["failed"], broken["verdict"], broken["p"]) == ("0", str(len(SEEDS)), "", "")
    text = (sweep / "report.md").read_text()
    assert "(documented model)" in text and "## Failed, damaged or unfinished jobs" in text and "kernel_size=40" in text
    assert "`synthetic`" in text  # the data is named next to the numbers
    assert "test accuracy is that of each job's best-validation checkpoint" in text  # test_checkpoint's default
    assert "divided among the 1 row compared (Bonferroni)" in text and "## Main effects" in text  # a two-factor grid
    assert Image.open(sweep / "report.png").size[0] > 300 and Image.open(sweep / "heatmap.png").size[0] > 300
    assert avg["verdict"] in result.stdout and "98.3" not in result.stdout  # the table, printed; 95 % for one row
    jobs = list(csv.DictReader(open(sweep / "jobs.csv")))
    assert len(jobs) == len(job_folders(sweep)) and {j["status"] for j in jobs} == {"finished", "failed"}


def test_report_tensorboard_run_draws_seed_bands_on_a_real_server(small_sweep):
    _, sweep, _, _ = small_sweep
    if not (sweep / "report").is_dir():
        subprocess.run([str(REPORT), str(sweep)], capture_output=True, timeout=120, check=True)
    curves = collections.defaultdict(list)  # seed -> [val/acc per epoch] of the pool=avg jobs
    for f in job_folders(sweep):
        if (f / "metrics.json").exists() and read_metrics(f)["choices"]["pool"] == "avg":
            events = EventAccumulator(str(f))
            events.Reload()
            curves[read_metrics(f)["seed"]] = [(e.step, e.value) for e in events.Scalars("val/acc")]
    assert len(curves) == len(SEEDS) and all(len(c) == EPOCHS for c in curves.values())
    with board.serve(sweep) as url:
        assert get(f"{url}/data/plugins_listing")["custom_scalars"]["enabled"]
        (category,) = get(f"{url}/data/plugin/custom_scalars/layout")["category"]
        charts = {c["title"]: c["margin"]["series"] for c in category["chart"]}
        assert set(charts) == {"val/acc", "val/loss"}
        (band,) = charts["val/acc"]  # one band per run that has the tags: a run per configuration
        runs = {run for run, tags in get(f"{url}/data/plugin/scalars/tags").items() if band["value"] in tags}
        assert runs == {"report/pool=max,pool.kernel_size=2", "report/pool=avg,pool.kernel_size=2"}
        run = urllib.parse.quote("report/pool=avg,pool.kernel_size=2")
        scalars = {k: get(f"{url}/data/plugin/scalars/scalars?run={run}&tag={urllib.parse.quote(band[k])}")
                   for k in ("value", "lower", "upper")}
        for epoch in range(EPOCHS):
            values = [c[epoch][1] for c in curves.values()]
            step, mean = scalars["value"][epoch][1:]
            assert step == curves[0][epoch][0]  # at the jobs' own step, so the band lines up with their curves
            assert mean == pytest.approx(statistics.fmean(values), abs=1e-6)
            assert scalars["lower"][epoch][2] <= mean <= scalars["upper"][epoch][2]
            assert (scalars["lower"][epoch][2], scalars["upper"][epoch][2]) == pytest.approx(
                stats.mean_interval(values), abs=1e-6)
        experiment = get(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})
        columns = [h["name"] for h in experiment["hparamInfos"]]
        assert set(columns[:4]) == {"Pool", "Activation", "Norm", "Dropout"}, columns  # over the whole sweep
        # the per-class view: the figure, and in the report's text each class's mean over the seeds
        assert {"sweep/report", "sweep/per_class"} <= set(get(f"{url}/data/plugin/images/tags")["report"])
        (tag,) = get(f"{url}/data/plugin/text/tags")["report"]  # add_text's tag, as SummaryWriter names it
        (text,) = get(f"{url}/data/plugin/text/text?run=report&tag={urllib.parse.quote(tag)}")
    per_class = [read_metrics(f)["test_acc_class"] for f in job_folders(sweep)
                 if (f / "metrics.json").exists() and read_metrics(f)["choices"]["pool"] == "avg"]
    assert len(per_class) == len(SEEDS)
    section = text["text"].split("<h2>Test accuracy per class</h2>")[1].split("</table>")[0]  # markdown, as HTML
    rows = {cells[0]: cells[1:] for row in re.findall(r"<tr>(.*?)</tr>", section, re.S)
            if (cells := re.findall(r"<td>(.*?)</td>", row))}
    means = [100 * statistics.fmean(m[c] for m in per_class) for c in per_class[0]]
    assert [cell.split(" (")[0] for cell in rows["pool=avg pool.kernel_size=2"]] == [f"{m:.1f}" for m in means]


def test_running_the_sweep_again_skips_finished_jobs_and_retries_the_rest(small_sweep):
    work, sweep, args, _ = small_sweep
    folders = job_folders(sweep)
    finished = {f: (f / "metrics.json").stat().st_mtime_ns for f in folders if (f / "metrics.json").exists()}
    # Make one finished job look killed mid-run: no metrics.json, a lock left by a process that is gone.
    killed = sorted(finished)[0]
    before = read_metrics(killed)
    (killed / "metrics.json").unlink()
    del finished[killed]
    (killed / ".running").write_text(f"pid 99999999 on {os.uname().nodename} since 2026-01-01T00:00:00+00:00\n")
    result = run_cli(*args, cwd=work, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]  # the same jobs fail again
    n = len(SEEDS)
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {2 * n} of {4 * n} jobs failed; why is in ")
    assert result.stderr.count("finished before") + result.stdout.count("finished before") == 2 * n - 1
    for f, mtime in finished.items():
        assert (f / "metrics.json").stat().st_mtime_ns == mtime  # untouched
    assert (killed / "metrics.json").exists() and not (killed / ".running").exists()  # run to the end
    # continued from its last checkpoint (not from scratch), to the same numbers
    assert f"continuing after epoch {EPOCHS} (step " in (killed / "train.log").read_text()
    after = read_metrics(killed)
    assert after["resumed"] and (after["test_acc"], after["best_val_acc"]) == (before["test_acc"], before["best_val_acc"])
    assert not list(killed.glob("attempt-*"))
    failed = [f for f in job_folders(sweep) if (f / "failed.json").exists()]
    assert len(failed) == 2 * len(SEEDS)  # tried again, failed again; each earlier failed attempt kept aside
    assert all(len(list(f.glob("attempt-*/failed.json"))) == 1 for f in failed)
    for f in failed:  # each attempt's log stays with it: the earlier one set aside, this one's in the job folder
        assert "failed: " in (f / "train.log").read_text()
        (earlier,) = f.glob("attempt-*/train.log")
        assert "failed: " in earlier.read_text() and earlier.read_text() != (f / "train.log").read_text()


def test_ad_hoc_grids_still_work(tmp_path):
    sweep = tmp_path / "adhoc"
    result = run_cli("-m", "model/norm=none,batchnorm", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [read_metrics(f)["choices"]["norm"] for f in job_folders(sweep)] == ["none", "batchnorm"]


def test_parallel_launcher_runs_more_jobs_than_workers_each_in_a_worker_process(tmp_path):
    """5 jobs on 2 workers: each worker runs several jobs, and every job resolves the project's interpolations
    (optimizer.lr's cifarlab.scaled_lr), which a worker restores from the parent before each job."""
    sweep = tmp_path / "parallel"
    result = run_cli("-m", "launcher=parallel", "model/activation=none,relu,tanh,elu,gelu", *TINY,
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    folders = job_folders(sweep)
    assert len(folders) == 5 and all((f / "metrics.json").exists() for f in folders), [
        (f / "failed.json").read_text() for f in folders if (f / "failed.json").exists()]
    assert [read_metrics(f)["threads"] for f in folders] == [1] * 5  # cores / jobs, so the two do not fight
    assert result.stdout.strip().splitlines()[-1] == f"sweep: 5 jobs in {sweep}; the table: cifarlab-report {sweep}"


def test_slurm_launcher_and_ddp_trainer_compose():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        slurm = compose("train", overrides=["launcher=slurm"], return_hydra_config=True)
        ddp = compose("train", overrides=["trainer=ddp"])
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.gpus_per_node == 1
    assert slurm.trainer.devices == 1 and slurm.hydra.launcher.tasks_per_node == 1
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.devices == 2 and ddp.trainer.sync_batchnorm


def test_ddp_on_two_cpu_processes_trains_and_logs_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "ddp"
    # the default callbacks: every inspection runs in both processes, and writes from rank 0 alone
    result = run_cli("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data=synthetic",
                     "data.n_train=2000", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    # 1800 training images, 2 processes, batch 256 each: 3 steps an epoch.
    assert metrics["steps"] == 2 * ((metrics["n_train"] // 2) // 256) == 6
    assert result.stdout.count("test/acc ") == 1  # one process reports
    losses, images, histograms = [], collections.Counter(), collections.Counter()
    for path in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "histograms": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            losses += [e.step for e in acc.Scalars("train/loss")]
        images.update((tag, e.step) for tag in acc.Tags()["images"] for e in acc.Images(tag))
        histograms.update((tag, e.step) for tag in acc.Tags()["histograms"] for e in acc.Histograms(tag))
    assert sorted(losses) == list(range(6))  # each step once, not once per process
    # at the start (step 0) and after each epoch (steps 3 and 6), once each; the test figures once, at the end
    assert {step for tag, step in images if tag == "pool/stage1"} == {0, 3, 6}
    assert {tag for tag, _ in images} >= {"pool/input", "pool/stage3", "test/misclassified"}
    assert {step for tag, step in histograms if tag == "weights/fc1.weight"} == {0, 3, 6}
    assert set(images.values()) == set(histograms.values()) == {1}


# Test instrument for the DDP processes (found on PYTHONPATH at start-up, before any cifarlab code): counts each
# process's gradient all-reduces, the backward passes that synced, and writes the count when the process exits.
SYNC_COUNTER = """
import atexit, json, os
from pathlib import Path
import torch.nn.parallel as par
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


count = {"syncs": 0}

def hook(state, bucket):
    count["syncs"] += bucket.is_last()
    return default_hooks.allreduce_hook(None, bucket)

init = par.DistributedDataParallel.__init__

def counting_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.register_comm_hook(None, hook)
    out = Path(os.environ["COUNT_SYNCS_DIR"], f"{os.getpid()}.json")
    atexit.register(lambda: out.write_text(json.dumps(count)))

par.DistributedDataParallel.__init__ = counting_init
"""


def test_ddp_accumulation_syncs_once_per_step_and_trains_as_one_process_on_the_whole_batch(tmp_path, monkeypatch):
    from cifarlab import checkpoint

    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(SYNC_COUNTER)
    (tmp_path / "syncs").mkdir()
    # No augmentation and no BatchNorm (the default model): the two runs below see the same images per step and
    # nothing in a step depends on how its batch is split. Plain SGD: its steps scale with the gradient (AdamW's
    # hardly do), so a gradient summed or averaged wrongly over batches or processes shows in the weights.
    # float32: in bf16 a batch of 256 and two of 64 round differently, past any tolerance that would catch a wrong sum.
    same = ["data=synthetic", "data.n_train=2000", "data.n_test=100", "trainer.max_epochs=2", "callbacks=plain",
            "data.augment.flip=false", "data.augment.crop_padding=0", "optimizer=sgd", "optimizer.lr=0.05", "threads=1",
            "trainer.precision=32-true"]
    # 1800 training images; 2 processes x 64 images x 2 accumulated batches = one step on 256 images: each process
    # takes every other image of the epoch's order, so a step sees the same 256 images as one process's batch of 256.
    with monkeypatch.context() as env:  # the instrument for the DDP run only, beside any PYTHONPATH already set
        env.setenv("PYTHONPATH", str(tmp_path / "probe"), prepend=os.pathsep)
        env.setenv("COUNT_SYNCS_DIR", str(tmp_path / "syncs"))
        ddp = run_cli("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=64",
                      "+trainer.accumulate_grad_batches=2", *same,
                      f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = run_cli("data.batch_size=256", *same, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    steps = read_metrics(tmp_path / "ddp")["steps"]
    assert steps == read_metrics(tmp_path / "one")["steps"] == 2 * (1800 // 256) == 14
    syncs = [json.loads(f.read_text())["syncs"] for f in (tmp_path / "syncs").glob("*.json")]
    assert syncs == [steps, steps]  # each process: one all-reduce per optimizer step, none for the 14 batches between
    weights = {name: checkpoint.network_weights(checkpoint.read_checkpoint(
        str(tmp_path / name / "checkpoints" / checkpoint.LAST), name), name) for name in ("ddp", "one")}
    for key, value in weights["one"].items():
        torch.testing.assert_close(weights["ddp"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_ddp_inside_a_sweep_is_refused_per_job(tmp_path):
    sweep = tmp_path / "s"
    result = run_cli("-m", "trainer=ddp", "trainer.accelerator=cpu", "model/pool=max,avg", *TINY,
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    for f in job_folders(sweep):
        assert "trainer.strategy=ddp inside a -m sweep" in json.loads((f / "failed.json").read_text())["error"]
