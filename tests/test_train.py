"""cifarlab-train end to end on the stand-in data: the run folder, its files, its numbers, and what it prints."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarlab import build, prepare, train

from cifarlab.data import batches, cifar10, datamodule
from cifarlab.model import count_parameters
from conftest import compose_config, option_names, read_metrics, run_cli

pytestmark = pytest.mark.slow  # trains end to end through the command line: make test runs it, test-fast does not

METRIC_KEYS = {"test_acc", "best_val_acc", "params", "epochs", "epoch_s", "train_img_per_s", "data_source"}
SCALARS = {"train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "test/loss", "test/acc", "time/epoch_s",
           "time/train_img_per_s"}


def scalars(run_dir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for path in sorted(glob.glob(str(run_dir / "events.out.tfevents.*"))):
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def test_run_folder_holds_config_events_checkpoints_and_metrics(subset_run):
    run_dir, result, _ = subset_run
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (run_dir / ".running").exists()  # released at the end
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert glob.glob(str(run_dir / "events.out.tfevents.*"))
    metrics = read_metrics(run_dir)
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["params"] == count_parameters(build.network(compose_config().model))
    assert metrics["epochs"] == 4 and metrics["steps"] == 4 * (metrics["n_train"] // 256)
    assert metrics["epoch_s"] > 0 and metrics["train_img_per_s"] > 0
    assert metrics["data_source"] == "cifar10-copy:cifar10-subset"
    # Lightning's own lines go to the run's log too (its loggers propagate to Hydra's handlers: cli.check_config)
    log = (run_dir / "train.log").read_text()
    assert "[lightning.pytorch.utilities.rank_zero][INFO] - `Trainer.fit` stopped: `max_epochs=4` reached." in log
    console = result.stdout + result.stderr  # each of Lightning's lines once, not again through its own handler
    assert console.count("GPU available: ") == console.count("`Trainer.fit` stopped: ") == 1
    assert metrics["choices"]["pool"] == "max" and metrics["choices"]["activation"] == "none"


def test_reaches_clearly_above_chance_on_the_exact_subset(subset_run):
    metrics = read_metrics(subset_run[0])
    assert metrics["test_acc"] >= 0.30, metrics
    assert metrics["best_val_acc"] >= 0.30, metrics


def test_the_run_says_which_precision_auto_chose_first_and_in_metrics(subset_run):
    run_dir, result, _ = subset_run
    precision, why = prepare.training_precision("auto", "cpu")
    lines = (result.stdout + result.stderr).splitlines()
    said = next(i for i, line in enumerate(lines) if f"precision: {precision} ({why})" in line)
    assert said < next(i for i, line in enumerate(lines) if "epoch 1/" in line)  # before training starts
    metrics = read_metrics(run_dir)
    assert metrics["precision"] == precision and metrics["cpu_bf16"] == prepare.cpu_bf16()


def test_last_lines_printed_are_test_accuracy_and_where_the_logs_are(subset_run):
    run_dir, result, _ = subset_run
    last = result.stdout.strip().splitlines()[-2:]
    assert last[0].startswith(f"test/acc {read_metrics(run_dir)['test_acc']:.4f}")
    # the folder as a path from where the command ran (here, its parent): what a user can paste
    assert last[1] == f"logs: {run_dir.name}  (TensorBoard: make tensorboard LOGDIR={run_dir.name})"


def test_event_files_hold_every_metric(subset_run):
    run_dir = subset_run[0]
    logged = scalars(run_dir)
    assert SCALARS <= logged.keys(), SCALARS - logged.keys()
    assert logged["test/acc"] == [pytest.approx(read_metrics(run_dir)["test_acc"])]
    assert len(logged["val/acc"]) == 4 and len(logged["time/epoch_s"]) == 4
    # metrics.json's timing covers every epoch, not only those up to the best checkpoint that testing reloads
    metrics = read_metrics(run_dir)
    assert metrics["train_img_per_s_by_epoch"] == pytest.approx(logged["time/train_img_per_s"])
    assert metrics["test_img_per_s"] > 0
    # One-cycle: up to optimizer.lr (sampled every 10 steps, so the exact peak may fall between samples), then down.
    lr, peak = logged["train/lr"], compose_config().optimizer.lr
    assert 0.8 * peak < max(lr) <= peak * (1 + 1e-6)
    assert lr[0] < max(lr) and lr[-1] < max(lr) / 5


def test_test_accuracy_is_the_best_checkpoints(subset_run, subset_root):
    """Reload best.ckpt into a freshly built model and score the test set in the run's precision (bf16 autocast where
    `auto` picked it): the figure metrics.json reports."""
    run_dir, _, args = subset_run
    cfg = compose_config(*args[:2])
    model = build.network(cfg.model).eval()
    state = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    arrays = cifar10.load_cifar10(subset_root, download=False)
    dm = datamodule.CifarDataModule(arrays, batches.val_count(cfg.data.val_size, len(arrays.train_y)),
                                    cfg.data.split_seed, 256, 1000, True, False, 0, 0)
    metrics = read_metrics(run_dir)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=metrics["precision"] == "bf16-mixed"):
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in dm.test_dataloader())
    assert correct / len(arrays.test_y) == pytest.approx(metrics["test_acc"], abs=1e-6)


def test_a_finished_run_folder_is_never_overwritten(subset_run, tmp_path):
    run_dir, _, args = subset_run
    kept = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = run_cli(*args, "model/pool=avg", cwd=tmp_path, timeout=120)  # even with other choices
    assert result.returncode == 2 and "holds a finished run" in result.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == kept  # .hydra/ config included


def test_a_folder_in_use_by_another_run_is_refused(tmp_path, subset_root):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    (run_dir / ".running").write_text("pid 12345 since 2026-11-22T00:00:00+00:00\n")
    result = run_cli(f"data.root={subset_root}", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "another run is using this folder" in result.stderr and "pid 12345" in result.stderr
    assert (run_dir / ".running").read_text().startswith("pid 12345")  # the other run's lock is left alone
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_same_config_and_seed_give_the_same_metrics(tmp_path, subset_root, precision):
    common = [f"data.root={subset_root}", "trainer.max_epochs=2", "trainer.limit_train_batches=6", "seed=7",
              "model/activation=rrelu", "model/dropout=dropout", "model/pool=blurmax",  # random layers too
              f"trainer.precision={precision}"]
    runs = []
    for name in ("a", "b"):
        result = run_cli(*common, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(read_metrics(tmp_path / name))
    assert runs[0]["precision"] == precision
    for key in ("test_acc", "test_loss", "best_val_acc"):
        assert runs[0][key] == runs[1][key], key


def test_every_function_torch_hands_to_mkl_vml_is_resolved_before_training():
    """prepare.VML_OPS must name each function of the torch installed: one left out could still race on its first
    call (prepare.resolve_vml_kernels says why)."""
    header = Path(torch.__file__).parent / "include" / "ATen" / "cpu" / "vml.h"
    if not header.is_file():
        pytest.skip(f"{header} not installed: no list of torch's VML functions to check against")
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch is built without MKL: no VML functions")
    routed = set(re.findall(r"^IMPLEMENT_VML_MKL\((\w+),", header.read_text(), flags=re.MULTILINE))
    assert "sqrt" in routed  # the one AdamW calls: the list was read
    assert routed == set(prepare.VML_OPS), (sorted(routed - set(prepare.VML_OPS)), sorted(set(prepare.VML_OPS) - routed))
    for op in prepare.VML_OPS:
        assert callable(getattr(torch, op)), op


class OptimizerSteps(L.Callback):
    def __init__(self, calls: list[str]):
        self.calls = calls

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.calls.append("optimizer step")


def test_vml_kernels_are_resolved_before_the_first_optimizer_step(tmp_path, monkeypatch):
    calls = []
    resolve = prepare.resolve_vml_kernels

    def recorded() -> None:
        calls.append("resolved")
        resolve()

    monkeypatch.setattr(prepare, "resolve_vml_kernels", recorded)
    cfg = prepare.settle(compose_config("data=synthetic", "data.n_train=600", "data.n_test=100", "data.val_size=100",
                                      "trainer.max_epochs=1", "trainer.limit_train_batches=2", "callbacks=plain",
                                      "threads=1"))
    train.run(cfg, tmp_path, extra_callbacks=[OptimizerSteps(calls)])
    assert calls[:2] == ["resolved", "optimizer step"] and calls.count("resolved") == 1, calls


def test_synthetic_data_is_labelled_as_such_everywhere(tmp_path):
    run_dir = tmp_path / "synthetic"
    result = run_cli("data=synthetic", "data.n_train=2000", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = read_metrics(run_dir)
    assert metrics["data_source"] == "synthetic" and metrics["data_root"] is None
    assert metrics["test_acc"] > 0.5  # learnable: far above the 10 % of chance
    assert "NOT CIFAR-10" in result.stdout + result.stderr
    assert "on synthetic" in result.stdout.strip().splitlines()[-2]
    texts = []
    for path in glob.glob(str(run_dir / "events.out.tfevents.*")):
        acc = EventAccumulator(path)
        acc.Reload()
        texts += [t.tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"] for t in acc.Tensors(tag)
                  if t.tensor_proto.string_val]  # text; the PR curves are tensors of numbers
    assert any("SYNTHETIC DATA, NOT CIFAR-10" in t for t in texts)


def test_help_lists_every_group_and_cfg_prints_the_config(tmp_path):
    help_text = run_cli("--help", cwd=tmp_path, timeout=120).stdout
    for line in ("model/pool: avg, blurmax, lp, max", "model/norm: batchnorm, groupnorm, none", "experiment: best, tutorial"):
        assert line in help_text
    assert f"ablate: {', '.join(option_names('ablate'))}" in help_text
    job = run_cli("--cfg", "job", "model/pool=avg", cwd=tmp_path, timeout=120).stdout
    assert "_target_: torch.nn.AvgPool2d" in job and "divisor_override: null" in job


def test_tutorial_experiment_is_the_seed_recipe():
    cfg = compose_config("experiment=tutorial")
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.label_smoothing) == (64, 10, 0.0)
    assert cfg.optimizer._target_ == "torch.optim.SGD" and (cfg.optimizer.lr, cfg.optimizer.momentum) == (0.01, 0.0)
    assert cfg.scheduler._target_ is None
    assert cfg.data.normalize is False and not cfg.data.augment.flip and cfg.data.augment.crop_padding == 0
    assert OmegaConf.to_container(cfg.model) == OmegaConf.to_container(compose_config().model)


def test_a_run_folder_named_with_spaces_commas_and_brackets_works(tmp_path):
    """cifarlab-train hands Hydra the folder it prepared for; a path Hydra's override parser would read otherwise
    (a comma: a sweep; brackets, quotes) must reach it unchanged."""
    run_dir = tmp_path / "my runs, v2 (it's)"
    quoted = str(run_dir).replace("'", "\\'")
    result = run_cli("data=synthetic", "data.n_train=600", "trainer.max_epochs=1", "callbacks=plain",
                     f"hydra.run.dir='{quoted}'", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(run_dir)["epochs"] == 1 and (run_dir / "train.log").is_file()
