"""scripts/benchmark.py and scripts/time_to_accuracy.py in --quick mode: one process measures each method and writes
a well-formed JSON. Their speeds are not checked here (a few batches on a shared CPU mean nothing); docs/performance.md has the figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from cifarlab import prepare
from conftest import REPO

pytestmark = pytest.mark.slow  # the tools that measure (scripts/): make test runs them, test-fast does not


def _script(name: str, *args: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_quick_benchmark_writes_a_table_and_a_json_with_every_method(tmp_path, subset_root):
    out = tmp_path / "bench.json"
    result = _script("benchmark.py", "--quick", "--data-root", str(subset_root), "--out", str(out),
                     cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith(("CPU: ", "NVIDIA")) and report["quick"] is True
    assert set(report["results"]) == {"bare", "bare-fp32", "bare-augment", "cifarlab", "cifarlab-fp32", "tutorial"}
    for name, r in report["results"].items():
        assert r["train_img_per_s"] > 0 and r["eval_img_per_s"] > 0 and r["peak_mem_mib"] > 0, name
        assert len(r["train_img_per_s_by_epoch"]) == report["epochs"] == 2
    assert report["results"]["tutorial"]["batch_size"] == 64
    assert report["results"]["bare"]["batch_size"] == report["results"]["cifarlab"]["batch_size"] == 256
    r = report["results"]
    assert report["ratios"]["cifarlab/bare"] == pytest.approx(r["cifarlab"]["train_img_per_s"] / r["bare"]["train_img_per_s"])
    assert report["ratios"]["cifarlab/bare-fp32"] == pytest.approx(
        r["cifarlab"]["train_img_per_s"] / r["bare-fp32"]["train_img_per_s"])
    assert report["ratios"]["cifarlab/cifarlab-fp32"] == pytest.approx(
        r["cifarlab"]["train_img_per_s"] / r["cifarlab-fp32"]["train_img_per_s"])
    assert report["ratios"]["bare-augment/bare"] == pytest.approx(
        r["bare-augment"]["train_img_per_s"] / r["bare"]["train_img_per_s"])
    assert report["ratios"]["cifarlab/bare-augment"] == pytest.approx(
        r["cifarlab"]["train_img_per_s"] / r["bare-augment"]["train_img_per_s"])
    assert report["ratios"]["cifarlab/tutorial"] == pytest.approx(
        r["cifarlab"]["train_img_per_s"] / r["tutorial"]["train_img_per_s"])
    for name in ("| bare |", "| bare-fp32 |", "| bare-augment |", "| cifarlab |", "| cifarlab-fp32 |", "| tutorial |",
                 "cifarlab/bare = "):
        assert name in result.stdout
    # the default config: bf16 autocast where the CPU computes bf16 (bare-fp32 is its float32 twin)
    assert report["precision"] == prepare.training_precision("auto", "cpu")[0] and report["channels_last"] is True


def test_quick_time_to_accuracy_times_the_tutorial_and_stops_cifarlab_at_the_target(tmp_path, subset_root):
    out = tmp_path / "tta.json"
    result = _script("time_to_accuracy.py", "--quick", "--data-root", str(subset_root), "--out", str(out), "--also",
                     "experiment=best trainer.max_epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    tutorial, cifarlab = report["tutorial"], report["cifarlab"]
    assert report["target_test_acc"] == tutorial["test_acc"] == tutorial["epochs"][-1]["test_acc"]
    assert [e["epoch"] for e in tutorial["epochs"]] == [1, 2]
    assert tutorial["wall_s"] == tutorial["epochs"][-1]["wall_s"] > tutorial["epochs"][0]["wall_s"] > 0
    (also,) = report["also"]  # --also: a second recipe, timed against the same target and tutorial
    assert also["overrides"] == ["experiment=best", "trainer.max_epochs=2"] and also["max_epochs"] == 2
    for run in (cifarlab, also):
        probes = run["probes"]
        walls, accs, epochs = ([e[k] for e in probes] for k in ("wall_s", "test_acc", "epoch"))
        assert walls == sorted(walls) and walls[0] > 0
        assert epochs == sorted(set(epochs)) and 0 < epochs[0] < 1  # scored within epochs, not only at their ends
        assert [e["step"] for e in probes] == sorted({e["step"] for e in probes})
        ratio = report["ratio_wall_s"] if run is cifarlab else run["ratio_wall_s"]
        if run["reached"]:  # stopped at the first probe that reached the target
            assert accs[-1] >= report["target_test_acc"] > max(accs[:-1], default=-1)
            assert run["epoch"] == epochs[-1] and run["wall_s"] == walls[-1]
            assert ratio == pytest.approx(run["wall_s"] / tutorial["wall_s"])
        else:
            assert epochs[-1] == run["max_epochs"] and max(accs) < report["target_test_acc"]
            assert ratio is None
    assert "cifarlab experiment=best trainer.max_epochs=2: " in result.stdout


@pytest.mark.parametrize("target,reached", [(0.0, True), (1.01, False)])
def test_time_to_accuracy_stops_at_the_first_probe_that_reaches_the_target(tmp_path, subset_root, target, reached):
    out = tmp_path / "tta.json"
    result = _script("time_to_accuracy.py", "--quick", "--data-root", str(subset_root), "--target", str(target),
                     "--out", str(out), "trainer.max_epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    cifarlab, probes = report["cifarlab"], report["cifarlab"]["probes"]
    assert report["tutorial"] is None and report["ratio_wall_s"] is None and cifarlab["reached"] is reached
    if reached:  # the very first probe, a third of the way into the first epoch (3 batches in --quick)
        assert len(probes) == 1 and cifarlab["epoch"] == probes[0]["epoch"] == pytest.approx(1 / 3, abs=1e-3)
        assert "after epoch 0.333" in result.stdout
    else:  # every probe of both epochs, none enough
        assert [p["epoch"] for p in probes] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2], abs=1e-3)
        assert "did not reach it in 2 epochs" in result.stdout


def test_benchmark_rounds_alternate_the_methods_and_take_medians_over_all_of_them(tmp_path, subset_root):
    """With --methods, only those run and only their ratios are given; with --rounds, medians over all rounds."""
    out = tmp_path / "bench.json"
    result = _script("benchmark.py", "--quick", "--rounds", "3", "--methods", "bare,cifarlab", "--data-root",
                     str(subset_root), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rounds"] == 3 and set(report["results"]) == {"bare", "cifarlab"}
    assert set(report["ratios"]) == {"cifarlab/bare"}
    assert "| tutorial |" not in result.stdout and "cifarlab/bare = " in result.stdout
    for r in report["results"].values():
        epochs = r["train_img_per_s_by_epoch"]
        assert len(epochs) == 3 * report["epochs"] and len(r["train_img_per_s_by_round"]) == 3
        timed = [e for i, e in enumerate(epochs) if i % report["epochs"]]  # each round's first epoch is warm-up
        assert r["train_img_per_s"] == pytest.approx(sorted(timed)[1])  # the median of the 3 timed epochs
    (by_round,) = report["ratios_by_round"].values()
    bare, ours = (report["results"][m]["train_img_per_s_by_round"] for m in ("bare", "cifarlab"))
    assert by_round == pytest.approx([c / b for c, b in zip(ours, bare)], rel=1e-3)
    assert "in each of 3 rounds" in result.stdout and "(rounds: " in result.stdout
    assert report["order"] == [["bare", "cifarlab"], ["cifarlab", "bare"], ["bare", "cifarlab"]]
    bad = _script("benchmark.py", "--quick", "--rounds", "0", "--data-root", str(subset_root), cwd=tmp_path)
    assert bad.returncode == 2 and "--rounds 0: must be 1 or more" in bad.stderr


def test_rounds_merge_into_medians_over_every_timed_epoch_and_the_first_rounds_peak():
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark

    def summary(epochs, eval_rate, peak):
        return {"train_img_per_s": None, "train_img_per_s_by_epoch": epochs, "eval_img_per_s": eval_rate,
                "peak_mem_mib": peak, "batch_size": 256}

    merged = benchmark.merge_rounds([summary([900, 1, 2, 100], 5, 100), summary([900, 3, 4, 101], 7, 300),
                                     summary([900, 5, 6, 102], 6, 200)])
    # the median of the 9 timed epochs: not of the rounds' medians (2, 4, 6 -> 4), nor with the warm-ups (53)
    assert merged["train_img_per_s"] == 5
    assert merged["train_img_per_s_by_epoch"] == [900, 1, 2, 100, 900, 3, 4, 101, 900, 5, 6, 102]
    assert merged["eval_img_per_s"] == 6 and merged["peak_mem_mib"] == 100 and merged["batch_size"] == 256
    merged = benchmark.merge_rounds([summary([8], 1, 1), summary([2], 1, 1), summary([4], 1, 1)])  # --epochs 1
    assert merged["train_img_per_s"] == 4  # a round of one epoch has no warm-up to drop
    single = summary([1, 2, 3], 4, 5)
    assert benchmark.merge_rounds([single]) is single


def test_benchmark_refuses_an_unknown_method_by_name(tmp_path, subset_root):
    result = _script("benchmark.py", "--methods", "bare,lightning", "--data-root", str(subset_root), cwd=tmp_path)
    assert result.returncode == 2
    assert ("--methods bare,lightning: lightning unknown; choose from bare, bare-fp32, bare-augment, cifarlab, "
            "cifarlab-fp32, tutorial") in result.stderr


def test_profile_step_profiles_cifarlab_and_the_bare_loop(tmp_path, subset_root):
    result = _script("profile_step.py", "--data-root", str(subset_root), "--steps", "3", "--rows", "5",
                     "callbacks=plain", "data.batch_size=64", "trainer.limit_train_batches=34",
                     "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Steps 30-32 of the second epoch (34 batches an epoch)
    for line in (r"cifarlab profiled 3 steps: \d+\.\d+ ms/step", r"bare profiled 3 steps: \d+\.\d+ ms/step",
                 r"bare unprofiled: \d+\.\d+ ms/step", r"==== cifarlab callbacks=plain .*: top by self CPU",
                 r"==== bare: top by self CPU", r"aten::convolution"):
        assert re.search(line, result.stdout), line
    from cifarlab.data import batches, cifar10

    n = len(cifar10.load_cifar10(subset_root, download=False).train_y)
    per_epoch = (n - batches.val_count(0.1, n)) // 256  # the default config's split and batch size
    too_many = _script("profile_step.py", "--data-root", str(subset_root), "--steps", "500", cwd=tmp_path)
    assert too_many.returncode == 2
    assert f"an epoch holds {per_epoch} steps at data.batch_size=256; 530 are needed" in too_many.stderr


def test_layer_speed_times_each_option_in_fp32_and_bf16_and_names_the_slower_ones(tmp_path, subset_root):
    out = tmp_path / "layers.json"
    result = _script("layer_speed.py", "--data-root", str(subset_root), "--steps", "1", "--rounds", "2", "--only",
                     "pool=blurmax,activation=prelu_channels,experiment=best", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"pool=blurmax", "activation=prelu_channels", "experiment=best"}
    for name, r in report["results"].items():
        assert len(r["rounds"]["32-true"]) == len(r["rounds"]["bf16-mixed"]) == 2
        assert r["ratio"] == pytest.approx(r["bf16_img_per_s"] / r["fp32_img_per_s"], abs=2e-3)
        assert f"| {name} | " in result.stdout
    slower = [n for n, r in report["results"].items() if r["ratio"] < 1]
    assert f"slower in bf16: {', '.join(slower) or 'none'}" in result.stdout
    refused = _script("layer_speed.py", "--data-root", str(subset_root), "--only", "pool=mean", cwd=tmp_path)
    assert refused.returncode == 2 and "--only pool=mean: no such option; choose from pool=avg" in refused.stderr
