"""cifarlab-train's command line: what happens before a run starts, and the one place its errors are reported.

argv -> Hydra composes the config (its refusals, and the schema's types, as one line) -> the run folder's state
(finished, stopped, in use) -> prepare.py builds every object of the run (each value and layer, the data, the
trainer) -> Hydra makes the run folder -> train.main runs with what was prepared. resume=<run folder> goes straight
to the run with the config the folder records; -m sweeps prepare each job in the job (sweep.py).

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
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from cifarlab import schema
from cifarlab.errors import ConfigError, UserError, refuse
from cifarlab.run_folder import (FINISHED, RUNNING, SAVED_CONFIG, finished_run, is_ddp_child, override,
                                 resume_overrides, stopped_run, to_train_log)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"  # Hydra's own switch for the whole traceback


def composed(args: list[str]) -> DictConfig | None:
    """The config the overrides compose to, with its hydra node, as Hydra's run will compose it. Hydra's refusals
    (an unknown option or key, a value of the wrong type, an unparsable override) as a ConfigError of one line; None
    for anything else, which Hydra then reports itself."""
    from hydra import compose, initialize_config_dir

    def compose_with(overrides: list[str]) -> DictConfig:
        with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
            return compose("train", overrides=overrides, return_hydra_config=True)

    try:
        return compose_with(args)
    except Exception as e:
        error = refusal(e, args, compose_with)
        if error is None:
            return None
        raise error from None


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


def planned_run_dir(cfg: DictConfig) -> Path | None:
    """The folder Hydra will make (hydra.run.dir, resolved now and passed on, so both agree); None where it only
    resolves inside the run."""
    HydraConfig.instance().set_config(cfg)
    try:
        return Path(str(cfg.hydra.run.dir)).expanduser().resolve()  # absolute, as Hydra's own output_dir is
    except Exception:
        return None


def check_folder(run_dir: Path) -> None:
    """Before Hydra writes its .hydra/ record into the folder: never into a finished, stopped or busy run's."""
    from cifarlab.errors import RunFolderError

    if (run_dir / FINISHED).exists():
        raise RunFolderError(finished_run(run_dir))
    if (run_dir / SAVED_CONFIG).exists():
        raise RunFolderError(stopped_run(run_dir))
    if (run_dir / RUNNING).exists():
        raise RunFolderError(f"hydra.run.dir={run_dir}: another run is using this folder "
                             f"({(run_dir / RUNNING).read_text().strip()}); if that run is dead, delete "
                             f"{run_dir / RUNNING} first")


def checked_in_the_run(cfg: DictConfig, overrides: list[str]) -> bool:
    """Values that read Hydra's runtime (${hydra:...}) or variables that hydra.job.env_set sets exist only inside
    the run: such a run prepares itself, after Hydra has made its folder."""
    task = OmegaConf.to_container(cfg, resolve=False)
    env_set = task.pop("hydra", {}).get("job", {}).get("env_set")  # from the command line or any config file
    return "${hydra:" in str(task) or bool(env_set) or any("hydra.job.env_set" in a for a in overrides)


def prepare_before_the_folder(args: list[str]) -> tuple[Any, list[str]]:
    """(what the run needs, built; the overrides that give Hydra the same folder) for a new single run."""
    cfg = composed(args)
    run_dir = planned_run_dir(cfg) if cfg is not None else None
    if run_dir is None:
        return None, []
    check_folder(run_dir)
    if checked_in_the_run(cfg, args):
        return None, [override("hydra.run.dir", run_dir)]
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    # Lightning, imported while the root logger has no handler, gives its loggers a console handler of their own and
    # stops them propagating: its lines would miss train.log, which Hydra sets up later. A placeholder prevents it.
    placeholder = logging.NullHandler()
    logging.getLogger().addHandler(placeholder)
    try:
        from cifarlab.prepare import prepare

        return prepare(cfg, run_dir, choices), [override("hydra.run.dir", run_dir)]
    finally:
        logging.getLogger().removeHandler(placeholder)
        quiet_lightning_console()


def quiet_lightning_console() -> None:
    """The `lightning` logger prints to stderr itself and also reaches Hydra's handlers (console and train.log):
    without its own handler, each of its lines shows once."""
    if "lightning" in sys.modules:
        logging.getLogger("lightning").handlers.clear()


def task(prepared: Any) -> Callable[[DictConfig], Any]:
    """The function Hydra runs in the run folder, with what was prepared; every error of the run ends here."""

    def run(cfg: DictConfig) -> Any:
        schema.register()  # a launcher's worker restores the parent's Hydra state before each job: register again
        try:
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                from cifarlab import sweep  # Lightning only once the job is not skipped as finished

                return sweep.job(cfg)  # each job prepares itself; its failures end in its failed.json
            from cifarlab import train

            quiet_lightning_console()
            return train.main(cfg, prepared)
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

    return run


def cli() -> None:
    """cifarlab-train: Hydra's command line, with every mistake refused in one line before Hydra makes a folder."""
    schema.register()
    args = sys.argv[1:]
    given = [a for a in args if a.startswith("resume=")]
    others = [a for a in args if a not in given]
    prepared = None
    try:
        if given and not is_ddp_child():  # a DDP rank re-runs rank 0's rewritten command line as it is
            sys.argv = [sys.argv[0], *resume_overrides(given[-1].split("=", 1)[1], others)]
        elif not given and not any(a.startswith("-") for a in args) and not is_ddp_child():
            prepared, more = prepare_before_the_folder(others)
            sys.argv += more
    except UserError as e:
        if full_error():
            raise
        refuse(str(e), e.exit_status)
    except KeyboardInterrupt:  # while preparing (a download, reading the data): nothing was written yet
        print("\ninterrupted before the run started; nothing was written", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # unforeseen, and no run folder yet to hold the trace
        if full_error():
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        refuse(f"{type(e).__name__}: {first} (before the run started; HYDRA_FULL_ERROR=1 shows the trace)", 1)
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")(task(prepared))()


if __name__ == "__main__":
    cli()
