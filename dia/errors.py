"""User-facing errors: one line that names the offending key or file and the valid choices."""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A problem with what the user asked for; the CLI prints it as one line and exits with code 2."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' when a choice is close to `word`, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
