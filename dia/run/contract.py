"""The run contract: one run, or many runs packed into few programs.

`execute(configs)` is the only way anything runs a configuration (dia.train for one, dia.grid for many):

1. each run is checked, its folder locked and opened (`<root>/.<name>.partial`, resumed when it holds the
   same config), before anything heavy happens;
2. runs that can share a program (dia.run.pack) are packed, prepared just in time (victims -> clients ->
   problems) and attacked; every run saves its own checkpoint rows;
3. a run whose problems are all finished is scored and written, then its folder is renamed to its final
   place (dia.run.runs.write).

Signals (dia.run.signals) stop every pack at a step boundary with the checkpoints saved; a failure leaves
every folder and checkpoint as it was. Exit codes are `dia.errors.ExitCode`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

from dia.engine import AttackResult
from dia.errors import ExitCode, UserError
from dia.run import pack as packs
from dia.run.checks import device_memory, unrolled_bytes
from dia.run.folder import AlreadyDone
from dia.run.runs import Run, RunOutput, check, open_run, prepare, release, trim_curves, write
from dia.run.signals import STOP, Stopped

log = logging.getLogger("dia")

__all__ = ["Outcome", "execute", "check"]


@dataclass
class Outcome:
    """How one run ended in this process."""

    name: str
    code: ExitCode
    output: RunOutput | None = None
    message: str | None = None


# On a CPU the attack is compute-bound: every row of a program costs its share of every iteration, stopped
# rows included, and large programs cost more per row. A few dozen rows, refilled as runs stop, did the same
# work 2.0x faster than one program of all 72 problems of a block (docs/benchmarks.md, benchmarks/refill.py).
CPU_ROWS = 24


def _limit(runs: list[Run]) -> int:
    """Rows per program: `attack.parallel`, or (auto) CPU_ROWS on a CPU and as many as fit on a GPU."""
    parallel = runs[0].cfg.attack.parallel
    if parallel != "auto":
        return int(parallel)
    if runs[0].device.type != "cuda":  # FedAvg's T unrolled steps: no more rows than half the RAM holds
        fit = (
            int(0.5 * device_memory("cpu")[0] // unrolled_bytes(runs[0].cfg))
            if runs[0].cfg.client.local_steps > 1
            else CPU_ROWS
        )
        return max(1, min(CPU_ROWS, fit, sum(c.num_problems * packs.starts(c) for c in runs)))
    return packs.auto_limit(
        [prepare(c) if c.problems is None else c for c in runs[:2]],
        total=sum(c.num_problems * packs.starts(c) for c in runs),
    )


def execute(
    configs: list[DictConfig],
    *,
    progress: bool = True,
    keep_going: bool = False,
    note: Callable[[str], None] = lambda msg: log.info(msg),
) -> list[Outcome]:
    """Run every config (packed where possible); one `Outcome` per config, in order.

    Without `keep_going` the first bad input or failure raises (dia.train); with it (dia.grid) that run's
    outcome records it and the others go on. A stop signal raises `Stopped` after saving everything.
    """
    outcomes: dict[int, Outcome] = {}
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(packs.pack_key_of(cfg), []).append(i)
    for members in groups.values():
        runs: dict[Run, int] = {}
        try:
            for i in members:
                try:
                    runs[open_run(configs[i])] = i
                except AlreadyDone as done:  # the same run, finished: its results stand
                    output = RunOutput(done.folder, done.metrics)
                    outcomes[i] = Outcome(done.folder.name, ExitCode.OK, output, message=str(done))
                except UserError as exc:
                    if not keep_going:
                        raise
                    outcomes[i] = Outcome(str(configs[i].run.name), ExitCode.BAD_INPUT, message=str(exc))
                    note(f"{configs[i].run.name}: {exc}")
            for run in runs:
                if run.resumed:
                    trim_curves(run)
            if runs:
                for run, outcome in (
                    Packing(list(runs), progress=progress, keep_going=keep_going, note=note).run().items()
                ):
                    outcomes[runs[run]] = outcome
        finally:
            for run in runs:
                release(run)
    return [outcomes[i] for i in range(len(configs))]


class Packing:
    """Runs that can share programs (one pack key), taken to their end.

    Their problems are split into items (groups of at most a program's rows, dia.run.pack.items) and go
    through as few programs as it takes: each program starts with the items that fit, the others wait for
    rows to free up. A run is prepared (victims -> problems) when its first item enters, and written as
    soon as its last item has finished. With `keep_going` a failure ends only the runs it concerns (a bad
    input, a fault, or a program that fails: the runs inside it); without, it is raised.
    """

    def __init__(self, runs: list[Run], *, progress: bool, keep_going: bool, note: Callable[[str], None]) -> None:
        self.runs, self.progress, self.keep_going, self.note = runs, progress, keep_going, note
        self.outcomes: dict[Run, Outcome] = {}
        self.limit = _limit(runs)
        self.todo = [item for run in runs for item in packs.items(run, self.limit)]
        self.left = {run: sum(item.run is run for item in self.todo) for run in runs}  # unfinished items

    def run(self) -> dict[Run, Outcome]:
        for run in self.runs:  # every item already finished (stopped while writing): write it now
            if self.left[run] == 0:
                self.finish(run)
        while self.todo:
            todo = [item for item in self.todo if item.run not in self.outcomes]
            if not todo:
                break
            self.todo = self.program(todo)
        return self.outcomes

    def program(self, todo: list[packs.Item]) -> list[packs.Item]:
        """One program over `todo`; returns the items it did not take (they go to the next one)."""
        try:
            rest = packs.run(
                todo, self.limit, enter=self.enter, finished=self.finished, progress=self.progress, note=self.note
            )
        except (Stopped, KeyboardInterrupt):
            raise
        except packs.ProgramFailed as exc:  # it names the runs it was working on; the others go on
            self.fail(exc.runs or list({item.run: None for item in todo}), exc.cause)
            return todo
        except Exception as exc:
            self.fail(list({item.run: None for item in todo}), exc)
            return todo
        if rest is None:
            todo = [item for item in todo if item.run not in self.outcomes]
            if not todo:  # the signal came while the last runs were being written: they are finished
                return []
            names = sorted({item.run.name for item in todo})
            saved = all(item.run.checkpoint is not None and item.run.checkpoint.persist for item in todo)
            raise STOP.exception(
                "stopped on a signal; progress of the run(s) in this program "
                + (
                    "saved in their checkpoints"
                    if saved
                    else "not saved (run.checkpoint_every=-1): a rerun starts them from iteration 0"
                )
                + f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            )
        return rest

    def enter(self, item: packs.Item) -> bool:
        """Whether `item` may enter a program: its run has not ended, and is prepared (False if that fails)."""
        run = item.run
        if run in self.outcomes:
            return False
        if run.problems is None:
            return self.guarded(run, lambda: prepare(run))
        return True

    def finished(self, item: packs.Item) -> None:
        """`item`'s result is in its run's checkpoint; the run is written when it was the last."""
        self.left[item.run] -= 1
        if self.left[item.run] == 0:
            self.finish(item.run)

    def finish(self, run: Run) -> None:
        """Score and write `run` (dia.run.runs.write), then drop its lock and tensors."""

        def write_it() -> None:
            parts = [run.checkpoint.done[g] for g in sorted(run.checkpoint.done)]
            out = write(prepare(run) if run.problems is None else run, AttackResult.cat(parts))
            code = ExitCode.OK if out.metrics["status"] == "completed" else ExitCode.DIVERGED
            self.outcomes[run] = Outcome(run.name, code, out)

        if self.guarded(run, write_it):
            release(run)

    def guarded(self, run: Run, work: Callable[[], object]) -> bool:
        """Run `work` for `run`; a failure ends that run (False), or is raised without keep_going."""
        try:
            work()
            return True
        except (Stopped, KeyboardInterrupt):
            raise
        except Exception as exc:
            self.fail([run], exc)
            return False

    def fail(self, runs: list[Run], exc: Exception) -> None:
        """The runs `runs` end with `exc` (bad input: exit 2, else 1); without keep_going it is raised."""
        if not self.keep_going:
            raise exc
        code = ExitCode.BAD_INPUT if isinstance(exc, UserError) else ExitCode.FAILED
        text = (
            str(exc)
            if isinstance(exc, UserError)
            else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        )
        for run in runs:
            if run not in self.outcomes:
                self.outcomes[run] = Outcome(run.name, code, message=text)
                self.note(f"{run.name}: {text}")
