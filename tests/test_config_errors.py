"""Every refused value gets one line naming the key, the value and what is allowed, before any data is read."""

from __future__ import annotations

import re

import pytest
import torch

from cifarlab import config
from cifarlab.config import ConfigError
from conftest import CONFIG_DIR, compose_config, run_cli


def refusal(*overrides: str) -> str:
    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError) as e:
        config.check_recipe(cfg)
        config.build_model(cfg.model)
        config.build_optimizer(cfg.optimizer)
    return str(e.value)


# (overrides, what the message must say). Each row is a mistake a user makes; the message is all they see.
REFUSED = [
    (["model.pool.kernel_size=40"],
     r"model.pool.kernel_size=40, model.pool.stride=40, .*shrinks a feature map to nothing \(stage1 32x32 -> 0x0\)"),
    (["model.pool.kernel_size=4", "model.pool.stride=4"],
     r"stage1 32x32 -> 8x8; stage2 8x8 -> 2x2; stage3 2x2 -> 0x0"),
    (["model.pool.dilation=8", "model.pool.kernel_size=4"], r"model.pool.dilation=8.*stage1 32x32 -> 2x2; stage2 2x2 -> 0x0"),
    (["model.pool.padding=2"],
     r"model.pool.padding=2: pads 2 px on each side, more than half of model.pool.kernel_size=2 \(2 // 2 = 1\)"),
    (["model/pool=avg", "model.pool.kernel_size=[3,2]", "model.pool.padding=[1,2]"],
     r"model.pool.padding=\[1,2\]: pads 2 px.*model.pool.kernel_size=\[3,2\] \(2 // 2 = 1\)"),
    (["model.pool.kernel_size=abc"], r"model.pool.kernel_size='abc': must be an int >= 1 or a pair"),
    (["model.pool.kernel_size=0"], r"model.pool.kernel_size=0: must be an int >= 1"),
    (["model.pool.stride=0"], r"model.pool.stride=0: must be null \(= kernel_size\), or an int >= 1"),
    (["model.pool.padding=-1"], r"model.pool.padding=-1: must be an int >= 0"),
    (["model.pool.dilation=0"], r"model.pool.dilation=0: must be an int >= 1"),
    (["model/pool=avg", "model.pool.divisor_override=0"], r"model.pool.divisor_override=0: must be null .* or an int >= 1"),
    (["model/pool=lp", "model.pool.norm_type=0"], r"model.pool.norm_type=0: must be a number > 0"),
    (["+model.pool.return_indices=true"], r"model.pool.return_indices=true: the network needs a tensor"),
    (["model/dropout=dropout", "model.dropout.p=1.5"], r"model.dropout.p=1.5: must be a probability in \[0, 1\]"),
    (["model/dropout=dropout2d", "model.dropout.p=-0.1"], r"model.dropout.p=-0.1: must be a probability"),
    (["model/activation=rrelu", "model.activation.lower=0.5", "model.activation.upper=0.2"],
     r"model.activation.lower=0.5 > model.activation.upper=0.2: .*lower must be <= upper"),
    (["model/activation=prelu", "model.activation.num_parameters=32"],
     r"model.activation.num_parameters=32: must be 1 \(one shared slope\) or \"channels\""),
    (["model/norm=groupnorm", "model.norm.num_groups=5"],
     r"model.norm.num_groups=5: must divide every stage's channel count \[32, 32, 64\]"),
    (["model.pool=avg"], r"model.pool='avg': pool is a config group; .*model/pool=<option> \(a slash, not a dot\)"),
    (["model.activation=relu"], r"model.activation='relu': .*model/activation=<option>"),
    (["optimizer.lr=0"], r"optimizer.lr=0: must be a number > 0"),
    (["optimizer.lr=-0.1"], r"optimizer.lr=-0.1: must be a number > 0"),
    (["data.batch_size=0"], r"data.batch_size=0: must be an int >= 1"),
    (["trainer.max_epochs=0"], r"trainer.max_epochs=0: must be an int >= 1"),
    (["data.val_size=0"], r"data.val_size=0: must be a fraction in \(0, 1\) or an image count >= 1"),
    (["data.val_size=1.5"], r"data.val_size=1.5: must be a fraction"),
    (["label_smoothing=1.0"], r"label_smoothing=1.0: must be a number in \[0, 1\)"),
    (["model.pool._target_=os.system"], r"model.pool._target_='os.system': not an allowed target"),
    (["callbacks.epoch_timer._target_=subprocess.call"], r"callbacks.epoch_timer._target_='subprocess.call': not an allowed"),
]


@pytest.mark.parametrize("overrides,message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_refused_with_a_message_naming_key_value_and_rule(overrides, message):
    text = refusal(*overrides)
    assert re.search(message, text), text
    assert "\n" not in text


def test_a_schedule_torch_cannot_build_is_refused_with_what_to_change():
    cfg = compose_config()
    scheduler = config.build_scheduler(cfg.scheduler)
    optimizer = config.build_optimizer(cfg.optimizer)(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ConfigError, match=r"scheduler=OneCycleLR cannot schedule 4 training steps .*pct_start=0.25"):
        scheduler(optimizer, 4)
    assert scheduler(optimizer, 5).total_steps == 5


def test_valid_geometry_is_accepted():
    model = config.build_model(compose_config("model.pool.kernel_size=3", "model.pool.stride=3").model)
    assert model.feature_sizes == [(10, 10), (3, 3), (1, 1)]


def test_every_target_in_configs_is_allowed():
    targets = re.findall(r"^\s*_target_:\s*(\S+)", "\n".join(p.read_text() for p in CONFIG_DIR.rglob("*.yaml")), re.M)
    assert len(targets) > 20
    for target in targets:
        if target != "null":
            config.resolve_target(target, "configs")  # raises ConfigError for anything outside the allowlist


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model/pool=max", "model.pool.kernel_size=4", "model.pool.stride=4"], "stage3 2x2 -> 0x0"),
        (["model.pool=avg"], "(a slash, not a dot)"),
        (["data.root=/no/such/folder", "data.download=false"], "CIFAR-10 not found: looked for /no/such/folder"),
    ],
)
def test_cli_refuses_in_one_line_with_exit_status_2(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = run_cli(*overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()


def test_unknown_option_lists_the_valid_ones(tmp_path):
    result = run_cli("model/pool=median", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "model/pool/median" in result.stderr and "avg" in result.stderr and "lp" in result.stderr
