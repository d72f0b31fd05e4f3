"""The speed settings: precision, channels_last, torch.compile, test-time flips, the learning-rate rule for the batch
size, and a training step that never waits for the device (no host syncs outside logging steps)."""

from __future__ import annotations

import math
import os
import traceback

import lightning as L
import pytest
import torch

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarlab import config, inspection, train
from cifarlab.module import CifarModule
from conftest import compose_config, read_metrics


def test_precision_auto_is_fp32_on_a_cpu_and_bf16_mixed_on_a_gpu_that_has_bf16(monkeypatch):
    assert compose_config().trainer.precision == "auto"
    assert train.training_precision("auto", "cpu") == "32-true"
    assert train.training_precision("16-mixed", "auto") == "16-mixed"  # an explicit choice is kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert train.training_precision("auto", "auto") == "bf16-mixed"
    assert train.training_precision("auto", "gpu") == "bf16-mixed"
    assert train.training_precision("auto", "cpu") == "32-true"  # accelerator=cpu on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere
    assert train.training_precision("auto", "auto") == "16-mixed"


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
    return CifarModule(config.build_model(cfg.model), config.build_optimizer(cfg.optimizer), **kwargs).eval()


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
    views = module.test_views(x).unflatten(0, (-1, 4))  # (V, B, C, H, W)
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


def test_a_test_with_flips_also_reports_the_accuracy_without_them():
    """test/acc_no_flips is the same checkpoint on the same images without the mirror: what the flips bought."""
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))  # sees left from right
    module = CifarModule(linear, config.build_optimizer(compose_config().optimizer), test_flips=True)
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
    plain = CifarModule(linear, config.build_optimizer(compose_config().optimizer))
    assert "test/acc_no_tta" not in no_flips.test(plain, dataloaders=batches, verbose=False)[0]


def _synthetic_cfg(tmp_path, *overrides: str):
    return train.settle(compose_config("data=synthetic", "data.n_train=1200", "data.n_test=256", "data.val_size=200",
                                       "data.batch_size=50", "trainer.max_epochs=1", "trainer.log_every_n_steps=5",
                                       "threads=2", *overrides))


def test_compiled_run_trains_logs_its_graph_and_saves_plain_checkpoints(tmp_path):
    cfg = _synthetic_cfg(tmp_path, "compile=true", "test_flips=true", "trainer.limit_train_batches=6")
    metrics = train.train(cfg, tmp_path)
    graph = EventAccumulator(str(tmp_path)).Reload().Graph()  # traced from the eager module (jit.trace can't compiled)
    assert any(node.op == "aten::_convolution" for node in graph.node)
    assert 0 <= metrics["test_acc_no_tta"] <= 1 and 0 <= metrics["test_acc"] <= 1
    assert metrics["compile"] is True and metrics["channels_last"] is True and metrics["precision"] == "32-true"
    assert metrics["steps"] == 6 and read_metrics(tmp_path)["compile"] is True
    state = torch.load(tmp_path / metrics["best_checkpoint"], weights_only=True)["state_dict"]
    assert "model.stage1.conv.weight" in state and not any("_orig_mod" in k for k in state)


class SyncCounter(L.Callback):
    """Counts the tensor -> Python conversions (each one a host sync on a GPU) made during each training step.

    The optimizers' own step counters are left out: torch keeps them on the host by design (non-capturable Adam/SGD),
    so reading them is no sync on a GPU either.
    """

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.by_step: dict[int, int] = {}
        self.step: int | None = None
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            if self.step is not None and not any(f"{os.sep}torch{os.sep}optim{os.sep}" in frame.filename
                                                 for frame in traceback.extract_stack(limit=8)):
                self.by_step[self.step] = self.by_step.get(self.step, 0) + 1
            return original(tensor, *args, **kwargs)

        return wrapper

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step
        self.by_step.setdefault(self.step, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step = None


def test_a_training_step_reads_nothing_back_from_the_device_except_on_logging_steps(tmp_path, monkeypatch):
    """Every step of the real pipeline (default callbacks: TensorBoard, inspection, checkpoints, the NaN guard)
    between log_every_n_steps is free of tensor -> Python conversions, the host syncs that stall a GPU. (Syncs inside
    C++ ops, such as torch.unique, are not seen from Python; on a GPU, torch.cuda.set_sync_debug_mode shows those.)"""
    counter = SyncCounter(monkeypatch)
    cfg = _synthetic_cfg(tmp_path)
    train.train(cfg, tmp_path, extra_callbacks=[counter])
    every = cfg.trainer.log_every_n_steps
    quiet = {step: n for step, n in counter.by_step.items() if (step + 1) % every}
    logging = {step: n for step, n in counter.by_step.items() if not (step + 1) % every}
    assert len(quiet) >= 15 and all(n == 0 for n in quiet.values()), quiet
    assert logging and all(n > 0 for n in logging.values()), logging  # the counter does see the logging steps


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
    """Every optimizer step's loss (as Lightning hands it on, for the step's last batch) and learning rate."""

    def __init__(self, accumulate: int = 1):
        self.accumulate = accumulate  # batches per optimizer step
        self.loss: dict[int, float] = {}
        self.lr: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.accumulate == 0:  # the batch that stepped the optimizer
            self.loss[trainer.global_step - 1] = float(outputs["loss"])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_loss_and_lr_reach_tensorboard_every_log_every_n_steps_with_that_steps_values(tmp_path, accumulate):
    """train/loss and train/lr are logged only on the steps Lightning writes (self.log costs more host time than a
    GPU step): every log_every_n_steps-th step gets exactly its own loss and rate, and no other step is written. With
    gradient accumulation the loss is the batch's own, not Lightning's outputs["loss"] (divided by the batches)."""
    recorder = StepRecorder(accumulate)
    epochs = 2 * accumulate  # the same number of optimizer steps either way
    cfg = _synthetic_cfg(tmp_path, f"trainer.max_epochs={epochs}", f"+trainer.accumulate_grad_batches={accumulate}")
    train.train(cfg, tmp_path, extra_callbacks=[recorder])
    acc = EventAccumulator(str(tmp_path)).Reload()
    every, steps = cfg.trainer.log_every_n_steps, len(recorder.loss)
    expected = [s for s in range(steps) if (s + 1) % every == 0]
    assert steps >= 4 * every and len(expected) >= 4
    losses = {s: loss * accumulate for s, loss in recorder.loss.items()}  # the optimizer step's last batch
    for tag, values in (("train/loss", losses), ("train/lr", recorder.lr)):
        logged = acc.Scalars(tag)
        assert [e.step for e in logged] == expected, tag
        assert [e.value for e in logged] == pytest.approx([values[s] for s in expected], rel=1e-6), tag
    assert len(set(recorder.lr.values())) > 1  # the one-cycle rate moves, so the step/value pairing is tested


def test_train_accuracy_is_the_accuracy_of_the_epochs_own_batches(tmp_path):
    """train/acc is scored from predictions kept on the device during the epoch (one update at its end). With a
    learning rate of 1e-12 the weights stay those of the start, so it must equal the initial model's accuracy on the
    epoch's augmented batches, computed here independently."""
    cfg = _synthetic_cfg(tmp_path, "optimizer.lr=1e-12", "scheduler=none", "callbacks=plain")
    torch.manual_seed(0)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    initial = config.build_model(cfg.model).to(memory_format=torch.channels_last)
    train.train(cfg, tmp_path)
    (logged,) = [e.value for e in EventAccumulator(str(tmp_path)).Reload().Scalars("train/acc")]
    dm = train.make_datamodule(cfg, train.load_data(cfg.data, cfg.data.split_seed))
    initial.train()  # as in training (no dropout or BatchNorm in the default model, so mode changes nothing)
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.train_dataloader():
            correct += int((initial(x).argmax(1) == y).sum())
            total += len(y)
    assert total == (len(dm.train_y) // cfg.data.batch_size) * cfg.data.batch_size
    assert logged == pytest.approx(correct / total, abs=1e-6)
