"""One run, or many runs packed into few programs: the run contract.

`execute(configs)` is the only way anything runs a configuration (dia.train for one, dia.grid for many):

1. each run is checked, its folder locked and opened (`<root>/.<name>.partial`, resumed when it holds the
   same config), before anything heavy happens;
2. runs that can share a program (dia.run.pack) are packed, prepared just in time (victims -> clients ->
   problems) and attacked; every run saves its own checkpoint rows;
3. a run whose problems are all finished is scored and written, then its folder is renamed to its final
   place (dia.run.cell.write).

Signals (dia.run.signals) stop every pack at a step boundary with the checkpoints saved; a failure leaves
every folder and checkpoint as it was. Exit codes are `dia.errors.ExitCode`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig

from dia.engine import AttackResult
from dia.errors import ExitCode, UserError
from dia.run import pack as packs
from dia.run.cell import Cell, RunOutput, check, open_cell, prepare, release, trim_curves, write
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


def _limit(cells: list[Cell]) -> int:
    """Rows per program: `attack.parallel`, or (auto) CPU_ROWS on a CPU and as many as fit on a GPU."""
    parallel = cells[0].cfg.attack.parallel
    if parallel != "auto":
        return int(parallel)
    if cells[0].device.type != "cuda":
        return max(1, min(CPU_ROWS, sum(c.num_problems for c in cells)))
    return packs.auto_limit([prepare(c) if c.problems is None else c for c in cells[:2]], total=sum(c.num_problems for c in cells))


def execute(configs: list[DictConfig], *, progress: bool = True, keep_going: bool = False,
            note: Callable[[str], None] = lambda msg: log.info(msg)) -> list[Outcome]:
    """Run every config (packed where possible); one `Outcome` per config, in order.

    Without `keep_going` the first bad input or failure raises (dia.train); with it (dia.grid) that run's
    outcome records it and the others go on. A stop signal raises `Stopped` after saving everything.
    """
    outcomes: dict[int, Outcome] = {}
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(packs.pack_key_of(cfg), []).append(i)
    for members in groups.values():
        cells: dict[int, Cell] = {}
        try:
            for i in members:
                try:
                    cells[i] = open_cell(configs[i])
                except UserError as exc:
                    if not keep_going:
                        raise
                    outcomes[i] = Outcome(str(configs[i].run.name), ExitCode.BAD_INPUT, message=str(exc))
                    note(f"{configs[i].run.name}: {exc}")
            for cell in cells.values():
                if cell.resumed:
                    trim_curves(cell)
            if cells:
                _run_group(cells, outcomes, progress=progress, keep_going=keep_going, note=note)
        finally:
            for cell in cells.values():
                release(cell)
    return [outcomes[i] for i in range(len(configs))]


def _finish(cell: Cell) -> Outcome:
    parts = [cell.checkpoint.done[g] for g in sorted(cell.checkpoint.done)]
    out = write(prepare(cell) if cell.problems is None else cell, AttackResult.cat(parts))
    code = ExitCode.OK if out.metrics["status"] == "completed" else ExitCode.DIVERGED
    return Outcome(cell.name, code, out)


def _run_group(cells: dict[int, Cell], outcomes: dict[int, Outcome], *, progress: bool, keep_going: bool,
               note: Callable[[str], None]) -> None:
    index = {id(c): i for i, c in cells.items()}

    def guarded(cell: Cell | None, work: Callable[[], object]) -> bool:
        """Run `work` for `cell` (None: a program, whose failure names its runs); with keep_going a bad input
        or fault ends only the runs concerned (False)."""
        try:
            work()
            return True
        except (Stopped, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - bad input, out of memory, disk full: this run fails, its files stay
            failed = exc.runs if isinstance(exc, packs.ProgramFailed) else [cell] if cell is not None else []
            exc = exc.cause if isinstance(exc, packs.ProgramFailed) else exc
            if not keep_going:
                raise exc
            code = ExitCode.BAD_INPUT if isinstance(exc, UserError) else ExitCode.FAILED
            text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            for cell in failed:
                outcomes[index[id(cell)]] = Outcome(cell.name, code, message=text)
                note(f"{cell.name}: {text}")
            return False

    def finish(cell: Cell) -> None:
        if guarded(cell, lambda: outcomes.__setitem__(index[id(cell)], _finish(cell))):
            release(cell)

    order = list(cells.values())
    limit = _limit(order)
    todo = [item for cell in order for item in packs.items(cell, limit)]
    left = {id(c): sum(t.cell is c for t in todo) for c in order}
    for cell in order:  # every group already finished (stopped while writing): write it now
        if left[id(cell)] == 0:
            finish(cell)

    def enter(item: packs.Item) -> bool:
        cell = item.cell
        return index[id(cell)] not in outcomes and (cell.problems is not None or guarded(cell, lambda: prepare(cell)))

    def finished(item: packs.Item) -> None:
        left[id(item.cell)] -= 1
        if left[id(item.cell)] == 0:
            finish(item.cell)

    while todo:
        todo = [item for item in todo if index[id(item.cell)] not in outcomes]
        if not todo:
            break
        rest: list = []
        # a failed program fails the runs it was working on (packs.ProgramFailed); the others go on
        before = len(outcomes)
        if not guarded(None, lambda: rest.append(packs.run(todo, limit, enter=enter, finished=finished,
                                                             progress=progress, note=note))):
            if len(outcomes) == before:  # it named no run: none of these can go on
                for item in todo:
                    outcomes.setdefault(index[id(item.cell)], Outcome(item.cell.name, ExitCode.FAILED, message="its program failed"))
            continue
        if rest[0] is None:
            todo = [item for item in todo if index[id(item.cell)] not in outcomes]
            if not todo:  # the signal came while the last runs were being written: they are finished
                break
            names = sorted({i.cell.name for i in todo})
            saved = all(i.cell.checkpoint is not None and i.cell.checkpoint.persist for i in todo)
            raise STOP.exception("stopped on a signal; progress of the run(s) in this program " + (
                "saved in their checkpoints" if saved else "not saved (run.checkpoint_every=-1): a rerun starts them from iteration 0")
                + f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        todo = rest[0]
