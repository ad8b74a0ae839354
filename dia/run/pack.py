"""Packs: many runs' problems attacked as one vectorized program.

Runs that differ only in the attack (IG, WIIG, DIA), the dropout rate and the victims share the client's
model weights and every attack setting; their problems can be optimized together (dia.attacks.program): one program,
one compile, a GPU filled by the paper's whole block instead of
by one 16-victim run. A problem's trajectory does not depend on what else is in its pack (every problem
has its own seed, optimizer state and stopping rules), so a run computed in a pack equals the run alone up
to floating-point reassociation (tests/test_pack.py).

A run's problems are split into groups of at most the pack size; an *item* is one group of one run.
Items with the same `pack_key` and the same resume iteration are packed greedily in run order.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from dia import attacks
from dia.attacks import ATTACKS, Part, Program, attack
from dia.config.schema import AttackConfig
from dia.engine import AttackState, Layout
from dia.metrics import problem_ssim
from dia.models import dropout_sites
from dia.run import record
from dia.run.checkpoint import join_rows, state_rows
from dia.run.runs import Run
from dia.run.signals import STOP, Stopped

log = logging.getLogger("dia")

PER_ROW = ("name", "model_drop_path")  # settings every attack has that rows of one program may differ in
SHARED = tuple(f.name for f in fields(AttackConfig) if f.name not in PER_ROW)  # the engine's settings: one per program
# what may differ between runs of one program (the defense changes what the client sends, the targets, not the program)
NOT_SHARED = (
    "victims",
    "num_victims",
    "victim_seed",
    "run.name",
    "run.output_dir",
    "run.progress",
    "run.save_tensors",
    "logger",
    "metrics",
    "defense",
)


def pack_key_of(config: Any) -> str:
    """Runs with equal keys can share a program: equal engine settings (the attack settings every attack
    shares), attacks with the same objective (`InvertingGradients.objective_key`: the class whose distance and
    prior they use, and the settings those read), the same model but for its rate, and equal settings otherwise.
    An attack's other settings (DIA's mask settings, ...) are per row, as are the rate, the victims and the
    client's defense (and what only concerns output)."""
    cfg = OmegaConf.to_container(config, resolve=True)
    cfg["attack"] = {k: v for k, v in cfg["attack"].items() if k in SHARED}
    cfg["objective"] = ATTACKS.get(config.attack.name).objective_key(config.attack)
    cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "dropout"}
    for dotted in NOT_SHARED:
        head, _, tail = dotted.partition(".")
        if tail:
            cfg.get(head, {}).pop(tail, None)
        else:
            cfg.pop(head, None)
    return json.dumps(cfg, sort_keys=True, default=str)


@dataclass
class Item:
    """Group `group` of `run`: problems `index` of it."""

    run: Run
    group: int
    index: list[int]

    @property
    def iteration(self) -> int:
        ckpt = self.run.checkpoint
        return ckpt.iteration if ckpt is not None and ckpt.running == self.group else 0


def starts(run: Run) -> int:
    """R: the rows each of the run's problems takes (`attack.restarts`)."""
    return int(run.cfg.attack.get("restarts", 1) or 1)


def rows_of(item: Item) -> int:
    """The rows an item takes in a program: its problems times their starts."""
    return len(item.index) * starts(item.run)


def items(run: Run, limit: int) -> list[Item]:
    """The unfinished groups of `run` for packs of at most `limit` rows (a resumed run keeps its groups)."""
    ckpt = run.checkpoint
    fresh = min(max(1, limit // starts(run)), run.num_problems)
    size = (ckpt.group_size if ckpt is not None and ckpt.group_size else None) or fresh
    if ckpt is not None:
        ckpt.group_size = size
    n = run.num_problems
    groups = [list(range(i, min(n, i + size))) for i in range(0, n, size)]
    return [Item(run, g, idx) for g, idx in enumerate(groups) if ckpt is None or g not in ckpt.done]


def split_compatible(pack: list[Item]) -> list[list[Item]]:
    """The pack's items in sub-packs whose runs' models are `compatible`."""
    sets = compatible(list({id(i.run): i.run for i in pack}.values()))
    return [[i for i in pack if any(i.run is c for c in s)] for s in sets]


def compatible(runs: list[Run]) -> list[list[Run]]:
    """Split same-key runs into sets of `same_model` runs."""
    sets: list[list[Run]] = []
    for run in runs:
        for s in sets:
            if same_model(s[0].model, run.model):
                s.append(run)
                break
        else:
            sets.append([run])
    return sets


def same_model(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two runs' client models have equal weights and dropout sites (a safety net: a model whose
    weights depend on its dropout rate, or whose sites appear only at some rates, runs apart)."""
    if a is b:
        return True
    ref, mine = a.state_dict(), b.state_dict()
    return (
        set(dropout_sites(a)) == set(dropout_sites(b))
        and ref.keys() == mine.keys()
        and all(torch.equal(ref[k], mine[k]) for k in ref)
    )


def attacker_model(runs: list[Run]) -> torch.nn.Module:
    """The model the attacker's copy is made from: the one with the most dropout sites active."""
    return max((c.model for c in runs), key=lambda m: len(dropout_sites(m, active_only=True)))


def part_of(item: Item) -> Part:
    """The item's problems as its attack's server sees them (its run must be prepared)."""
    return attacks.part(item.run.cfg.attack, item.run.problems.subset(item.index))


def run_batch(item: Item) -> int:
    return int(item.run.problems.input_shape[0])


def role_key(item: Item) -> tuple[str, bool]:
    """What decides which sites and roles an item's rows need: its attack, and whether its model drops."""
    return str(item.run.cfg.attack.name), float(item.run.cfg.model.dropout) > 0


def fresh_rows(module: Program, part: Part) -> dict[str, torch.Tensor]:
    """Saved-rows form (`state_rows`) of a part's start, on the CPU (as checkpoints hold rows)."""
    return {k: v.cpu() for k, v in state_rows(module.fresh_state(part), slice(None)).items()}


def append_curves(run: Run, points: list[dict[str, Any]]) -> None:
    """Curve points go to the run's curves.jsonl (the record) and to its loggers."""
    record.append_curves(run.folder.partial, points)
    run.loggers.log(points)


class ProgramFailed(Exception):
    """A program failed (`cause`) while working on `runs`: the runs inside it, or the one entering it."""

    def __init__(self, runs: list[Run], cause: Exception) -> None:
        super().__init__(str(cause))
        self.runs, self.cause = runs, cause


@dataclass
class Slot:
    """An item inside a program: its part (rows), the program step it entered at, its own iteration then
    (Item.iteration moves with every checkpoint save)."""

    item: Item
    part: Part
    entered: int
    start: int


class Turnover(Callback):
    """The life of a pack in one program: which items hold which rows, and what waits.

    Every `attack.check_every` iterations, items whose problems have all stopped leave (their result goes
    to their run's checkpoint, then `finished(item)`), and with `refill` waiting items take the freed rows
    (`enter(item)` prepares one; False drops it). An item that cannot share this program (another model,
    other sites) is set aside in `left`. Every `every` iterations and on a stop signal, each item in the
    program saves its rows in its run's checkpoint; every `log_every` iterations it appends its curves.
    """

    def __init__(
        self,
        inside: list[Item],
        parts: list[Part],
        waiting: list[Item],
        *,
        limit: int,
        every: int,
        log_every: int,
        refill: bool,
        enter: Callable[[Item], bool],
        finished: Callable[[Item], None],
    ) -> None:
        self.every, self.log_every, self.refill, self.limit = every, log_every, refill, limit
        self.enter, self.finished = enter, finished
        self.starting = list(zip(inside, parts))  # the items the program starts with, and their parts
        self.module: Program | None = None
        self.inside: list[Slot] = []
        self.waiting, self.left = list(waiting), []
        self.stopped = False
        self.before = 0  # `module.done` at the previous step's end
        self.entering: Item | None = None  # the item being prepared or admitted
        self.model = inside[0].run.model  # the client model every item must share

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        """Before the program takes its first step: the items inside, their saved rows, the steps it may take."""
        self.module = module
        self.inside = [Slot(item, part, 0, item.iteration) for item, part in self.starting]
        items = [item for item, _ in self.starting]
        if any(item.iteration > 0 for item in items):
            initial = module.start()
            module.resume = join_rows(
                [
                    item.run.checkpoint.state if item.iteration > 0 else fresh_rows(module, part)
                    for item, part in self.starting
                ],
                Layout.of(initial),
                initial,
            )
            log.info(
                "resuming %s", ", ".join(f"{i.run.name} at iteration {i.iteration}" for i in items if i.iteration > 0)
            )
        cfg = items[0].run.cfg
        max_its = cfg.attack.max_iterations
        left = [max_its - i.iteration for i in items]
        if self.refill and self.waiting:  # a bound (each step advances some item); the bar shows an estimate
            lag = cfg.attack.check_every  # a stopped item leaves at the next check
            module.horizon = sum(n + lag for n in left) + sum(max_its - i.iteration + lag for i in self.waiting)
            module.expected = max(left) + max_its * math.ceil(sum(len(i.index) for i in self.waiting) / self.limit)
        else:
            module.horizon = max(left)
        module.waiting = self.waiting_problems()

    def waiting_problems(self) -> int:
        return sum(len(i.index) for i in self.waiting) if self.refill else 0

    def own_iteration(self, slot: Slot, done: int | None = None) -> int:
        done = self.module.done if done is None else done
        return min(slot.item.run.cfg.attack.max_iterations, slot.start + done - slot.entered)

    def logs(self, slot: Slot, before: int) -> bool:
        """Whether the slot's run reached, since program step `before`, an iteration an unbroken run logs
        (its first step, every `log_every`, its last): resumed and late-entering runs log on the same grid."""
        own, last = self.own_iteration(slot), self.own_iteration(slot, max(before, slot.entered))
        every = self.log_every
        return own > last and (
            last == 0 or (every > 0 and own // every > last // every) or own == slot.item.run.cfg.attack.max_iterations
        )

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        done, n = module.done, module.cfg.iterations_per_step
        before, self.before = self.before, done

        def crossed(every: int) -> bool:
            return every > 0 and (done // every > (done - n) // every or done == module.horizon)

        for slot in self.inside:
            if self.logs(slot, before):
                item, rows = slot.item, self.module.rows_of(slot.part).to(module.device)
                point = {k: float(v) for k, v in module.curves(rows).items()}
                if item.run.cfg.metrics.curves_ssim and item.run.victims is not None:  # None: an update without images
                    chosen = module.rows.chosen(slot.part, module.state).to(module.device)  # each problem's best start
                    point["eval/ssim"] = float(self.ssim(item, chosen).mean())
                own = self.own_iteration(slot)
                append_curves(
                    item.run,
                    [
                        {
                            "group": item.group,
                            "iteration": own,
                            "step": item.group * item.run.cfg.attack.max_iterations + own,
                            **point,
                        }
                    ],
                )
        if STOP.is_set() or crossed(self.every):
            self.save()
        if STOP.is_set():
            self.stopped = True
            trainer.should_stop = True
        elif crossed(module.cfg.check_every):
            self.turnover()
            if not self.waiting_problems() and not self.inside:
                trainer.should_stop = True

    def ssim(self, item: Item, rows: torch.Tensor) -> torch.Tensor:
        """SSIM of the item's best iterates so far against its victims, per problem (the experimenter's view:
        the attack never sees the victims)."""
        run, b = item.run, run_batch(item)
        x = self.module.state.best_params["x"][rows].detach().cpu()
        truth = torch.cat([run.victims.images[j * b : (j + 1) * b] for j in item.index])
        return problem_ssim((x * run.std + run.mean).clamp(0, 1), truth)

    def save(self) -> None:
        for slot in self.inside:
            if slot.item.run.checkpoint is not None:
                rows = self.module.rows_of(slot.part).to(self.module.device)
                slot.item.run.checkpoint.progress(slot.item.group, state_rows(self.module.state, rows))

    def turnover(self) -> None:
        """Items whose problems all stopped leave; waiting ones enter the freed rows (with `refill`)."""
        self.retire_stopped()
        if self.refill:
            self.fill()
        self.module.waiting = self.waiting_problems()

    def retire_stopped(self) -> None:
        module = self.module
        running = module.state.active.cpu()
        for slot in list(self.inside):
            if not bool(running[self.module.rows_of(slot.part)].any()):
                slot.item.run.checkpoint.finished(slot.item.group, module.retire(slot.part))
                self.inside.remove(slot)
                self.finished(slot.item)

    def fill(self) -> None:
        module = self.module
        taken = torch.zeros(module.state.num_problems, dtype=torch.bool)
        for rows in module.rows.index:
            taken[rows] = True
        free = torch.nonzero(~taken).flatten()
        busy = {id(slot.item.run) for slot in self.inside}  # a run's groups go one at a time, in order
        for item in list(self.waiting):
            mine = id(item.run) in busy
            busy.add(id(item.run))
            if mine or rows_of(item) > len(free):
                continue
            self.waiting.remove(item)
            self.entering = item
            if not self.enter(item):
                continue
            part = part_of(item)
            if not same_model(self.model, item.run.model) or not module.fits(part):
                self.left.append(item)
                continue
            saved = item.run.checkpoint.state if item.iteration > 0 else None
            layout = module.state.layout
            resume = (
                None
                if saved is None
                else AttackState.from_dict(join_rows([saved], layout, module.start_of(part)), layout, module.device)
            )
            module.admit(part, free[: rows_of(item)], resume)
            free = free[rows_of(item) :]
            self.inside.append(Slot(item, module.parts[-1], module.done, item.iteration))
            if item.iteration > 0:
                log.info("resuming %s at iteration %d", item.run.name, item.iteration)
        self.entering = None

    def working_on(self) -> list[Run]:
        """The runs a failure now concerns: those inside (those it was to start with, before it started), else
        the one entering."""
        items = [slot.item for slot in self.inside] if self.module is not None else [i for i, _ in self.starting]
        runs = [i.run for i in items] or ([self.entering.run] if self.entering else [])
        return list({id(c): c for c in runs}.values())

    def close(self) -> None:
        """After the program ended: record the items inside (all stopped: the horizon is a bound)."""
        self.retire_stopped()
        if self.inside:
            raise RuntimeError(f"the program ended with {describe([slot.item for slot in self.inside])} still running")


def describe(pack: list[Item]) -> str:
    counts: dict[str, int] = {}
    for item in pack:
        name = item.run.cfg.attack.name.upper()
        counts[name] = counts.get(name, 0) + len(item.index)
    runs = len({id(i.run) for i in pack})
    return f"{runs} run{'s' if runs > 1 else ''}: " + " ".join(f"{k}x{v}" for k, v in counts.items())


def run(
    todo: list[Item],
    limit: int,
    *,
    enter: Callable[[Item], bool],
    finished: Callable[[Item], None],
    progress: bool = True,
    note: Callable[[str], None] = log.info,
) -> list[Item] | None:
    """Attack `todo` in one program of `limit` rows (at least the largest item): the first items that fit
    start, the others wait for rows to free up (`attack.refill`, else for the next program). `enter(item)`
    prepares an item's run (False: drop it); `finished(item)` is called when an item's result is in its
    run's checkpoint. Returns the items this program did not take, or None when stopped by a signal (each
    item inside saved its rows)."""
    cfg = todo[0].run.cfg
    limit = max(limit, max(rows_of(i) for i in todo))
    inside, waiting, used, busy = [], [], 0, set()
    for item in todo:  # in order, what fits (a run's groups one at a time); a run that cannot be prepared is dropped
        fits = used + rows_of(item) <= limit and id(item.run) not in busy
        busy.add(id(item.run))
        if not fits:
            waiting.append(item)
        elif enter(item):
            joins = not inside or same_model(inside[0].run.model, item.run.model)
            (inside if joins else waiting).append(item)
            used += rows_of(item) if joins else 0
    if not inside:
        return waiting
    scouts = []  # one prepared waiting item of each kind missing inside: the program must have its rows' sites
    for item in waiting:
        if (
            cfg.attack.refill
            and role_key(item) not in {role_key(i) for i in inside + scouts}
            and enter(item)
            and same_model(inside[0].run.model, item.run.model)
        ):
            scouts.append(item)
    parts = [part_of(item) for item in inside]
    every = cfg.run.checkpoint_every if cfg.run.checkpoint_every >= 0 else 0
    turnover = Turnover(
        inside,
        parts,
        waiting,
        limit=limit,
        every=every,
        log_every=cfg.attack.log_every,
        refill=cfg.attack.refill,
        enter=enter,
        finished=finished,
    )
    waits = sum(len(i.index) for i in waiting)
    note(f"program: {describe(inside)}" + (f"; {waits} problems waiting" if waiting else ""))
    started = time.perf_counter()
    try:
        program = attack(
            attacker_model([i.run for i in inside + scouts]),
            parts,
            expect=[part_of(i) for i in scouts],
            device=todo[0].run.device,
            title=describe(inside + waiting),  # the whole pack: every run this program may take
            progress=progress,
            callbacks=[turnover],
        )
        if turnover.stopped or STOP.is_set():
            return None
        turnover.close()
    except (Stopped, KeyboardInterrupt):
        raise
    except Exception as exc:  # e.g. out of memory: the runs it was working on fail, not the others
        raise ProgramFailed(turnover.working_on(), exc) from exc
    rows, took = program.state.num_problems, time.perf_counter() - started
    note(f"program done: {program.done} iterations of {rows} rows in {took:.1f} s")
    return turnover.left + turnover.waiting


def auto_limit(runs: list[Run], *, total: int, headroom: float = 0.7) -> int:
    """How many rows of a CUDA program fit in `headroom` of the free memory (at most `total`).

    The memory of one problem is measured: the peak of one iteration of a two-problem pack of the first
    (prepared) runs' problems, minus what was allocated before, halved.
    """
    device = runs[0].device
    if total <= 1:
        return 1
    probe_items = []
    for run in runs:  # one problem of each kind of run, two in all
        if len(probe_items) < 2:
            probe_items.append(Item(run, 0, [0]))
    if len(probe_items) == 1 and runs[0].num_problems > 1:
        probe_items = [Item(runs[0], 0, [0, 1])]
    k = sum(rows_of(i) for i in probe_items)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe = Program(attacker_model([i.run for i in probe_items]), [part_of(i) for i in probe_items]).to(device)
    probe.on_fit_start()
    probe.gradient = getattr(probe.gradient, "fn", probe.gradient)  # eager: no compile just to measure
    probe.step()
    torch.cuda.synchronize(device)
    per_problem = max(1, (torch.cuda.max_memory_allocated(device) - base) / k)
    del probe
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    limit = max(1, min(total, int(headroom * free / per_problem)))
    log.info(
        "attack.parallel=auto: %d rows at once (%.1f MiB each, %.1f GiB free on %s)",
        limit,
        per_problem / 2**20,
        free / 2**30,
        torch.cuda.get_device_name(device),
    )
    return limit
