"""How a run stops early, and what it leaves behind.

* SIGTERM and SIGUSR1 (`scancel`, a node drain, preemption, Slurm's warning before the time limit): the
  attack saves its checkpoint at the end of the current step and the process exits with
  `ExitCode.PREEMPTED` (75); a scheduler may requeue it and the rerun resumes.
* SIGINT (Ctrl-C): the same, but exit `ExitCode.INTERRUPTED` (130). A second Ctrl-C stops at once; the
  last periodic checkpoint is kept.

Nothing is ever deleted on the way out: a stopped run keeps its `.partial` folder and checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from dia.errors import ExitCode


class Stopped(Exception):
    """The run saved its checkpoint and stopped on a signal; rerunning the same command resumes it."""

    exit_code = ExitCode.PREEMPTED


class Preempted(Stopped):
    exit_code = ExitCode.PREEMPTED


class Interrupted(Stopped):
    exit_code = ExitCode.INTERRUPTED


class StopRequest:
    """Set by a signal handler; polled by the attack at the end of each step (never acted on mid-step)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.kind: type[Stopped] = Preempted
        self.signal: int | None = None

    def set(self, kind: type[Stopped], signum: int | None = None) -> None:
        self.kind, self.signal = kind, signum
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def clear(self) -> None:
        self.event.clear()
        self.kind, self.signal = Preempted, None

    def exception(self, message: str) -> Stopped:
        return self.kind(message)


STOP = StopRequest()


def _on_preempt(signum: int, _frame: Any) -> None:
    STOP.set(Preempted, signum)


def _on_interrupt(signum: int, _frame: Any) -> None:
    if STOP.is_set():  # the second Ctrl-C: stop now
        raise KeyboardInterrupt
    STOP.set(Interrupted, signum)


def install() -> None:
    """Route SIGTERM/SIGUSR1/SIGINT to `STOP` (in the main thread of a command, before it runs anything)."""
    STOP.clear()
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _on_preempt)
    signal.signal(signal.SIGINT, _on_interrupt)
