"""The mistakes a user can fix. The run raises them; the command line (cli.py) prints the message as one line."""

from __future__ import annotations

import sys


class UserError(Exception):
    """A mistake the user can fix; str(e) is the whole line they see: the key or file, the value, what to do."""

    exit_status = 2


class ConfigError(UserError, ValueError):
    """A config value that cannot be used; the message names the key, the value and what is allowed."""


class DataError(UserError):
    """The data cannot be used as asked; the message names the file or folder and what to do."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and why."""


class RunFolderError(UserError, ValueError):
    """A run folder that cannot be used as asked; the message names it and what to do instead."""


class Diverged(UserError):
    """The training loss became NaN or infinite: not a config mistake, so it exits 1 like any failed run."""

    exit_status = 1


def refuse(message: str, status: int = 2) -> None:
    """A mistake or a failure: one line on stderr, no traceback, a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def first_line(e: BaseException) -> str:
    """An exception's first line of text, or its type's name where it has none."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
