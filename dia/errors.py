"""User-facing errors: one line that names the offending key or file and the valid choices."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from enum import IntEnum


class UserError(ValueError):
    """A problem with what the user asked for (a key, a value, a file, a tensor): one line that names it.
    The commands print it and exit with code 2; the library (`dia.reconstruct`, ...) raises it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' when a choice is close to `word`, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class ExitCode(IntEnum):
    """Exit codes of every `dia` command (train, grid, report, bench, slurm): one contract, named once."""

    OK = 0
    FAILED = 1  # an unexpected error (a bug, or a fault such as a full disk); the run's checkpoint is kept
    BAD_INPUT = 2  # the user's input is wrong: one line on stderr, nothing written
    DIVERGED = 3  # an attack diverged (NaN/inf loss): results kept with status "diverged"
    PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 with the checkpoint kept; rerun (or requeue) to resume
    INTERRUPTED = 130  # stopped by SIGINT (Ctrl-C) with the checkpoint kept; rerun to resume
