"""experiment=best: the documented architecture with the best layer choices and recipe, and its ablation options
(configs/ablate/), each of which must take out exactly the ingredient it names."""

from __future__ import annotations

import csv
import subprocess

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cifarlab import build
from cifarlab.model import count_parameters
from conftest import compose_config, option_names, read_metrics, run_cli
from test_sweeps import REPORT, TINY, sweep_params

# What each ablate option may change relative to experiment=best (flattened config keys).
ABLATED = {
    "none": set(),
    "no_norm": {"model.norm."},
    "no_activation": {"model.activation."},
    "relu": {"model.activation."},
    "no_blur": {"model.pool.blur_size"},
    "pool2": {"model.pool.kernel_size", "model.pool.stride", "model.pool.padding"},
    "adamw": {"optimizer.", "scheduler.max_lr"},  # the one-cycle peak follows optimizer.lr
    "no_augment": {"data.augment.flip", "data.augment.crop_padding"},
    "no_smoothing": {"label_smoothing"},
}


def _flat(overrides: list[str]) -> dict:
    cfg = OmegaConf.to_container(compose_config("experiment=best", *overrides), resolve=True)

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(walk(cfg))


def test_best_keeps_the_documented_layer_sizes_and_20_epochs():
    cfg = compose_config("experiment=best")
    documented = build.network(compose_config().model)  # the default model is the tutorial's nn.Sequential
    best = build.network(cfg.model)
    # Every conv and linear layer keeps its shape; the only parameters added are BatchNorm's scales and shifts and
    # PReLU's slopes (one per channel: 32, 32, 64 in the stages, 64 in the head).
    layers = lambda m: {k: v.shape for k, v in m.state_dict().items() if ".conv." in k or k.startswith("fc")}  # noqa: E731
    assert layers(best) == layers(documented) and len(layers(best)) == 10
    added = {n: p.numel() for n, p in best.named_parameters() if ".norm." in n or "act." in n}
    assert sum(added.values()) == 2 * sum(cfg.model.channels) + sum(cfg.model.channels) + cfg.model.hidden
    assert count_parameters(best) == count_parameters(documented) + sum(added.values())
    assert best(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert cfg.trainer.max_epochs <= 20 and cfg.test_flips is True and cfg.test_shift == 1


def test_every_ablate_option_is_listed_here():
    assert sorted(ABLATED) == option_names("ablate")


@pytest.mark.parametrize("option", sorted(ABLATED))
def test_an_ablate_option_changes_only_its_own_ingredient(option):
    best, ablated = _flat([]), _flat([f"ablate={option}"])
    changed = {k for k in best.keys() | ablated.keys() if best.get(k) != ablated.get(k)}
    allowed = ABLATED[option]
    assert all(any(k == a or (a.endswith(".") and k.startswith(a)) for a in allowed) for k in changed), changed
    assert bool(changed) == bool(allowed)  # ablate=none is the recipe itself; every other option changes something


def test_ablate_no_blur_is_the_recipe_with_plain_overlapping_max_pooling():
    """blur_size 1 computes exactly MaxPool2d(3, 2, 1): the recipe before the blur, the row the blur is measured by."""
    torch.manual_seed(0)
    models = {name: build.network(compose_config("experiment=best", *extra).model).eval() for name, extra in {
        "best": [], "no_blur": ["ablate=no_blur"],
        "max": ["model/pool=max", "model.pool.kernel_size=3", "model.pool.stride=2", "model.pool.padding=1"]}.items()}
    assert type(models["max"].stage1.pool) is nn.MaxPool2d
    for model in models.values():
        model.load_state_dict(models["best"].state_dict())  # one set of weights: the pooling has none
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(models["no_blur"](x), models["max"](x))
    assert not torch.allclose(models["best"](x), models["max"](x), atol=1e-3)


def test_ablate_adamw_uses_adamws_own_learning_rate_not_the_recipes_sgd_rate():
    best, adamw = compose_config("experiment=best"), compose_config("experiment=best", "ablate=adamw")
    assert best.optimizer.lr == pytest.approx(0.15) and best.optimizer._target_ == "torch.optim.SGD"
    assert adamw.optimizer._target_ == "torch.optim.AdamW"
    assert adamw.optimizer.lr == pytest.approx(compose_config("optimizer=adamw", "data.batch_size=128").optimizer.lr)
    assert adamw.optimizer.lr == pytest.approx(0.003 * (128 / 256) ** 0.5)


@pytest.mark.slow  # a sweep through the real command line
def test_the_ablation_sweep_covers_every_option_and_compares_each_row_with_the_recipe(tmp_path):
    """sweep=best_ablation runs every configs/ablate/ option; the report's baseline is ablate=none, not the
    documented model (which an ablation of experiment=best does not contain)."""
    assert sorted(sweep_params("best_ablation")["ablate"].split(",")) == option_names("ablate")
    sweep = tmp_path / "ablation"
    result = run_cli("-m", "sweep=best_ablation", "ablate=none,no_smoothing", "seed=0", *TINY,
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["000_none_s0", "001_no_smoothing_s0"]
    metrics = {name: read_metrics(sweep / f"{i:03d}_{name}_s0") for i, name in enumerate(("none", "no_smoothing"))}
    acc = {name: m["test_acc"] for name, m in metrics.items()}
    report = subprocess.run([str(REPORT), str(sweep)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    rows = {r["configuration"]: r for r in csv.DictReader(open(sweep / "report.csv"))}
    assert set(rows) == {"ablate=none", "ablate=no_smoothing"}
    assert rows["ablate=none"]["verdict"] == "baseline"
    delta = 100 * (acc["no_smoothing"] - acc["none"])  # percent points
    assert float(rows["ablate=no_smoothing"]["delta"]) == pytest.approx(delta, abs=1e-4)
    # The recipe tests on several views of each image; the report also gives the same checkpoints on the image alone.
    no_tta = 100 * metrics["none"]["test_acc_no_tta"]
    assert float(rows["ablate=none"]["test_acc_no_tta_mean"]) == pytest.approx(no_tta, abs=1e-4)
    text = (sweep / "report.md").read_text()
    assert "| ablate=none (the recipe itself) |" in text and "| without test-time views |" in text
    assert "test accuracy is that of each job's last checkpoint (test_checkpoint=last" in text  # the recipe's
    # One seed: the mean alone, and an empty spread in the CSV, never a "± 0.00" that reads as measured.
    assert "± 0.00" not in text and f"| {100 * acc['none']:.2f} |" in text
    assert rows["ablate=none"]["test_acc_std"] == ""
