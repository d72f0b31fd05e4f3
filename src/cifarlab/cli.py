"""cifarlab-train's command line: what happens before a run starts, and the one place its errors are reported.

argv -> Hydra composes the config, once (its refusals, and the schema's types, as one line: cli()) -> Hydra calls
BeforeTheFolder.on_run_start: the run folder's state (finished, stopped, in use) and everything the run builds
(prepare.py: each value and layer, the data, the trainer) -> Hydra makes the run folder -> run() hands train.main
what was prepared. resume=<run folder> runs in that folder with the config saved there (resume.py); -m sweeps
prepare each job in the job (sweep/job.py).

Every error a run raises ends here: a UserError as its own line; anything else as one line naming the run's
train.log, where the trace is (HYDRA_FULL_ERROR=1 shows it here as well). No torch is imported until the overrides
compose, so `--help` and a mistake in the overrides are answered in a second or two.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from cifarlab import schema
from cifarlab.errors import ConfigError, RunFolderError, UserError, refuse
from cifarlab.resume import resume_folder
from cifarlab.run_folder import (State, finished_run, in_use, is_ddp_child, quiet_lightning_console, state,
                                 stopped_run, to_train_log)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")

# Every process that composes or resolves cifarlab's config imports this module first: the command line, and a
# launcher's worker, which imports it to unpickle the task before Hydra resolves the job's folder name.
schema.register()


def full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"  # Hydra's own switch for the whole traceback


def compose(overrides: list[str]) -> DictConfig:
    """The config these overrides compose to, with its hydra node: what a refusal's hint lists the keys of."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)


USERS_FULL_ERROR: str | None = None  # HYDRA_FULL_ERROR as the user set it (cli() sets it for Hydra's refusals)


def users_full_error() -> None:
    """Give the process HYDRA_FULL_ERROR as the user set it: the run, and every process it starts, go by theirs."""
    if USERS_FULL_ERROR is None:
        os.environ.pop("HYDRA_FULL_ERROR", None)
    else:
        os.environ["HYDRA_FULL_ERROR"] = USERS_FULL_ERROR


def refused(e: UserError) -> None:
    if full_error():
        raise e
    refuse(str(e), e.exit_status)


def refusal(e: Exception, args: list[str], compose_with: Callable[[list[str]], DictConfig]) -> ConfigError | None:
    """Hydra's refusal to compose these overrides, as one line; None for an exception that is not one."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(e, MissingConfigException):  # an option (configs/<group>/<option>.yaml) that is not there
        if not e.missing_cfg_file or "/" not in e.missing_cfg_file:
            return ConfigError(" ".join(str(e).split()))
        group, option = e.missing_cfg_file.rsplit("/", 1)
        return ConfigError(f"{group}={option}: no such option (no configs/{group}/{option}.yaml); choose one of: "
                           f"{', '.join(e.options or [])}")
    if isinstance(e, ConfigCompositionException):
        return ConfigError(composition_error(e, args, compose_with))
    if isinstance(e, OverrideParseException):
        return ConfigError(f"cannot parse the overrides {' '.join(args)}: {str(e).splitlines()[0]}")
    return None


def composition_error(e: Exception, args: list[str], compose_with: Callable[[list[str]], DictConfig]) -> str:
    """A value of the wrong type (the schema), or a key the config does not have (with the close ones)."""
    from omegaconf.errors import ConfigAttributeError, ValidationError

    cause = e.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, ValidationError) and key:
        arg = next((a for a in args if a.lstrip("+~").split("=", 1)[0] == key), key)
        return f"{arg}: {str(cause).splitlines()[0]} (the schema types {key})"
    if not isinstance(cause, ConfigAttributeError) or not key:
        return " ".join(str(e).split())
    arg = next((a for a in args if a.startswith(f"{key}=")), key)
    parent, _, name = key.rpartition(".")
    try:
        rest = compose_with([a for a in args if a != arg])
        node = OmegaConf.select(rest, parent) if parent else rest
    except Exception:  # another mistake among the overrides: name this one without the list
        node = None
    keys = [str(k) for k in node.keys() if k != "hydra"] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(name, keys, n=1)
    hint = f"did you mean {parent}.{close[0]}? " if close else ""
    return (f"{arg}: no such key; {hint}{parent or 'the config'} has: {', '.join(keys)} "
            f"(to add a key that is not there, write +{arg})")


def planned_run_dir(config: DictConfig) -> Path | None:
    """The folder Hydra will make (hydra.run.dir, absolute, as Hydra's own output_dir is); None where it resolves
    only inside the run (it reads Hydra's runtime)."""
    try:
        return Path(str(config.hydra.run.dir)).expanduser().resolve()
    except Exception:
        return None


def check_folder(run_dir: Path) -> None:
    """Before Hydra writes its .hydra/ record into the folder: never into a finished, stopped or busy run's."""
    refusal = {State.FINISHED: finished_run, State.STOPPED: stopped_run, State.IN_USE: in_use}.get(state(run_dir))
    if refusal is not None:
        raise RunFolderError(refusal(run_dir))


def checked_in_the_run(config: DictConfig) -> bool:
    """Values that read Hydra's runtime (${hydra:...}) or variables that hydra.job.env_set sets exist only inside
    the run: such a run prepares itself, after Hydra has made its folder."""
    task = OmegaConf.to_container(config, resolve=False)
    return "${hydra:" in str({k: v for k, v in task.items() if k != "hydra"}) or bool(config.hydra.job.env_set)


def pin_folder(config: DictConfig, run_dir: Path, keep_record: bool = False) -> None:
    """Run in run_dir as resolved now: Lightning's DDP ranks, which run the command again with hydra.run.dir set to
    Hydra's, land in it too (a ${now:} resolved again a second later would not). keep_record: write no .hydra/."""
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.run.dir = str(run_dir)
        if keep_record:
            config.hydra.output_subdir = None


# Config groups that only a sweep (-m) reads: a single run would quietly ignore them.
SWEEP_GROUPS = ("sweep", "seeds", "hparams_search")

# What on_run_start prepared, by run folder, for the run Hydra starts next in this process.
PREPARED: dict[Path, Any] = {}


class BeforeTheFolder(Callback):
    """Hydra calls it once the config has composed, before it makes the run folder (configs/train.yaml,
    hydra.callbacks): a single run's folder is checked and everything it builds is built here, so that a mistake is
    refused in one line and no folder is made for it. resume=<folder> runs in that folder, with the config saved
    there (train.main), and leaves Hydra's record of the first start as it is."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        users_full_error()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        users_full_error()
        if is_ddp_child():  # rank 0 checked and holds the folder; Lightning gave this rank its hydra.run.dir
            return
        try:
            if config.get("resume") is not None:
                others = [o for o in config.hydra.overrides.task if not o.startswith("resume=")]
                pin_folder(config, resume_folder(str(config.resume), others), keep_record=True)
                return
            sweep_only = [f"{g}={c}" for g in SWEEP_GROUPS if (c := config.hydra.runtime.choices.get(g))]
            if sweep_only:
                raise ConfigError(f"{' '.join(sweep_only)}: chooses how -m sweeps, and this is a single run; run it "
                                  f"as a sweep: cifarlab-train -m {' '.join(sweep_only)} ...")
            run_dir = planned_run_dir(config)
            if run_dir is None:
                return
            check_folder(run_dir)
            pin_folder(config, run_dir)
            if not checked_in_the_run(config):
                PREPARED[run_dir] = prepare_run(config, run_dir)
        except UserError as e:
            refused(e)
        except KeyboardInterrupt:  # while preparing (a download, reading the data): nothing was written yet
            print("\ninterrupted before the run started; nothing was written", file=sys.stderr)
            sys.exit(130)


def prepare_run(config: DictConfig, run_dir: Path) -> Any:
    """Every object of the run, built from the config less Hydra's node (prepare.py)."""
    from cifarlab.prepare import prepare  # torch: only once the overrides have composed

    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    # Lightning's lines show through the console handler it gives its logger, once: not through Hydra's as well
    lightning_log = logging.getLogger("lightning")
    lightning_log.propagate = False
    try:
        return prepare(task, run_dir, dict(config.hydra.runtime.choices))
    finally:
        lightning_log.propagate = True
        quiet_lightning_console()


def run(cfg: DictConfig) -> Any:
    """The task Hydra runs in the run folder; every error of the run ends here."""
    schema.register()  # a launcher's worker restores the parent's Hydra state before each job: register again
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            from cifarlab.sweep.job import job  # Lightning only once the job is not skipped as finished

            return job(cfg)  # each job prepares itself; its failures end in its failed.json
        from cifarlab import train

        return train.main(cfg, PREPARED.pop(Path(HydraConfig.get().runtime.output_dir), None))
    except UserError as e:
        to_train_log(f"error: {e}", logging.ERROR)
        if full_error():
            raise
        refuse(str(e), e.exit_status)
    except KeyboardInterrupt as e:  # train.Interrupted says how to go on; Ctrl-C outside training does not
        where = HydraConfig.get().runtime.output_dir
        print(f"\n{e}" if str(e) else f"\ninterrupted; continue with: cifarlab-train resume={where}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        train_log = Path(HydraConfig.get().runtime.output_dir) / "train.log"
        to_train_log(f"failed: {type(e).__name__}: {e}", logging.ERROR, sys.exc_info())
        if full_error():
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        refuse(f"{type(e).__name__}: {first} (full trace in {train_log})", 1)


def cli() -> None:
    """cifarlab-train: Hydra's command line, with every mistake refused in one line before Hydra makes a folder."""
    global USERS_FULL_ERROR
    USERS_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR")
    # Hydra prints a refusal of the overrides over several lines; with its documented switch on it raises it, to be
    # refused here in one line. BeforeTheFolder gives the run the user's own setting back once the config composed.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")(run)()
    except Exception as e:  # Hydra's refusal of the overrides, or unforeseen before the run had a folder
        users_full_error()
        if full_error():
            raise
        error = refusal(e, sys.argv[1:], compose)
        if error is not None:
            refuse(str(error), error.exit_status)
        first = (str(e).strip().splitlines() or [""])[0]
        refuse(f"{type(e).__name__}: {first} (before the run started; HYDRA_FULL_ERROR=1 shows the trace)", 1)


if __name__ == "__main__":
    cli()
