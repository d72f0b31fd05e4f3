"""The speed settings: precision, channels_last, torch.compile, test-time flips, the learning-rate rule for the batch
size, and a training step that never waits for the device (no host syncs outside logging steps)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import lightning as L
import pytest
import torch

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarlab import build, inspection, prepare, train
from cifarlab.module import CifarModule
from conftest import REPO, compose_config, read_metrics


def test_precision_auto_is_bf16_where_the_cpu_computes_it_and_on_a_gpu_that_has_it(monkeypatch):
    assert compose_config().trainer.precision == "auto"
    features = dict(torch.cpu.get_capabilities())
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: features)
    for native in ({"avx512_bf16": True}, {"amx_bf16": True, "avx512_bf16": True}):
        features.update({"avx512_bf16": False, "amx_bf16": False, **native})
        precision, why = prepare.training_precision("auto", "cpu")
        assert precision == "bf16-mixed" and why == f"auto: the CPU computes bf16 ({next(iter(native))})"
    features.update(avx512_bf16=False, amx_bf16=False)  # AVX2 or plain AVX-512: autocast would only add casts
    assert prepare.training_precision("auto", "cpu") == ("32-true", "auto: the CPU has no bf16 units (no avx512_bf16 "
                                                                     "or amx_bf16)")
    assert prepare.training_precision("32-true", "cpu")[0] == "32-true"  # an explicit choice is kept
    assert prepare.training_precision("16-mixed", "auto")[0] == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert prepare.training_precision("auto", "auto")[0] == "bf16-mixed"
    assert prepare.training_precision("auto", "gpu")[0] == "bf16-mixed"
    assert prepare.training_precision("auto", "cpu")[0] == "32-true"  # accelerator=cpu on a GPU machine, no bf16 CPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere
    assert prepare.training_precision("auto", "auto")[0] == "16-mixed"


@pytest.mark.parametrize("optimizer,rule", [("adamw", math.sqrt), ("sgd", lambda r: r)])
def test_learning_rate_follows_the_batch_size_by_the_rule_in_the_yaml(optimizer, rule):
    base = compose_config(f"optimizer={optimizer}")
    for batch in (64, 512, 2048):
        cfg = compose_config(f"optimizer={optimizer}", f"data.batch_size={batch}")
        ratio = batch / base.data.batch_size
        assert cfg.optimizer.lr == pytest.approx(base.optimizer.lr * rule(ratio))
        assert cfg.scheduler.max_lr == cfg.optimizer.lr  # the one-cycle peak follows
    fixed = compose_config(f"optimizer={optimizer}", "data.batch_size=2048", "optimizer.lr=0.02")
    assert fixed.optimizer.lr == 0.02  # a number given by the user is not scaled


def test_an_unknown_scaling_rule_is_refused_by_name():
    with pytest.raises(Exception, match=r"scaling rule 'cube' is unknown; use one of linear, sqrt"):
        compose_config("optimizer.lr='${cifarlab.scaled_lr:0.1,256,${data.batch_size},cube}'").optimizer.lr


def _module(**kwargs) -> CifarModule:
    cfg = compose_config("model/norm=batchnorm", "model/activation=relu")
    torch.manual_seed(0)
    return CifarModule(build.network(cfg.model), build.optimizer(cfg.optimizer), **kwargs).eval()


def test_channels_last_gives_the_same_logits_as_contiguous():
    plain = _module()
    nhwc = _module(channels_last=True)
    nhwc.model.load_state_dict(plain.model.state_dict())
    nhwc.model.to(memory_format=torch.channels_last)
    assert nhwc.model.stage1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(nhwc.eval_logits(x), plain.eval_logits(x), atol=1e-4, rtol=1e-4)


def test_test_flips_give_an_image_and_its_mirror_the_same_logits():
    x = torch.randn(8, 3, 32, 32)
    plain, flips = _module(), _module(test_flips=True)
    with torch.no_grad():
        assert not torch.allclose(plain.eval_logits(x), plain.eval_logits(x.flip(3)))
        assert torch.equal(flips.eval_logits(x), flips.eval_logits(x.flip(3)))
        torch.testing.assert_close(flips.eval_logits(x), (plain.model(x) + plain.model(x.flip(3))) / 2)


@pytest.mark.parametrize("flips", [False, True])
def test_test_shift_adds_copies_moved_up_left_and_down_right_and_averages_their_logits(flips):
    shift = 2
    module = _module(test_flips=flips, test_shift=shift)
    x = torch.randn(4, 3, 32, 32)
    views = module.test_views(x)  # V x (B, C, H, W)
    assert len(views) == (6 if flips else 3)
    assert torch.equal(views[0], x)
    # Inside the reflect padding, each shifted copy is the image moved by `shift` px along both axes.
    assert torch.equal(views[1][..., shift:, shift:], x[..., :-shift, :-shift])  # content moved down-right
    assert torch.equal(views[2][..., :-shift, :-shift], x[..., shift:, shift:])  # content moved up-left
    if flips:
        assert all(torch.equal(views[3 + i], views[i].flip(3)) for i in range(3))
    with torch.no_grad():
        expected = torch.stack([module.model(v) for v in views]).mean(0)
        torch.testing.assert_close(module.eval_logits(x), expected, atol=1e-5, rtol=1e-5)


def test_each_test_time_view_is_a_forward_pass_of_the_batch_alone():
    """Six views of a batch are six passes of B images, not one of 6B: a CPU evaluates a batch whose activations
    outgrow its cache several times slower per image (docs/performance.md)."""
    module = _module(test_flips=True, test_shift=1)
    seen: list[int] = []
    module.model.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    with torch.no_grad():
        module.eval_logits(torch.randn(5, 3, 32, 32))
    assert seen == [5] * 6


def test_a_test_with_flips_also_reports_the_accuracy_without_them():
    """test/acc_no_flips is the same checkpoint on the same images without the mirror: what the flips bought."""
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))  # sees left from right
    module = CifarModule(linear, build.optimizer(compose_config().optimizer), test_flips=True)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        y = module.model(x).argmax(1)  # labels the unflipped model gets all right
        flip_acc = ((module.model(x) + module.model(x.flip(3))).argmax(1) == y).float().mean().item()
    assert flip_acc < 1  # so the two figures differ
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    result = trainer.test(module, dataloaders=batches, verbose=False)[0]
    assert result["test/acc_no_tta"] == 1.0
    assert result["test/acc"] == pytest.approx(flip_acc)
    no_flips = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    plain = CifarModule(linear, build.optimizer(compose_config().optimizer))
    assert "test/acc_no_tta" not in no_flips.test(plain, dataloaders=batches, verbose=False)[0]


def _synthetic_cfg(tmp_path, *overrides: str):
    return prepare.settle(compose_config("data=synthetic", "data.n_train=1200", "data.n_test=256", "data.val_size=200",
                                       "data.batch_size=50", "trainer.max_epochs=1", "trainer.log_every_n_steps=5",
                                       "threads=2", *overrides))


def test_compiled_run_trains_logs_its_graph_and_saves_plain_checkpoints(tmp_path):
    cfg = _synthetic_cfg(tmp_path, "compile=true", "test_flips=true", "trainer.limit_train_batches=6")
    metrics = train.run(cfg, tmp_path)
    graph = EventAccumulator(str(tmp_path)).Reload().Graph()  # traced from the eager module (jit.trace can't compiled)
    assert any(node.op == "aten::_convolution" for node in graph.node)
    assert 0 <= metrics["test_acc_no_tta"] <= 1 and 0 <= metrics["test_acc"] <= 1
    assert metrics["compile"] is True and metrics["channels_last"] is True
    assert metrics["precision"] == prepare.training_precision("auto", "cpu")[0]
    assert metrics["steps"] == 6 and read_metrics(tmp_path)["compile"] is True
    state = torch.load(tmp_path / metrics["best_checkpoint"], weights_only=True)["state_dict"]
    assert "model.stage1.conv.weight" in state and not any("_orig_mod" in k for k in state)


class SyncCounter(L.Callback):
    """Counts the tensor -> Python conversions (each one a host sync on a GPU) made in each training step, keyed by
    the step. The optimizers' own step counters are left out: torch keeps them on the host by design (non-capturable
    Adam/SGD), so reading them is no sync on a GPU either."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.by_step: dict[int, int] = {}
        self.count: int | None = None
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            if self.count is not None and not any(f"{os.sep}torch{os.sep}optim{os.sep}" in frame.filename
                                                  for frame in traceback.extract_stack(limit=8)):
                self.count += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.count, self.step = 0, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.by_step[self.step] = self.count  # counted up to here: the callbacks listed before this one ran

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.count = None


def test_a_training_step_reads_nothing_back_from_the_device_except_on_logging_steps(tmp_path, monkeypatch):
    """Every step of the real pipeline (default callbacks: TensorBoard, inspection, checkpoints, the epoch lines, the
    NaN guard) but the log_every_n_steps-th is free of tensor -> Python conversions, the host syncs that stall a GPU.
    (Syncs inside C++ ops, such as torch.unique, are not seen from Python; on a GPU,
    torch.cuda.set_sync_debug_mode shows those.)"""
    counter = SyncCounter(monkeypatch)
    cfg = _synthetic_cfg(tmp_path, "trainer.log_every_n_steps=10", "trainer.max_epochs=2")
    train.run(cfg, tmp_path, extra_callbacks=[counter])
    every = cfg.trainer.log_every_n_steps
    assert sorted(counter.by_step) == list(range(40))  # 20 steps an epoch
    quiet = {s: n for s, n in counter.by_step.items() if (s + 1) % every}
    logging = {s: n for s, n in counter.by_step.items() if not (s + 1) % every}
    assert len(quiet) == 36 and all(n == 0 for n in quiet.values()), quiet
    assert len(logging) == 4 and all(n > 0 for n in logging.values()), logging  # the counter does see them


def test_inspection_is_never_in_the_per_step_path():
    hooks = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
             "on_before_optimizer_step", "on_before_zero_grad")
    classes = [c for c in vars(inspection).values() if isinstance(c, type) and issubclass(c, L.Callback)
               and c is not L.Callback]
    assert len(classes) >= 3
    for cls in classes:
        for hook in hooks:
            assert getattr(cls, hook) is getattr(L.Callback, hook), f"{cls.__name__}.{hook} runs every step"


class StepRecorder(L.Callback):
    """Every optimizer step's loss and learning rate, from the hooks Lightning calls once per backward pass and once
    per optimizer step."""

    def __init__(self):
        self.loss: dict[int, float] = {}
        self.lr: dict[int, float] = {}

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.loss[trainer.global_step] = float(loss.detach())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lr[trainer.global_step] = optimizer.param_groups[0]["lr"]


def test_loss_and_lr_reach_tensorboard_every_log_every_n_steps_with_that_steps_values(tmp_path):
    """train/loss and train/lr are logged on every log_every_n_steps-th optimizer step (Lightning's rule), each with
    exactly its own loss and the rate that step used."""
    recorder = StepRecorder()
    cfg = _synthetic_cfg(tmp_path, "trainer.max_epochs=2")
    train.run(cfg, tmp_path, extra_callbacks=[recorder])
    acc = EventAccumulator(str(tmp_path)).Reload()
    every, steps = cfg.trainer.log_every_n_steps, len(recorder.loss)
    expected = [s for s in range(steps) if (s + 1) % every == 0]
    assert steps >= 4 * every and len(expected) >= 4
    for tag, values in (("train/loss", recorder.loss), ("train/lr", recorder.lr)):
        logged = acc.Scalars(tag)
        assert [e.step for e in logged] == expected, tag
        assert [e.value for e in logged] == pytest.approx([values[s] for s in expected], rel=1e-6), tag
    assert len(set(recorder.lr.values())) > 1  # the one-cycle rate moves, so the step/value pairing is tested


def test_train_accuracy_is_the_accuracy_of_the_epochs_own_batches(tmp_path):
    """train/acc is scored from the epoch's own batches as they were trained on. With a learning rate of 1e-12 the
    weights stay those of the start, so it must equal the initial model's accuracy on the epoch's augmented batches,
    computed here independently."""
    cfg = _synthetic_cfg(tmp_path, "optimizer.lr=1e-12", "scheduler=none", "callbacks=plain")
    (tmp_path / "again").mkdir()
    again = prepare.prepare(cfg.copy(), tmp_path / "again")  # the same seed: the same initial weights and batches
    initial = {k: v.clone() for k, v in again.model.state_dict().items()}
    train.run(cfg, tmp_path)
    (logged,) = [e.value for e in EventAccumulator(str(tmp_path)).Reload().Scalars("train/acc")]
    again.model.load_state_dict(initial)
    again.model.train()  # as in training (no dropout or BatchNorm in the default model, so mode changes nothing)
    correct = total = 0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=again.precision == "bf16-mixed"):
        for x, y in again.datamodule.train_dataloader():
            correct += int((again.model(x).argmax(1) == y).sum())
            total += len(y)
    assert total == (len(again.datamodule.train_y) // cfg.data.batch_size) * cfg.data.batch_size
    assert logged == pytest.approx(correct / total, abs=1e-6)


class _Endless(torch.utils.data.IterableDataset):
    """(images, labels) batches with no end and no length."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_a_loader_without_a_length_trains_to_max_steps_on_a_schedule_of_max_steps():
    cfg = compose_config()
    module = CifarModule(build.network(cfg.model), build.optimizer(cfg.optimizer), build.scheduler(cfg.scheduler))
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_Endless(), batch_size=None))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert (trainer.global_step, scheduler.total_steps, scheduler.last_epoch) == (5, 5, 5)


@pytest.mark.parametrize("limit,steps", [("5", 5), ("0.5", 10), ("null", 20)])
def test_limit_train_batches_and_max_steps_are_the_trainers_own(tmp_path, limit, steps):
    """trainer.limit_train_batches (a count, or a fraction of the batches) and max_steps are Lightning's; the
    one-cycle schedule spans exactly the steps taken."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    per_epoch = _synthetic_cfg(tmp_path / "a", f"trainer.limit_train_batches={limit}", "callbacks=plain",
                               "trainer.max_epochs=2")
    assert train.run(per_epoch, tmp_path / "a")["steps"] == 2 * steps
    capped = _synthetic_cfg(tmp_path / "b", f"trainer.limit_train_batches={limit}", "callbacks=plain",
                            "trainer.max_epochs=2", "+trainer.max_steps=7")
    recorder = StepRecorder()
    assert train.run(capped, tmp_path / "b", extra_callbacks=[recorder])["steps"] == 7
    assert sorted(recorder.lr) == list(range(7))
    assert recorder.lr[6] < recorder.lr[0]  # the schedule was 7 steps long: the last step is near its floor


# The processes that train or measure: each must import cifarlab first, so that its environment defaults are set before
# torch, numpy and lightning load. The training process is probed for real below; the measuring scripts are checked to
# import cifarlab before any of those (test_measuring_scripts_import_cifarlab_first).
ENTRY_POINTS = ["cifarlab.train"]
MEASURING_SCRIPTS = ["benchmark", "time_to_accuracy", "profile_step"]


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# A fresh process that imports the entry point first, as it does when started, then prints two figures:
# - KiB of transparent huge pages backing a 256 MiB tensor it allocates;
# - CPU ms it uses over five rounds of a numpy dot product of 65,536 values (well under a millisecond of work, as many
#   values as the documented model's Linear(1024, 64) weight; what TensorBoard's add_histogram takes of every weight,
#   its sum of squares) each followed by 0.2 s of sleep: whatever CPU it uses then, a thread spent spinning.
PROBE = r"""
import resource, sys, time
sys.path.insert(0, {scripts!r})
import {module}
import numpy as np
import torch
x = torch.ones(64 * 2**20)  # 256 MiB
huge_kib = [l.split()[1] for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0]
del x
a = np.ones(65536)
a.dot(a)
def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
before = cpu_s()
for _ in range(5):
    a.dot(a)
    time.sleep(0.2)
print(huge_kib, round((cpu_s() - before) * 1000))
"""
# What a user may set to override cifarlab's defaults; the probes start without them.
SETTINGS = ("THP_MEM_ALLOC_ENABLE", "OPENBLAS_NUM_THREADS", "OPENBLAS_DEFAULT_NUM_THREADS", "GOTO_NUM_THREADS",
            "OMP_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT")


def probe(module: str, **env: str) -> dict[str, int]:
    environ = {k: v for k, v in os.environ.items() if k not in SETTINGS} | env
    code = PROBE.format(scripts=str(REPO / "scripts"), module=module)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    huge_kib, cpu_ms = map(int, out.stdout.split()[-2:])
    return {"huge_kib": huge_kib, "idle_cpu_ms": cpu_ms}


@pytest.fixture(scope="module", params=ENTRY_POINTS)
def probes(request) -> dict[str, dict[str, int]]:
    """The probe under cifarlab's defaults, and under a user's own settings of both (two processes per entry point,
    shared by the two tests below)."""
    return {"defaults": probe(request.param),
            "user's": probe(request.param, THP_MEM_ALLOC_ENABLE="0", OPENBLAS_NUM_THREADS="2")}


@pytest.mark.skipif(not THP.exists() or "[madvise]" not in THP.read_text(),
                    reason="the kernel's transparent huge pages are not in madvise mode (never: none to ask for; always: "
                           "every process gets them, asked or not), so whether cifarlab asks cannot be seen")
def test_large_cpu_tensors_get_huge_pages_in_the_training_and_measuring_processes(probes):
    """Without huge pages each large CPU tensor (a batch's activations) faults in 4 KiB at a time, and a bare step ran
    19 % slower (docs/performance.md). cifarlab asks torch for them
    (THP_MEM_ALLOC_ENABLE); torch reads that at its first CPU tensor, which lightning's import already makes, so the
    entry point and each measuring script must import cifarlab before lightning."""
    assert probes["defaults"]["huge_kib"] >= 128 * 1024  # most of the 256 MiB
    assert probes["user's"]["huge_kib"] == 0  # a user's own THP_MEM_ALLOC_ENABLE=0 wins


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: numpy's BLAS runs on one thread anyway")
def test_numpy_blas_leaves_no_thread_spinning_beside_training(probes):
    """numpy's OpenBLAS keeps its worker threads spinning for about 0.1 s after each threaded call; the weight
    histograms' dot products left one spinning into the next epoch, beside torch's own threads, and that epoch's
    augmentation ran more than twice as slow on 2 cores (docs/results/openblas-spin/). cifarlab sets
    OPENBLAS_NUM_THREADS=1, which OpenBLAS reads when numpy loads, so each entry point must import cifarlab before
    numpy (torch imports it)."""
    # With two threads (a user's own setting wins) this numpy spins: about 100 ms of CPU a round alone, less when the
    # other test worker shares the core. A numpy whose BLAS does not spin (not OpenBLAS) would make the check moot.
    spinning = probes["user's"]["idle_cpu_ms"]
    if spinning <= 150:
        pytest.skip(f"numpy's BLAS on 2 threads used {spinning} ms of CPU while idle: it does not spin here")
    assert probes["defaults"]["idle_cpu_ms"] < 20  # cifarlab's default: idle, nothing spins


@pytest.mark.parametrize("script", MEASURING_SCRIPTS)
def test_measuring_scripts_import_cifarlab_first(script):
    """Where the defaults of `import cifarlab` (huge pages, numpy's BLAS on one thread) must precede torch, numpy and
    lightning: the first of the script's top-level imports that loads any of them is `import cifarlab`."""
    import ast

    tree = ast.parse((REPO / "scripts" / f"{script}.py").read_text())
    heavy = ("torch", "numpy", "lightning", "cifarlab")
    first = next(name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                 for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
                 if name.split(".")[0] in heavy)
    assert first == "cifarlab", (script, first)


def test_the_test_rate_times_the_test_pass_not_the_figures_drawn_after_it(tmp_path):
    """time/test_img_per_s stops at the last test batch: a callback drawing figures at the test's end (the
    inspection's: docs/performance.md) is not the model's evaluation speed."""
    import time

    from cifarlab.progress import EpochSummary

    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def test_step(self, batch, batch_idx):
            return self.fc(batch[0])

    class Figures(L.Callback):
        def on_test_epoch_end(self, trainer, pl_module):
            time.sleep(1.0)

    summary = EpochSummary()
    data = torch.utils.data.TensorDataset(torch.randn(200, 4), torch.zeros(200, dtype=torch.long))
    batches = torch.utils.data.DataLoader(data, batch_size=50)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Figures(), summary], default_root_dir=tmp_path)
    trainer.test(Linear(), dataloaders=batches, verbose=False)
    assert summary.test_img_per_s > 200 / 0.5  # 200 images; the sleep alone would hold it under 200 / 1.0
