"""The Optuna search (hparams_search=): the search space as Hydra writes it, pruning of losing trials, a killed
sweep resumed by running the same command again, a larger n_trials extending the study, and refusals."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarlab.search import optuna_sweep as search, study as search_study
from cifarlab.errors import ConfigError
from conftest import CLI, REPO, run_cli

pytestmark = pytest.mark.slow  # trains end to end through the command line: make test runs it, test-fast does not

EPOCHS = 3
N_TRIALS = 4
# Half the learning rates cannot learn (1e-7), so the median pruner must stop trials; made-up data, 3 short epochs,
# two trials at once in worker processes (launcher=parallel), each its own process as on a cluster.
SEARCH = ["-m", "hparams_search=optuna", "launcher=parallel", "hydra.sweeper.n_jobs=2", "hydra/sweeper/sampler=random",
          "hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.pruner.n_warmup_steps=0",
          "optimizer.lr=choice(1e-7,0.003)", "data=synthetic", "data.n_train=1000", "data.n_test=200",
          f"trainer.max_epochs={EPOCHS}", "scheduler=none", "callbacks=plain"]


def study_of(sweep: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep / "study.journal")))
    return optuna.load_study(study_name="lr_wd_dropout", storage=storage)


def parse(*lines: str):
    return search.parse_space({}, list(lines), None)


def test_the_search_space_is_written_as_for_hydras_optuna_sweeper():
    space, fixed = parse("optimizer.lr=tag(log, interval(0.0003, 0.01))", "model.dropout.p=interval(0, 0.5)",
                         "data.batch_size=int(tag(log, interval(32, 512)))", "model/pool=choice(max, avg)",
                         "trainer.max_epochs=range(2, 11, 4)", "model.hidden=range(32,64,16)", "seed=3")
    assert space == {
        "optimizer.lr": FloatDistribution(0.0003, 0.01, log=True),
        "model.dropout.p": FloatDistribution(0.0, 0.5),
        "data.batch_size": IntDistribution(32, 512, log=True),
        "model/pool": CategoricalDistribution(["max", "avg"]),
        "trainer.max_epochs": IntDistribution(2, 10, step=4),  # Hydra's range leaves out its end: 2, 6, 10
        "model.hidden": IntDistribution(32, 48, step=16),
    }
    assert fixed == ["seed=3"]
    lows, highs, *choices = search_study.endpoints(space)
    assert lows["optimizer.lr"] == 0.0003 and highs["data.batch_size"] == 512 and highs["model/pool"] == "avg"
    assert search_study.as_override("optimizer.lr", 0.0003) == "optimizer.lr=0.0003"
    assert search_study.as_override("test_flips", True) == "test_flips=true"


@pytest.mark.parametrize("line, message", [
    ("optimizer.lr=tag(linear, interval(0.1, 1))", "optimizer.lr: tag(linear, ...) is not a search tag; allowed: log"),
    ("optimizer.lr=tag(log, interval(0, 1))", "optimizer.lr=tag(log, interval(0, 1)): needs low < high and low > 0 on a "
                                              "log scale"),
    ("optimizer.lr=interval(0.5, 0.1)", "optimizer.lr=interval(0.5, 0.1): needs low < high"),
    ("model/pool=tag(log, choice(max, avg))", "model/pool: tag(log, ...) applies to interval(...) only"),
])
def test_a_search_space_optuna_cannot_sample_is_refused_naming_the_key(line, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(line)


@pytest.mark.parametrize("bad, message", [
    ("model.dropout.p=interval(0,1.5)", "model.dropout.p=1.5: must be a number in [0, 1]"),
    ("optimizer.lrr=interval(0.1,0.2)", "the search space: optimizer.lrr=0.1: no such key; did you mean optimizer.lr?"),
])
def test_a_search_that_would_fail_some_trials_is_refused_before_any_folder(tmp_path, bad, message):
    result = run_cli("-m", "hparams_search=optuna", "data=synthetic", bad, f"hydra.sweep.dir={tmp_path / 's'}",
                     cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The search killed (SIGKILL to the sweep and its workers) in the middle of its second pair of trials, then the
    same command run again to its end. Returns the folder, the trials the kill left, and the second run."""
    work = tmp_path_factory.mktemp("search")
    sweep = work / "search"
    args = [*SEARCH, f"hydra.sweeper.n_trials={N_TRIALS}", f"hydra.sweep.dir={sweep}"]
    first = subprocess.Popen([str(CLI), *args], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    mid_trial = sweep / "trial_002" / "checkpoints" / "last.ckpt"  # trial 2 has ended an epoch, not its last
    deadline = time.time() + 300
    while not mid_trial.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert mid_trial.exists(), "the search ended or stalled before trial 2 saved a checkpoint"
    left = {t.number: t.state for t in study_of(sweep).trials}
    second = run_cli(*args, cwd=work, timeout=600)
    return work, sweep, args, left, second


def test_a_killed_search_resumes_with_exactly_n_trials_and_no_duplicate_folders(killed_and_resumed):
    _, sweep, _, left, second = killed_and_resumed
    assert second.returncode == 0, second.stderr[-3000:]
    assert left[2] == TrialState.RUNNING  # the kill left trial 2 mid-training
    trials = study_of(sweep).trials
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == N_TRIALS
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in interrupted] == [n for n, s in left.items() if s == TrialState.RUNNING]
    # Each trial the kill left was asked again with the same parameters, in the same folder
    for t in interrupted:
        again = next(u for u in counted if u.user_attrs.get("continues") == t.number)
        assert again.params == t.params and again.user_attrs["job_folder"] == t.user_attrs["job_folder"]
        m = json.loads((sweep / again.user_attrs["job_folder"] / "metrics.json").read_text())
        assert m["trial"] == again.number and m["resumed"] is True
    folders = sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert folders == sorted(t.user_attrs["job_folder"] for t in counted)  # one folder a trial, none twice
    said = second.stdout + second.stderr
    assert "trial 2 was running when the sweep stopped: asked again, continuing its folder trial_002" in said


def test_the_pruner_stops_losing_trials_at_an_epoch_end_as_finished_runs_marked_pruned(killed_and_resumed):
    _, sweep, _, _, _ = killed_and_resumed
    trials = study_of(sweep).trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete
    for t in pruned:
        folder = sweep / t.user_attrs["job_folder"]
        m = json.loads((folder / "metrics.json").read_text())
        last = max(t.intermediate_values)
        assert m["pruned"] is True and m["epochs"] == last < EPOCHS and m["test_acc"] is None
        assert m["test_acc_class"] is None  # never tested
        assert sorted(t.intermediate_values) == list(range(1, last + 1))  # val/acc after each epoch it ran
        assert m["best_val_acc"] == pytest.approx(max(t.intermediate_values.values()))
        events = EventAccumulator(str(folder))
        events.Reload()
        curve = [e.value for e in events.Scalars("val/acc")]
        assert curve == pytest.approx([t.intermediate_values[e] for e in range(1, last + 1)])  # TensorBoard: up to it
    for t in complete:
        m = json.loads((sweep / t.user_attrs["job_folder"] / "metrics.json").read_text())
        assert m["pruned"] is False and m["epochs"] == EPOCHS and t.value == pytest.approx(m["best_val_acc"])
        assert len(m["test_acc_class"]) == 10
    # every trial that cannot learn was stopped once a finished trial showed what learning looks like
    first_finished = min(t.number for t in complete)
    for t in trials:
        if t.params["optimizer.lr"] == 1e-7 and t.state != TrialState.FAIL and t.number > first_finished + 1:
            assert t.state == TrialState.PRUNED, t.number


def test_the_search_ends_with_the_best_trial_optunas_plots_and_a_report(killed_and_resumed):
    _, sweep, _, _, second = killed_and_resumed
    study = study_of(sweep)
    best = json.loads((sweep / "search.json").read_text())["best"]
    assert best["trial"] == study.best_trial.number and best["value"] == study.best_value
    assert best["params"] == study.best_trial.params
    assert f"best: trial {best['trial']} (val/acc {best['value']:.4f})" in second.stdout
    names = ("search_history", "search_importances", "search_parallel", "search_epochs")
    for name in names:
        assert (sweep / f"{name}.png").stat().st_size > 10_000
    board = EventAccumulator(str(sweep / "report"), size_guidance={"images": 0})
    board.Reload()
    assert {f"sweep/{name}" for name in names} <= set(board.Tags()["images"])
    report = (sweep / "report.md").read_text()
    assert report.count("(pruned after epoch") == sum(t.state == TrialState.PRUNED for t in study.trials)
    assert "ranked by its best val acc" in report


def test_a_larger_n_trials_extends_the_study_and_a_second_sweep_on_it_is_refused(killed_and_resumed):
    work, sweep, args, _, _ = killed_and_resumed
    owner = sweep / "study.journal.owner"
    with open(owner, "r+") as held:  # as a sweep still running holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = run_cli(*args, cwd=work, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {sweep}: another sweep is writing this study")
    more = run_cli(*[a for a in args if "n_trials" not in a], f"hydra.sweeper.n_trials={N_TRIALS + 1}", cwd=work,
                   timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    counted = [t for t in study_of(sweep).trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == N_TRIALS + 1


def test_the_cost_script_sums_what_the_trials_trained(killed_and_resumed):
    _, sweep, _, _, _ = killed_and_resumed
    out = sweep.parent / "cost.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "search_cost.py"), str(sweep), "--out", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())
    study = study_of(sweep)
    counted = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert row["epochs_trained"] == sum(max(t.intermediate_values) for t in counted)
    assert row["trials"] == {"complete": sum(t.state == TrialState.COMPLETE for t in study.trials),
                             "pruned": sum(t.state == TrialState.PRUNED for t in study.trials),
                             "fail": sum(t.state == TrialState.FAIL for t in study.trials)}
    assert row["best_val_acc"] == study.best_value and 0 < row["sweep_wall_s"] and 0 < row["trials_wall_s"]
    assert f"| `{sweep.name}` |" in result.stdout
