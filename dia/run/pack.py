"""Packs: many runs' problems attacked as one vectorized program.

Runs that differ only in the attack (IG, WIIG, DIA), the dropout rate and the victims share the client's
model weights and every attack setting; their problems can be optimized together (see
`InvertingGradients.pack`): one program, one compile, a GPU filled by the paper's whole block instead of
by one 16-victim run. A problem's trajectory does not depend on what else is in its pack (every problem
has its own seed, optimizer state and stopping rules), so a run computed in a pack equals the run alone up
to floating-point reassociation (tests/test_pack.py).

A run's problems are split into groups of at most the pack size; an *item* is one group of one run.
Items with the same `pack_key` and the same resume iteration are packed greedily in run order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from dia.attacks import ATTACKS, DIAConfig, AttackConfig, InvertingGradients, Part
from dia.engine import AttackResult, Layout
from dia.models import dropout_sites
from dia.progress import AttackProgressBar
from dia.run.cell import Cell, append_curves
from dia.run.checkpoint import join_rows, state_rows
from dia.run.signals import STOP

log = logging.getLogger("dia")

PER_ROW = ("name", "mask_weight")  # attack settings that may differ inside a pack
ATTACK_ONLY = tuple(f.name for f in fields(DIAConfig) if f.name not in {g.name for g in fields(AttackConfig)})
NOT_SHARED = ("victims", "num_victims", "victim_seed", "run.name", "run.output_dir", "run.progress", "run.save_tensors",
              "logger", "metrics", "defense")  # the defense changes what the client sends (the targets), not the program


def pack_key_of(config: Any) -> str:
    """Runs with equal keys can share a program: everything but the attack, the rate, the victims and the
    client's defense (and what only concerns output: names, folders, logging, metrics)."""
    cfg = OmegaConf.to_container(config, resolve=True)
    attack = {k: v for k, v in cfg["attack"].items() if k not in PER_ROW}
    defaults = DIAConfig()
    attack.update({k: attack.get(k, getattr(defaults, k)) for k in ATTACK_ONLY})
    cfg["attack"] = attack
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
    """Group `group` of `cell`: problems `index` of the run."""

    cell: Cell
    group: int
    index: list[int]

    @property
    def iteration(self) -> int:
        ckpt = self.cell.checkpoint
        return ckpt.iteration if ckpt is not None and ckpt.running == self.group else 0


def items(cell: Cell, limit: int) -> list[Item]:
    """The unfinished groups of `cell` for packs of at most `limit` problems (a resumed run keeps its groups)."""
    ckpt = cell.checkpoint
    size = (ckpt.group_size if ckpt is not None and ckpt.group_size else None) or min(limit, cell.num_problems)
    if ckpt is not None:
        ckpt.group_size = size
    n = cell.num_problems
    groups = [list(range(i, min(n, i + size))) for i in range(0, n, size)]
    return [Item(cell, g, idx) for g, idx in enumerate(groups) if ckpt is None or g not in ckpt.done]


def plan(todo: list[Item], limit: int) -> Iterator[list[Item]]:
    """Greedy packs of at most `limit` problems from items with the same resume iteration, in order."""
    by_iteration: dict[int, list[Item]] = {}
    for item in todo:
        by_iteration.setdefault(item.iteration, []).append(item)
    for group in by_iteration.values():
        pack: list[Item] = []
        for item in group:
            if pack and sum(len(i.index) for i in pack) + len(item.index) > limit:
                yield pack
                pack = []
            pack.append(item)
        if pack:
            yield pack


def split_compatible(pack: list[Item]) -> list[list[Item]]:
    """The pack's items in sub-packs whose runs' models are `compatible`."""
    sets = compatible(list({id(i.cell): i.cell for i in pack}.values()))
    return [[i for i in pack if any(i.cell is c for c in s)] for s in sets]


def compatible(cells: list[Cell]) -> list[list[Cell]]:
    """Split same-key cells into sets whose client models have equal weights and dropout sites (a safety net:
    a model whose weights depend on its dropout rate, or whose sites appear only at some rates, runs apart)."""
    sets: list[list[Cell]] = []
    for cell in cells:
        for s in sets:
            ref, mine = s[0].model.state_dict(), cell.model.state_dict()
            same = (set(dropout_sites(s[0].model)) == set(dropout_sites(cell.model)) and ref.keys() == mine.keys()
                    and all(torch.equal(ref[k], mine[k]) for k in ref))
            if same:
                s.append(cell)
                break
        else:
            sets.append([cell])
    return sets


def attacker_model(cells: list[Cell]) -> torch.nn.Module:
    """The model the attacker's copy is made from: the one with the most dropout sites active."""
    return max((c.model for c in cells), key=lambda m: len(dropout_sites(m, active_only=True)))


def build(pack: list[Item]) -> InvertingGradients:
    """The attack module of a pack (resuming its items' saved rows, if any)."""
    parts = []
    for item in pack:
        cls = ATTACKS.get(item.cell.cfg.attack.name)
        parts.append(Part(cls, cls.view(item.cell.problems.subset(item.index)), item.cell.cfg.attack))
    cell = pack[0].cell
    lower, upper = (0 - cell.mean) / cell.std, (1 - cell.mean) / cell.std
    module = InvertingGradients.pack(attacker_model([i.cell for i in pack]), parts, lower=lower, upper=upper)
    if pack[0].iteration > 0:
        initial = module.initial_params()
        module.resume = join_rows([i.cell.checkpoint.state for i in pack], Layout.of(initial), initial)
        log.info("resuming %s at iteration %d", ", ".join(sorted({i.cell.name for i in pack})), pack[0].iteration)
    return module


def rows_of(pack: list[Item]) -> Iterator[tuple[Item, slice]]:
    start = 0
    for item in pack:
        yield item, slice(start, start + len(item.index))
        start += len(item.index)


class PackCallbacks(Callback):
    """Per item: save its rows every `every` iterations and when asked to stop; log its curves."""

    def __init__(self, pack: list[Item], every: int, log_every: int) -> None:
        self.pack, self.every, self.log_every = pack, every, log_every
        self.stopped = False

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        done, n = module.done, module.cfg.iterations_per_step

        def crossed(every: int) -> bool:
            return every > 0 and (done // every > (done - n) // every or done == module.cfg.max_iterations)

        if crossed(self.log_every) or done <= n:
            for item, rows in rows_of(self.pack):
                point = {k: float(v) for k, v in module.curves(rows).items()}
                max_its = item.cell.cfg.attack.max_iterations
                append_curves(item.cell, [{"group": item.group, "iteration": done, "step": item.group * max_its + done, **point}])
        if STOP.is_set() or crossed(self.every):
            for item, rows in rows_of(self.pack):
                if item.cell.checkpoint is not None:
                    item.cell.checkpoint.progress(item.group, state_rows(module.state, rows))
        if STOP.is_set():
            self.stopped = True
            trainer.should_stop = True


def describe(pack: list[Item]) -> str:
    counts: dict[str, int] = {}
    for item in pack:
        name = item.cell.cfg.attack.name.upper()
        counts[name] = counts.get(name, 0) + len(item.index)
    runs = len({id(i.cell) for i in pack})
    return f"{runs} run{'s' if runs > 1 else ''}: " + " ".join(f"{k}x{v}" for k, v in counts.items())


def fit(module: InvertingGradients, device: torch.device, *, title: str, progress: bool,
        callbacks: list[Callback] = ()) -> None:
    """Run `module`'s attack to its end (or a stop) under a Lightning Trainer on `device`."""
    cfg = module.cfg
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress, num_sanity_val_steps=0,
        callbacks=([AttackProgressBar(title, refresh_rate=cfg.check_every)] if progress else []) + list(callbacks),
        plugins=[LightningEnvironment()],  # no SLURM auto-requeue inside Lightning: dia checkpoints itself
    )
    try:
        trainer.fit(module)
    except SIGTERMException:  # Lightning's own reaction to SIGTERM, after our callback saved and stopped
        pass


def attack(model: torch.nn.Module, problems: Any, cfg: Any, *, lower: torch.Tensor, upper: torch.Tensor,
           device: torch.device, progress: bool = False) -> AttackResult:
    """Attack `problems` with `cfg.attack` in memory (no run folder): for tests, benchmarks and notebooks."""
    module = ATTACKS.get(cfg.attack.name).for_problems(model, problems, cfg.attack, lower=lower, upper=upper)
    fit(module, device, title=cfg.attack.name.upper(), progress=progress)
    return module.result()


def run(pack: list[Item], *, progress: bool = True) -> list[AttackResult] | None:
    """Attack a pack; each item's result, or None when stopped by a signal (each item's rows are then saved
    in its run's checkpoint). Finished items are recorded in their runs' checkpoints."""
    cfg = pack[0].cell.cfg
    module = build(pack)
    every = cfg.run.checkpoint_every if cfg.run.checkpoint_every >= 0 else 0
    callbacks = PackCallbacks(pack, every, cfg.attack.log_every)
    fit(module, pack[0].cell.device, title=describe(pack), progress=progress, callbacks=[callbacks])
    if callbacks.stopped or STOP.is_set():
        return None
    results = module.results()
    for item, result in zip(pack, results):
        item.cell.checkpoint.finished(item.group, result)
    return results


def auto_limit(cells: list[Cell], *, total: int, headroom: float = 0.7) -> int:
    """How many problems of a CUDA program fit in `headroom` of the free memory (at most `total`).

    The memory of one problem is measured: the peak of one iteration of a two-problem pack of the first
    (prepared) runs' problems, minus what was allocated before, halved.
    """
    device = cells[0].device
    if total <= 1:
        return 1
    probe_items = []
    for cell in cells:  # one problem of each kind of run, two in all
        if len(probe_items) < 2:
            probe_items.append(Item(cell, 0, [0]))
    if len(probe_items) == 1 and cells[0].num_problems > 1:
        probe_items = [Item(cells[0], 0, [0, 1])]
    k = sum(len(i.index) for i in probe_items)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe = build([Item(i.cell, -1, i.index) for i in probe_items]).to(device)
    probe.on_fit_start()
    probe.gradient = getattr(probe.gradient, "fn", probe.gradient)  # eager: no compile just to measure
    probe.step()
    torch.cuda.synchronize(device)
    per_problem = max(1, (torch.cuda.max_memory_allocated(device) - base) / k)
    del probe
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    limit = max(1, min(total, int(headroom * free / per_problem)))
    log.info("attack.parallel=auto: %d problems at once (%.1f MiB each, %.1f GiB free on %s)",
             limit, per_problem / 2**20, free / 2**30, torch.cuda.get_device_name(device))
    return limit
