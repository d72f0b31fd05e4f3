"""cifarlab-train's command line: what happens before a run starts.

argv -> Hydra's own refusals (an unknown option or key, an unparsable override) in one line -> the composed config
checked (config.check: every interpolation, value, layer and _target_; check_data: the data folder; not for resume=,
which continues with its saved config) -> resume=<run folder> read -> Hydra composes the config again and makes the
run folder -> train.main(cfg), the run itself (train.py).

Imports no torch or Lightning until the overrides compose: `--help`, `--cfg job` and a mistake in the overrides or in
resume= are answered in 1-3 s (docs/results/cli-answers/). A mistake in a value loads torch but not Lightning, and is
refused before Hydra makes a run folder for it, as is a data folder that holds no CIFAR-10 (torchvision too); the run
pays for the imports once, when it starts.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cifarlab.run_folder import (FINISHED, SAVED_CONFIG, RunFolderError, finished_run, is_ddp_child,
                                 resume_overrides, stopped_run)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
# Sweep job folders 000_, 001_, ... so that `ls` lists them in the order they ran.
OmegaConf.register_new_resolver("cifarlab.zfill", lambda n, width: str(n).zfill(int(width)), replace=True)


def refuse(message: str, status: int = 2) -> None:
    """A user mistake: one line on stderr, no traceback, a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


class KeepFinishedRuns(Callback):
    """Hydra writes .hydra/*.yaml into the run folder before the task starts; refuse a finished folder before that,
    so a finished run's record of its config is never replaced."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        except Exception:  # interpolations that only resolve inside the job: the task's own check covers them
            return
        if (run_dir / FINISHED).exists():
            refuse(finished_run(run_dir))
        if (run_dir / SAVED_CONFIG).exists() and config.get("resume") is None and not is_ddp_child():
            refuse(stopped_run(run_dir))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from cifarlab import train  # torch and Lightning: loaded once the config has composed and a run starts

    return train.main(cfg)


class Refusal(Exception):
    """A mistake found before the run starts; the message is the one line the user sees."""


def composed(args: list[str]) -> DictConfig | None:
    """The config the overrides compose to (as Hydra's run will compose it, less the hydra node); Hydra's own
    refusals (an unknown option or key, an unparsable override) as a Refusal of one line, with the choices; None for
    anything else, which Hydra reports as usual."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    def compose_with(overrides: list[str]) -> DictConfig:
        with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
            return compose("train", overrides=overrides)

    try:
        return compose_with(args)
    except MissingConfigException as e:
        missing = re.search(r"Could not find '([^']+)/([^'/]+)'", str(e))
        options = re.findall(r"^\t(\S+)$", str(e).split("Config search path")[0], re.M)
        if not missing:
            raise Refusal(str(e).splitlines()[0]) from None
        group, option = missing.groups()
        raise Refusal(f"{group}={option}: no such option (no configs/{group}/{option}.yaml); choose one of: "
                      f"{', '.join(options)}") from None
    except ConfigCompositionException as e:
        found = re.search(r"Could not override '([^']+)'", str(e))
        if not found:
            raise Refusal(" ".join(str(e).split())) from None
        key = found.group(1)
        arg = next((a for a in args if a.startswith(f"{key}=")), key)
        parent, _, name = key.rpartition(".")
        try:
            rest = compose_with([a for a in args if a != arg])
            node = OmegaConf.select(rest, parent) if parent else rest
        except Exception:  # another mistake among the overrides: name this one without the list
            node = None
        keys = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(name, keys, n=1)
        hint = f"did you mean {parent}.{close[0]}? " if close else ""
        raise Refusal(f"{arg}: no such key; {hint}{parent or 'the config'} has: {', '.join(keys)} "
                      f"(to add a key that is not there, write +{arg})") from None
    except OverrideParseException as e:
        raise Refusal(f"cannot parse the overrides {' '.join(args)}: {str(e).splitlines()[0]}") from None
    except Exception:
        return None


def check_config(cfg: DictConfig) -> None:
    """config.check, and the data folder, before Hydra makes the run folder: a refused config leaves no folder behind
    that looks like a stopped run (.hydra/, train.log), and reaches the user in 3 s rather than 9 (Lightning is not
    loaded until the _target_s are checked, last)."""
    from cifarlab import config  # torch: loaded once the overrides compose

    # Lightning, imported while the root logger has no handler, gives its loggers a console handler of their own and
    # stops them propagating: its lines would miss the run's train.log, which Hydra sets up later. A handler that
    # drops everything, until Hydra's replace it, keeps Lightning's loggers as they are when it loads inside a run.
    placeholder = logging.NullHandler()
    logging.getLogger().addHandler(placeholder)
    try:
        plain = config.check_values(cfg)
        check_data(cfg)  # before the _target_s: they load Lightning (5 s here), the data check only torchvision
        config.check_targets(cfg, plain)
    except config.ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's switch for the traceback, as in train.main
            raise
        raise Refusal(str(e)) from None
    finally:
        logging.getLogger().removeHandler(placeholder)


def check_data(cfg: DictConfig) -> None:
    """The data folder (data.root) as the run will find it: where it holds no CIFAR-10 and data.download is false, or
    where a file is missing from it, refuse before a run folder is made. Reads no file (data.find): a truncated or
    corrupt file is still found by the run, when it reads them."""
    if cfg.data.name != "cifar10":
        return
    from cifarlab import data  # torchvision, not Lightning

    try:
        data.find(Path(str(cfg.data.root)).expanduser().resolve(), cfg.data.download)
    except data.DataError as e:
        raise Refusal(str(e)) from None


def checked_in_the_run(cfg: DictConfig, overrides: list[str]) -> bool:
    """What only the run itself can check: values that read Hydra's runtime (${hydra:...}) or variables that
    hydra.job.env_set sets, both of which exist only inside the run."""
    return "${hydra:" in OmegaConf.to_yaml(cfg) or any("hydra.job.env_set" in a for a in overrides)


def cli() -> None:
    """cifarlab-train: Hydra's command line, plus resume=<run folder>, which must be read before Hydra picks a
    folder and records a config in it, and every mistake in the overrides refused in one line before Hydra makes a
    run folder. Flags (-m, --help, --cfg) are left to Hydra, as is a config that composes here but not there."""
    args = sys.argv[1:]
    given = [a for a in args if a.startswith("resume=")]
    others = [a for a in args if a not in given]
    try:
        if not any(a.startswith("-") for a in args) and not is_ddp_child():  # a DDP rank: rank 0 checked it all
            cfg = composed(others)
            # A resumed run continues with its saved config, which its own start checks
            if cfg is not None and not given and not checked_in_the_run(cfg, others):
                check_config(cfg)
        if given and not is_ddp_child():  # a DDP rank re-runs rank 0's rewritten command line as it is
            sys.argv = [sys.argv[0], *resume_overrides(given[-1].split("=", 1)[1], others)]
    except (Refusal, RunFolderError) as e:
        refuse(str(e))
    main()


if __name__ == "__main__":
    cli()
