"""How a process stops early, and what it leaves behind (stdlib only: installed before anything slow).

* SIGTERM and SIGUSR1 (`scancel`, a node drain, preemption, Slurm's warning before the time limit): the
  attack saves its checkpoint at the end of the current step and the process exits with
  `ExitCode.PREEMPTED` (75); a scheduler may requeue it and the rerun resumes.
* SIGINT (Ctrl-C): the same, but exit `ExitCode.INTERRUPTED` (130). A second Ctrl-C stops at once (the
  last periodic checkpoint is kept), still with exit 130.

Commands call `install()` first thing, before importing torch or composing a config, so a signal that
arrives during start-up or grid validation is a clean stop (75/130), never a kill by the default action
(143/138, which Slurm does not requeue). Code that runs before the attack polls `STOP` (`stop_point`).
Nothing is ever deleted on the way out: a stopped run keeps its `.partial` folder and checkpoint.
(`dia.run.signals` re-exports this module: the run contract's view of it.)
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
        self.cause: type[Stopped] = Preempted  # which stop: preemption (75) or interruption (130)
        self.signal: int | None = None
        self.aborted = False  # a second Ctrl-C: stopped at once (KeyboardInterrupt), not at a step boundary

    def set(self, cause: type[Stopped], signum: int | None = None) -> None:
        self.cause, self.signal = cause, signum
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def clear(self) -> None:
        self.event.clear()
        self.cause, self.signal, self.aborted = Preempted, None, False

    def exception(self, message: str) -> Stopped:
        return self.cause(message)


STOP = StopRequest()


def _on_preempt(signum: int, _frame: Any) -> None:
    STOP.set(Preempted, signum)


def _on_interrupt(signum: int, _frame: Any) -> None:
    if STOP.is_set():  # the second Ctrl-C (or one after SIGTERM): stop now
        STOP.aborted = True
        raise KeyboardInterrupt
    STOP.set(Interrupted, signum)


def install() -> None:
    """Route SIGTERM/SIGUSR1/SIGINT to `STOP` (in the main thread of a command, before it runs anything)."""
    STOP.clear()
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _on_preempt)
    signal.signal(signal.SIGINT, _on_interrupt)


def stop_point(what: str) -> None:
    """Raise the pending stop (if a signal came) before `what` starts: nothing of it has been done yet."""
    if STOP.is_set():
        raise STOP.exception(f"stopped on a signal before {what}; nothing of it was started")
