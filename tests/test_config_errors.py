"""Every refused value gets one line naming the key, the value and what is allowed, before a run folder is made."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from cifarlab import build, checkpoint, resume, run_folder
from cifarlab.errors import CheckpointError, ConfigError, RunFolderError
from cifarlab.prepare import prepare
from conftest import CONFIG_DIR, REPO, compose_config, run_cli

TINY_DATA = ["data=synthetic", "data.n_train=300", "data.n_test=50", "data.val_size=50", "data.batch_size=50"]


def refusal(*overrides: str, tmp_path=None) -> str:
    """What prepare() refuses the config with (prepare: everything the run builds, before its folder exists)."""
    cfg = compose_config(*TINY_DATA, *overrides)
    with pytest.raises(ConfigError) as e:
        prepare(cfg, tmp_path or REPO / "outputs" / "never-made")
    return str(e.value)


# (overrides, what the message must say). Each row is a mistake a user makes; the message is all they see.
REFUSED = [
    (["model.pool.kernel_size=40"],
     r"^model.pool.kernel_size=40, model.pool.stride=40, .*: pooling shrinks a feature map to nothing \(stage1 32x32 -> "
     r"0x0\); use a smaller kernel_size/stride/dilation, or ceil_mode=true$"),
    (["model.pool.kernel_size=4", "model.pool.stride=4"], r"stage1 32x32 -> 8x8; stage2 8x8 -> 2x2; stage3 2x2 -> 0x0"),
    (["model.pool.dilation=8", "model.pool.kernel_size=4"], r"model.pool.dilation=8.*stage1 32x32 -> 2x2; stage2 2x2 -> 0x0"),
    # torch's own check, found by the one forward pass that validates the network
    (["model.pool.padding=2"], r"^model.pool \(MaxPool2d\) cannot take stage1's 32x32x32 input: pad should be at most "
                               r"half of effective kernel size, but got pad=2, kernel_size=2"),
    (["model/pool=blurmax", "model.pool.blur_size=0"], r"^model.pool.blur_size=0: must be an int in \[1, 7\]$"),
    (["model/pool=blurmax", "model.pool.blur_size=2.5"], r"model.pool.blur_size=2.5: must be an int in \[1, 7\]"),
    (["model/pool=blurmax", "model.pool.padding=2"], r"^model.pool \(BlurMaxPool2d\) cannot take stage1's .*: pad "),
    (["model/pool=blurmax", "model.pool.kernel_size=6", "model.pool.stride=6", "model.pool.padding=0"],
     r"^model.pool.kernel_size=6, model.pool.stride=6, model.pool.padding=0: pooling shrinks a feature map to "
     r"nothing \(stage1 32x32 -> 5x5; stage2 5x5 -> 0x0\); use a smaller kernel_size/stride$"),
    (["model/pool=blurmax", "+model.pool.dilation=2"],
     r"^model.pool.dilation=2: cifarlab.model.BlurMaxPool2d has no dilation \(it takes kernel_size, stride, padding, "
     r"blur_size\); remove it with ~model.pool.dilation"),
    # the experiment's padding stays when the pool class changes; LPPool2d has none
    (["experiment=best", "model/pool=lp"],
     r"^model.pool.padding=1: torch.nn.LPPool2d has no padding \(it takes norm_type, kernel_size, stride, "
     r"ceil_mode\); remove it with ~model.pool.padding \(values an experiment sets under model.pool stay when "
     r"model/pool=<option> swaps the class\)$"),
    (["model/activation=leaky_relu", "+model.activation.slope=0.2"],
     r"^model.activation.slope=0.2: torch.nn.LeakyReLU has no slope \(it takes negative_slope, inplace\)"),
    (["model/pool=lp", "~model.pool.norm_type"],
     r"^model.pool: torch.nn.LPPool2d needs norm_type; set it with \+model.pool.norm_type=<value>$"),
    (["model/pool=avg", "model.pool.kernel_size=[3,2]", "model.pool.padding=[1,2]"],
     r"^model.pool \(AvgPool2d\) cannot take stage1's 32x32x32 input: pad should be at most half"),
    (["model.pool.kernel_size=abc"], r"model.pool.kernel_size='abc': must be an int >= 1, or a pair \[h, w\] of them"),
    (["model.pool.kernel_size=0"], r"model.pool.kernel_size=0: must be an int >= 1"),
    (["model.pool.stride=0"], r"model.pool.stride=0: must be null or an int >= 1"),
    (["model.pool.padding=-1"], r"model.pool.padding=-1: must be an int >= 0"),
    (["model.pool.dilation=0"], r"model.pool.dilation=0: must be an int >= 1"),
    (["model/pool=avg", "model.pool.divisor_override=0"], r"model.pool.divisor_override=0: must be null or an int >= 1"),
    (["model/pool=lp", "model.pool.norm_type=0"], r"model.pool.norm_type=0: must be a number > 0"),
    (["+model.pool.return_indices=true"], r"model.pool.return_indices=true: must be false: the network needs a tensor"),
    (["model/dropout=dropout", "model.dropout.p=1.5"], r"model.dropout.p=1.5: must be a number in \[0, 1\]"),
    (["model/dropout=dropout2d", "model.dropout.p=-0.1"], r"model.dropout.p=-0.1: must be a number in \[0, 1\]"),
    (["model/activation=rrelu", "model.activation.lower=0.5", "model.activation.upper=0.2"],
     r"model.activation.lower=0.5 > model.activation.upper=0.2: .*lower must be <= upper"),
    (["model/activation=prelu", "model.activation.num_parameters=32"],
     r"model.activation.num_parameters=32: must be 1 or 'channels'"),
    (["model/norm=groupnorm", "model.norm.num_groups=5"],
     r"^model.norm \(cifarlab.model.GroupNorm\) with 32 channels: num_channels \(32\) must be divisible by num_groups \(5\)$"),
    (["model.pool=avg"], r"model.pool='avg': pool is a config group; .*model/pool=<option> \(a slash, not a dot\)"),
    (["model.activation=relu"], r"model.activation='relu': .*model/activation=<option>"),
    # every numeric key of the model and the data has a range (schema.RANGES)
    (["model.hidden=0"], r"^model.hidden=0: must be an int >= 1$"),
    (["model.conv_kernel=0"], r"^model.conv_kernel=0: must be an int >= 1$"),
    (["model.conv_padding=-1"], r"^model.conv_padding=-1: must be an int >= 0$"),
    (["model.conv_kernel=33", "model.conv_padding=0"],
     r"^model.conv_kernel=33, model.conv_padding=0: stage1's conv shrinks 32x32 to nothing"),
    (["model.channels=[32,0,64]"], r"^model.channels=\[32,0,64\]: must be a list of channel counts, each an int >= 1$"),
    (["seed=-1"], r"^seed=-1: must be an int in \[0, 4294967295\]$"),
    (["threads=0"], r"^threads=0: must be null or an int >= 1$"),
    (["optimizer.lr=0"], r"optimizer.lr=0: must be a number > 0"),
    (["optimizer.lr=-0.1"], r"optimizer.lr=-0.1: must be a number > 0"),
    (["optimizer.betas=[0.9,1.5]"], r"optimizer.betas=\[0.9,1.5\]: must be a pair of numbers in \[0, 1\)"),
    (["data.batch_size=0"], r"data.batch_size=0: must be an int >= 1"),
    (["data.eval_batch_size=0"], r"data.eval_batch_size=0: must be an int >= 1"),
    (["data.noise=-1"], r"data.noise=-1.0: must be null or a number >= 0"),
    (["data.n_train=1"], r"data.n_train=1: must be null or an int >= 2"),
    (["data.split_seed=-3"], r"data.split_seed=-3: must be an int >= 0"),
    (["trainer.max_epochs=0"], r"trainer.max_epochs=0: must be an int >= 1"),
    (["data.val_size=0"], r"data.val_size=0: must be a number in \(0, 1\), or an int >= 1"),
    (["data.val_size=1.5"], r"data.val_size=1.5: must be a number in \(0, 1\)"),
    (["data.val_size=300"], r"data.val_size=300 leaves 300 validation and 0 training images of 300; use a fraction"),
    (["data.augment.flip=yes"], r"data.augment.flip='yes': must be true or false or 'alternate'"),
    (["data.augment.crop_padding=17"], r"data.augment.crop_padding=17: must be an int in \[0, 16\]"),
    (["data.name=imagenet"], r"data.name='imagenet': must be 'cifar10' or 'synthetic'"),
    (["label_smoothing=1.0"], r"label_smoothing=1.0: must be a number in \[0, 1\)"),
    (["trainer.precision=fp8"], r"trainer.precision='fp8': must be 'auto' or '32-true' or 'bf16-mixed'"),
    (["test_shift=-1"], r"test_shift=-1: must be an int in \[0, 8\]"),
    (["test_shift=12"], r"test_shift=12: must be an int in \[0, 8\]"),
    (["test_checkpoint=median"], r"test_checkpoint='median': must be 'best' or 'last'"),
    (["+trainer.accumulate_grad_batches=0"], r"trainer.accumulate_grad_batches=0: must be an int >= 1"),
    (["trainer.gradient_clip_val=-1"], r"trainer.gradient_clip_val=-1: must be null or a number >= 0"),
    (["+trainer.gradient_clip_algorithm=max"], r"trainer.gradient_clip_algorithm='max': must be null or 'norm' or"),
    (["trainer.limit_train_batches=1.5"], r"trainer.limit_train_batches=1.5: must be null or an int >= 1, or a number"),
    (["trainer.limit_train_batches=0"], r"trainer.limit_train_batches=0: must be null or an int >= 1"),
    (["callbacks.pooling_images.every_n_epochs=0"], r"callbacks.pooling_images.every_n_epochs=0: must be an int >= 1"),
    (["callbacks.test_figures.misclassified=-2"], r"callbacks.test_figures.misclassified=-2: must be an int >= 0"),
    # what torch, Lightning or a callback finds in its own arguments, when they are built: named by the config key
    (["optimizer.weight_decay=0.1", "+optimizer.eps=-1.0"], r"^optimizer \(torch.optim.AdamW\): Invalid epsilon"),
    (["trainer.accelerator=gpu"], r"^trainer \(lightning.pytorch.Trainer\): MisconfigurationException: No supported gpu"),
    (["+trainer.no_such_argument=1"], r"^trainer \(lightning.pytorch.Trainer\): TypeError: .*no_such_argument"),
    (["callbacks.model_checkpoint.mode=most"], r"^callbacks.model_checkpoint \(lightning.pytorch.callbacks."
                                                r"ModelCheckpoint\): MisconfigurationException: `mode` can be"),
    # a schedule torch cannot build for this run's length (4 steps: a warm-up of one, which OneCycleLR divides by)
    (["trainer.max_epochs=1", "trainer.limit_train_batches=4"],
     r"^scheduler=OneCycleLR cannot schedule 4 training steps \(a warm-up of one step, which torch divides by; "
     r"scheduler.pct_start=0.25\); change scheduler.pct_start"),
    (["model.pool._target_=os.system"], r"model.pool._target_='os.system': not an allowed target"),
    (["callbacks.progress_bar._target_=subprocess.call"], r"callbacks.progress_bar._target_='subprocess.call': not an"),
    # a nested _target_ is instantiated (called) by Hydra too, before any check of the object it builds
    (["+callbacks.x._target_=lightning.pytorch.callbacks.LambdaCallback", "+callbacks.x.on_fit_start._target_="
      "os.makedirs", "+callbacks.x.on_fit_start.name=pwned"],
     r"callbacks.x.on_fit_start._target_='os.makedirs': not an allowed target \(allowed: torch.nn.\*, "),
    (["+trainer.plugins._target_=subprocess.call"], r"trainer.plugins._target_='subprocess.call': not an allowed"),
    (["+callbacks.x._target_=lightning.pytorch.callbacks.LambdaCallback",
      "+callbacks.x.on_fit_start='${oc.create:{_target_:builtins.print,_args_:[pwned]}}'"],
     r"callbacks.x.on_fit_start._target_='builtins.print': not an allowed target"),
    (["+callbacks.x._target_=lightning.pytorch.callbacks.LambdaCallback", "+callbacks.x.on_fit_start='${nowhere}'"],
     r"callbacks.x.on_fit_start: Interpolation key 'nowhere' not found"),
    # an interpolation that does not resolve is refused before any value is read, wherever it is
    (["model.pool.kernel_size=${nowhere}"], r"^model.pool.kernel_size: Interpolation key 'nowhere' not found"),
    (["optimizer.weight_decay=${oc.env:CIFARLAB_NO_SUCH_VARIABLE}"],
     r"^optimizer.weight_decay: Environment variable 'CIFARLAB_NO_SUCH_VARIABLE' not found$"),
    (["optimizer.lr='${cifarlab.scaled_lr:0.1,256,${data.batch_size},cube}'"],
     r"^optimizer.lr: scaling rule 'cube' is unknown; use one of linear, sqrt$"),
]


@pytest.mark.parametrize("overrides,message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_refused_with_a_message_naming_key_value_and_rule(overrides, message):
    text = refusal(*overrides)
    assert re.search(message, text), text
    assert "\n" not in text


def test_valid_geometry_is_accepted():
    model = build.network(compose_config("model.pool.kernel_size=3", "model.pool.stride=3").model)
    assert model.feature_sizes == [(10, 10), (3, 3), (1, 1)]


def test_the_fix_the_message_names_works():
    """The refusal of experiment=best model/pool=lp says to remove the padding; doing so builds LPPool2d(3, 2)."""
    model = build.network(compose_config("experiment=best", "model/pool=lp", "~model.pool.padding").model)
    pool = model.stage1.pool
    assert isinstance(pool, torch.nn.LPPool2d) and (pool.kernel_size, pool.stride, pool.norm_type) == (3, 2, 2)
    assert model.feature_sizes == [(15, 15), (7, 7), (3, 3)]  # no padding: (32 - 3) // 2 + 1 = 15


def test_every_target_in_configs_is_allowed():
    def targets(files) -> list[str]:
        return re.findall(r"^\s*_target_:\s*(\S+)", "\n".join(p.read_text() for p in files), re.M)

    hydras = list((CONFIG_DIR / "hydra").rglob("*.yaml"))  # Hydra's own plugins: the search's sweeper, its parts
    task = targets(p for p in CONFIG_DIR.rglob("*.yaml") if p not in hydras)
    assert len(task) > 20
    for target in task:
        if target != "null":
            build.resolve_target(target, "configs")  # raises ConfigError for anything outside the allowlist
    plugins = targets(hydras)
    assert len(plugins) >= 7
    assert all(t.startswith(("hydra_plugins.cifarlab_search.", "optuna.pruners.", "optuna.samplers.")) for t in plugins)


# Mistakes found while composing (the schema's types), in a value (ranges, the layers built once), in the data, or by
# Lightning in its own arguments: all refused in one line, exit status 2, before Hydra makes the run folder.
CLI_REFUSED = [
    (["sweep=pool", "seeds=auto"], "sweep=pool seeds=auto: chooses how -m sweeps, and this is a single run; run it "
                                   "as a sweep: cifarlab-train -m sweep=pool seeds=auto ..."),
    (["seed=abc"], "seed=abc: Value 'abc' of type 'str' could not be converted to Integer (the schema types seed)"),
    (["model.hidden=abc"], "model.hidden=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["data.batch_size=1.5"], "data.batch_size=1.5: Value '1.5' of type 'float' could not be converted to Integer"),
    (["channels_last=maybe"], "channels_last=maybe: Value 'maybe' is not a valid bool"),
    (["label_smoothing=lots"], "label_smoothing=lots: Value 'lots' of type 'str' could not be converted to Float"),
    (["model.hidden=0"], "model.hidden=0: must be an int >= 1"),
    (["model/pool=max", "model.pool.kernel_size=4", "model.pool.stride=4"], "stage3 2x2 -> 0x0"),
    (["model.pool=avg"], "(a slash, not a dot)"),
    (["data.name=imagenet"], "data.name='imagenet': must be 'cifar10' or 'synthetic'"),
    (["callbacks.progress_bar._target_=os.system"], "callbacks.progress_bar._target_='os.system': not an"),
    (["data=synthetic", "trainer.accelerator=gpu"],
     "trainer (lightning.pytorch.Trainer): MisconfigurationException: No supported gpu"),
    (["data.root=/no/such/folder", "data.download=false"], "CIFAR-10 not found: looked for /no/such/folder"),
    # found once the data is read, still before the run folder
    (["data=synthetic", "data.n_train=300", "data.val_size=300"],
     "data.val_size=300 leaves 300 validation and 0 training images of 300; use a fraction in (0, 1) or a smaller"),
]


@pytest.mark.slow  # the real command line, as a subprocess
@pytest.mark.parametrize("overrides,message", CLI_REFUSED, ids=[" ".join(o) for o, _ in CLI_REFUSED])
def test_cli_refuses_in_one_line_with_exit_status_2_and_makes_no_folder(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = run_cli(*overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not run_dir.exists()  # refused before Hydra makes the run folder


def test_a_folder_without_config_yaml_says_how_to_start_it_again(tmp_path):
    """A run killed between Hydra making its folder and writing config.yaml left nothing to continue."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- data=synthetic\n- trainer.max_epochs=2\n")
    with pytest.raises(RunFolderError) as e:
        resume.resume_folder(str(run_dir), [])
    assert str(e.value) == (f"resume={run_dir}: that run stopped before it had read its data (no config.yaml), so "
                            f"there is nothing to continue; start it again: cifarlab-train data=synthetic "
                            f"trainer.max_epochs=2 hydra.run.dir={run_dir}")


@pytest.mark.slow  # the real command line, as a subprocess
def test_cli_refuses_a_data_folder_missing_files_before_making_a_run_folder(tmp_path):
    from cifarlab.data import cifar10

    folder = tmp_path / "cifar" / cifar10.FOLDER
    folder.mkdir(parents=True)
    for name in cifar10.FILES:
        if name not in ("data_batch_4", "test_batch"):
            (folder / name).write_bytes(b"")  # only their names are looked at before the run
    run_dir = tmp_path / "run"
    for root in ("cifar", f"cifar/{cifar10.FOLDER}"):  # relative to where the command runs; or the batches folder
        result = run_cli(f"data.root={root}", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: {folder}/data_batch_4: file missing (and test_batch); the folder must hold batches.meta, "
            "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch")
        assert not run_dir.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(set(cifar10.FILES) - {"data_batch_4", "test_batch"})


@pytest.mark.slow  # the real command line, as a subprocess
@pytest.mark.parametrize("override,message", [
    ("model/pool=median", "error: model/pool=median: no such option (no configs/model/pool/median.yaml); choose one "
                          "of: avg, blurmax, lp, max"),
    ("model.pool.kernel_sizee=3", "error: model.pool.kernel_sizee=3: no such key; did you mean "
                                  "model.pool.kernel_size? model.pool has: _target_, kernel_size, stride, padding"),
    ("trainer.max_epochz=3", "error: trainer.max_epochz=3: no such key; did you mean trainer.max_epochs?"),
    ("model.pool.kernel_size=[3", "error: cannot parse the overrides model.pool.kernel_size=[3: no viable alternative"),
])
def test_unknown_options_and_keys_are_refused_in_one_line_with_the_choices(tmp_path, override, message):
    result = run_cli(override, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a run folder


# What cifarlab-train answers before a run starts, the exit status of each, and the heavy modules it loads for it:
# torch, torchvision, torchmetrics and Lightning took 9.5 s to import on the 2-core test machine, torch alone 2.3 s
# (docs/results/cli-answers/). A mistake in the overrides or in resume= needs none of them; a mistake in a value
# needs torch (its checks build the layers), not Lightning, nor does a data folder without CIFAR-10 (torchvision
# names the files it must hold).
ANSWERED_BEFORE_A_RUN = [(["--help"], 0, "none"), (["--cfg", "job", "model/pool=avg"], 0, "none"),
                         (["model/pool=median"], 2, "none"), (["model.pool.kernel_sizee=3"], 2, "none"),
                         (["model.pool.kernel_size=[3"], 2, "none"), (["resume=no/such/run"], 2, "none"),
                         (["resume=run", "trainer.max_epochs=20"], 2, "none"),
                         (["seed=abc"], 2, "none"), (["data.batch_size=1.5"], 2, "none"),
                         (["model.pool.kernel_size=40"], 2, "torch"), (["data.name=imagenet"], 2, "torch"),
                         (["data.root=no/such/folder", "data.download=false"], 2, "torch,torchvision"),
                         (["experiment=best", "model/pool=lp"], 2, "torch"), (["optimizer.lr=0"], 2, "torch")]
ANSWER_IN_THIS_PROCESS = r"""
import sys
from cifarlab import cli
sys.argv = ["cifarlab-train", *sys.argv[1:]]
try:
    cli.cli()
    status = 0
except SystemExit as e:
    status = e.code or 0
heavy = sorted(m for m in ("torch", "torchvision", "torchmetrics", "lightning") if m in sys.modules)
print(f"status={status} heavy={','.join(heavy) or 'none'}", file=sys.stderr)
"""


@pytest.mark.slow  # the real command line, as a subprocess
def test_help_cfg_and_refused_overrides_load_no_lightning_and_make_no_run_folder(tmp_path):
    for args, status, heavy in ANSWERED_BEFORE_A_RUN:
        result = subprocess.run([sys.executable, "-c", ANSWER_IN_THIS_PROCESS, *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.stderr.strip().splitlines()[-1] == f"status={status} heavy={heavy}", (args, result.stderr)
        assert (result.stdout if status == 0 else result.stderr).strip(), args  # it did answer
    assert not (tmp_path / "outputs").exists()  # nor made a run folder


# Hydra's config loader, counted: each composition of a config (a run's, a sweep's, each sweep job's) is one call.
# Not counted: Hydra's own probes, which compose and throw the result away: hydra.main's for hydra.mode
# (Hydra.get_mode) and the sweeper's check of each batch of jobs (Sweeper.validate_batch_is_legal).
COUNT_COMPOSES = r"""
import sys
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.hydra import Hydra
from hydra.plugins.sweeper import Sweeper
from cifarlab import cli
composes, probing, load = [], [], ConfigLoaderImpl.load_configuration
def counted(self, *args, **kwargs):
    composes.extend([] if probing else [1])
    return load(self, *args, **kwargs)
def probe(method):
    def probing_call(self, *args, **kwargs):
        probing.append(1)
        try:
            return method(self, *args, **kwargs)
        finally:
            probing.pop()
    return probing_call
ConfigLoaderImpl.load_configuration = counted
Hydra.get_mode, Sweeper.validate_batch_is_legal = probe(Hydra.get_mode), probe(Sweeper.validate_batch_is_legal)
sys.argv = ["cifarlab-train", *sys.argv[1:]]
try:
    cli.cli()
finally:
    print(f"composes={len(composes)}", file=sys.stderr)
"""
ONE_EPOCH = [*TINY_DATA, "trainer.max_epochs=1", "callbacks=plain"]


@pytest.mark.slow  # each trains a tiny run end to end
@pytest.mark.parametrize("args,composes", [
    (ONE_EPOCH, 1),
    ([*ONE_EPOCH, "+note=${hydra:runtime.output_dir}"], 1),  # resolves only inside the run: the run prepares itself
    (["resume=run"], 1),  # the saved config is read, not composed
    (["-m", *ONE_EPOCH, "seed=0,1", "launcher=basic"], 3),  # the sweep, then each of its two jobs
])
def test_hydra_composes_the_config_once_per_run(tmp_path, args, composes):
    (tmp_path / "run").mkdir()  # a stopped run without a checkpoint, which resume= starts again
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(*ONE_EPOCH), resolve=True))
    where = [] if args == ["resume=run"] else [f"hydra.{'sweep' if '-m' in args else 'run'}.dir={tmp_path / 'new'}"]
    result = subprocess.run([sys.executable, "-c", COUNT_COMPOSES, *args, *where], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"composes={composes}"
    metrics = sorted((tmp_path / ("run" if args == ["resume=run"] else "new")).glob("**/metrics.json"))
    assert len(metrics) == composes - (composes > 1)  # every run the command started finished


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (init_from=<file>) and resume=<run folder>: each refused in one line naming the file or folder.


class RunsCode:  # a pickle that would run a command on load: weights_only loading must refuse it
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def lightning_ckpt(*overrides: str, **extra) -> dict:
    model = build.network(compose_config(*overrides).model)
    return {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 0, **extra}


def write_file(path, make) -> str:
    if isinstance(make, bytes):
        path.write_bytes(make)
    else:
        torch.save(make(path), path)
    return str(path)


def truncated(path) -> bytes:
    torch.save(lightning_ckpt(), path)
    return path.read_bytes()[: path.stat().st_size // 2]


CHECKPOINT_REFUSED = [
    ("missing file", None, r"init_from=\S+/missing.ckpt: no such file"),
    ("empty file", b"", r"init_from=\S+: not a readable checkpoint \(truncated or corrupt"),
    ("truncated", "truncated", r"init_from=\S+: not a readable checkpoint \(truncated or corrupt: PytorchStreamReader"),
    ("random bytes", bytes(range(256)) * 4, r"init_from=\S+: not a (readable )?checkpoint"),
    ("runs code on load", lambda p: {"state_dict": RunsCode(f"{p}.ran")},
     r"init_from=\S+: refused: it holds a Python object \(posix.system\) that loading would run; .*weights_only=True"),
    ("a tensor, not a dict", lambda p: torch.zeros(3), r"init_from=\S+: not a checkpoint \(holds a Tensor"),
    ("no weights", lambda p: {"epoch": 3}, r"init_from=\S+: holds no model weights"),
    ("another architecture: norm", lambda p: lightning_ckpt("model/norm=batchnorm"),
     r"made for a different architecture: layers in the file this config lacks: stage1.norm, stage2.norm, stage3.norm$"),
    ("another architecture: shapes", lambda p: lightning_ckpt("model.channels=[16,32,64]"),
     r"stage1.conv.weight is \[16, 3, 5, 5\] in the file, \[32, 3, 5, 5\] here; stage1.conv.bias is \[16\]"),
    ("another architecture: activation", lambda p: lightning_ckpt("model/activation=prelu"),
     r"layers in the file this config lacks: stage1.act, stage2.act, stage3.act, head_act$"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in CHECKPOINT_REFUSED], ids=[c[0] for c in CHECKPOINT_REFUSED])
def test_checkpoint_refused_with_a_message_naming_the_file(tmp_path, make, message):
    path = tmp_path / ("missing.ckpt" if make is None else "given.ckpt")
    if make == "truncated":
        make = truncated(tmp_path / "whole.ckpt")
    if make is not None:
        write_file(path, make)
    model = build.network(compose_config().model)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_weights(model, str(path), f"init_from={path}")
    assert re.search(message, str(e.value)), str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "given.ckpt.ran").exists()  # the code in the pickle never ran


def test_a_checkpoint_of_the_same_architecture_loads_bare_or_from_lightning(tmp_path):
    torch.manual_seed(1)
    reference = build.network(compose_config().model)
    torch.save(reference.state_dict(), tmp_path / "bare.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in reference.state_dict().items()}, "epoch": 3},
               tmp_path / "lightning.ckpt")
    for path in (tmp_path / "bare.pt", tmp_path / "lightning.ckpt"):
        torch.manual_seed(2)
        model = build.network(compose_config().model)
        checkpoint.load_weights(model, str(path), f"init_from={path}")
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def stopped_run(tmp_path, last: bytes | dict | None = None, sha: str | None = None):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = compose_config()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if isinstance(last, dict):
        torch.save(last, run_dir / "checkpoints" / "last.ckpt")
    elif last is not None:
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(last)
    return run_dir, cfg


def test_resume_refusals_name_the_folder_and_what_to_do(tmp_path):
    run_dir, cfg = stopped_run(tmp_path)
    cases = [
        (str(tmp_path / "nowhere"), [], r"resume=\S+/nowhere: no such folder; give the run folder a run printed as 'logs"),
        (str(tmp_path), [], r"resume=\S+: not a cifarlab run folder \(no config.yaml\)"),
        (str(run_dir), ["trainer.max_epochs=20"], r"resume=\S+ with trainer.max_epochs=20: a resumed run continues with "
                                                  r"the config it started with"),
    ]
    for folder, others, message in cases:
        with pytest.raises(RunFolderError) as e:
            resume.resume_folder(folder, others)
        assert re.search(message, str(e.value)), str(e.value)
    (run_dir / ".running").write_text(f"pid {os.getpid()} on {os.uname().nodename} since 2026-11-22T00:00:00+00:00\n")
    with pytest.raises(RunFolderError, match=r"a run is still using this folder \(pid \d+ on .*\); if it is dead, delete"):
        resume.resume_folder(str(run_dir), [])
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"that run finished \(metrics.json\); nothing to resume"):
        resume.resume_folder(str(run_dir), [])


@pytest.mark.parametrize("last,message", [
    (b"PK\x03\x04 not really", r"resume=\S+/checkpoints/last.ckpt: not a readable checkpoint"),
    (lightning_ckpt(cifarlab={"config_sha": "0123456789abcdef", "saved_at": 0.0}),
     r"resume=\S+/last.ckpt: written by a run of another config than \S+/config.yaml \(edited since\?\)"),
], ids=["corrupt last.ckpt", "config edited since"])
def test_resume_refuses_an_unusable_checkpoint_before_reading_data(tmp_path, last, message):
    run_dir, cfg = stopped_run(tmp_path, last)
    with pytest.raises(CheckpointError) as e:
        resume.continue_from(run_dir, build.network(cfg.model), run_folder.config_sha(cfg))
    assert re.search(message, str(e.value)), str(e.value)


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path):
    cfg = compose_config()
    run_dir, _ = stopped_run(tmp_path, lightning_ckpt("model/norm=batchnorm",
                                                      cifarlab={"config_sha": run_folder.config_sha(cfg),
                                                                "saved_at": 0.0}))
    with pytest.raises(CheckpointError, match=r"last.ckpt: made for a different architecture: layers in the file"):
        resume.continue_from(run_dir, build.network(cfg.model), run_folder.config_sha(cfg))


@pytest.mark.slow  # the real command line, as a subprocess
@pytest.mark.parametrize("args,message", [
    (["init_from=missing.ckpt", "data=synthetic", "hydra.run.dir=run"], r"error: init_from=/\S+/missing.ckpt: no such file"),
    (["resume=no/such/run"], r"error: resume=no/such/run: no such folder"),
    (["resume=run", "trainer.max_epochs=20"], r"error: resume=run with trainer.max_epochs=20: a resumed run continues"),
])
def test_cli_refuses_bad_checkpoints_and_folders_in_one_line(tmp_path, args, message):
    result = run_cli(*args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert re.match(message, result.stderr), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_the_readme_quotes_the_messages_users_get():
    """Each `$ cifarlab-train ...` / `error: ...` pair in README.md is what that command prints today."""
    readme = (REPO / "README.md").read_text()
    pairs = [(args, message) for args, message in re.findall(r"^\$ cifarlab-train (.+)\nerror: (.+)$", readme, re.M)
             if not args.startswith(("init_from=", "resume="))]  # checkpoint refusals need files
    assert len(pairs) >= 3, "README.md lost its examples of config refusals"
    for args, message in pairs:
        assert refusal(*shlex.split(args)) == message, args
