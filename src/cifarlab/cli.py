"""cifarlab-train's command line: what happens before a run starts.

argv -> Hydra's own refusals (an unknown option or key, an unparsable override) in one line -> resume=<run folder>
read -> Hydra composes the config and picks the run folder -> train.main(cfg), the run itself (train.py).

Imports no torch or Lightning, which take seconds to load: `--help`, `--cfg job` and a mistake in the overrides or in
resume= are answered in 1-3 s (docs/results/cli-answers/); the run pays for the import once it starts.
"""

from __future__ import annotations

import difflib
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


def composition_error(args: list[str]) -> str | None:
    """Hydra's own refusals (an unknown option or key, an unparsable override) as one line, with the choices;
    None when the overrides compose. Flags (-m, --help, --cfg) are left to Hydra."""
    if any(a.startswith("-") for a in args):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    def composed(overrides: list[str]) -> DictConfig:
        with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
            return compose("train", overrides=overrides)

    try:
        composed(args)
        return None
    except MissingConfigException as e:
        missing = re.search(r"Could not find '([^']+)/([^'/]+)'", str(e))
        options = re.findall(r"^\t(\S+)$", str(e).split("Config search path")[0], re.M)
        if not missing:
            return str(e).splitlines()[0]
        group, option = missing.groups()
        return f"{group}={option}: no such option (no configs/{group}/{option}.yaml); choose one of: {', '.join(options)}"
    except ConfigCompositionException as e:
        found = re.search(r"Could not override '([^']+)'", str(e))
        if not found:
            return " ".join(str(e).split())
        key = found.group(1)
        arg = next((a for a in args if a.startswith(f"{key}=")), key)
        parent, _, name = key.rpartition(".")
        try:
            rest = composed([a for a in args if a != arg])
            node = OmegaConf.select(rest, parent) if parent else rest
        except Exception:  # another mistake among the overrides: name this one without the list
            node = None
        keys = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(name, keys, n=1)
        hint = f"did you mean {parent}.{close[0]}? " if close else ""
        return (f"{arg}: no such key; {hint}{parent or 'the config'} has: {', '.join(keys)} "
                f"(to add a key that is not there, write +{arg})")
    except OverrideParseException as e:
        return f"cannot parse the overrides {' '.join(args)}: {str(e).splitlines()[0]}"
    except Exception:
        return None  # anything else: Hydra reports it as usual


def cli() -> None:
    """cifarlab-train: Hydra's command line, plus resume=<run folder>, which must be read before Hydra picks a
    folder and records a config in it, and Hydra's composition errors in one line."""
    args = sys.argv[1:]
    problem = composition_error([a for a in args if not a.startswith("resume=")])
    if problem:
        refuse(problem)
    given = [a for a in args if a.startswith("resume=")]
    if given and not is_ddp_child():  # a DDP rank re-runs rank 0's rewritten command line as it is
        try:
            overrides = resume_overrides(given[-1].split("=", 1)[1], [a for a in args if a not in given])
        except RunFolderError as e:
            refuse(str(e))
        sys.argv = [sys.argv[0], *overrides]
    main()


if __name__ == "__main__":
    cli()
