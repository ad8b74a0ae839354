"""Resumable progress of a run: the finished groups' results and the running group's attack state.

Saved as one flat dict of tensors (`torch.save`, loadable with `weights_only=True`), written atomically,
in the run's unfinished (`.partial`) folder. A SIGUSR1 or SIGTERM (a cluster's warning before its time
limit or a preemption) makes the attack save at the end of the current step and stop; rerunning the same
command (same `run.name`) resumes from there.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from dia.attacks import AttackResult
from dia.engine import STATUS
from dia.results import save_tensors

STOP = threading.Event()  # set by the signal handler: checkpoint and stop at the next step


class Preempted(Exception):
    """The run saved a checkpoint and stopped early on a signal; rerun it to resume."""


def install_signal_handlers() -> None:
    """SIGUSR1 / SIGTERM ask the running attack to checkpoint and stop (the process then exits)."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda *_: STOP.set())


class Checkpoint:
    """What a run has finished (per group of problems) and where the running group stands."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.group_size: int | None = None
        self.done: dict[int, AttackResult] = {}
        self.running: int | None = None
        self.state: dict[str, torch.Tensor] | None = None
        if path.is_file():
            self._load(torch.load(path, map_location="cpu", weights_only=True))

    def _load(self, flat: dict[str, torch.Tensor]) -> None:
        self.group_size = int(flat["meta/group_size"])
        running = int(flat["meta/running"])
        self.running = None if running < 0 else running
        self.state = {k[len("state/"):]: v for k, v in flat.items() if k.startswith("state/")} or None
        for c in {int(k.split("/")[1]) for k in flat if k.startswith("done/")}:
            p = f"done/{c}/"
            masks = {k[len(p + "masks/"):]: v for k, v in flat.items() if k.startswith(p + "masks/")}
            self.done[c] = AttackResult(
                x=flat[p + "x"], masks=masks or None, best_loss=flat[p + "best_loss"],
                best_iteration=flat[p + "best_iteration"], iterations=flat[p + "iterations"],
                status=[STATUS[int(s)] for s in flat[p + "status"]],
            )

    def save(self) -> None:
        flat: dict[str, torch.Tensor] = {
            "meta/group_size": torch.tensor(self.group_size or 0),
            "meta/running": torch.tensor(-1 if self.running is None else self.running),
        }
        for c, r in self.done.items():
            p = f"done/{c}/"
            flat.update({p + "x": r.x, p + "best_loss": r.best_loss, p + "best_iteration": r.best_iteration,
                         p + "iterations": r.iterations, p + "status": torch.tensor([STATUS.index(s) for s in r.status])})
            flat.update({f"{p}masks/{k}": v for k, v in (r.masks or {}).items()})
        if self.state is not None:
            flat.update({f"state/{k}": v for k, v in self.state.items()})
        save_tensors(self.path, flat)

    def progress(self, group: int, state: dict[str, torch.Tensor]) -> None:
        self.running, self.state = group, state
        self.save()

    def finished(self, group: int, result: AttackResult) -> None:
        self.done[group] = result
        self.running, self.state = None, None
        self.save()


class CheckpointEvery(Callback):
    """Save the running group's state every `every` iterations, and on a stop signal save and stop."""

    def __init__(self, checkpoint: Checkpoint, group: int, every: int) -> None:
        self.checkpoint, self.group, self.every = checkpoint, group, every
        self.preempted = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = pl_module.cfg.iterations_per_step
        due = self.every > 0 and pl_module.done // self.every > (pl_module.done - n) // self.every
        if STOP.is_set() or due:
            self.checkpoint.progress(self.group, pl_module.state.as_dict())
        if STOP.is_set():
            self.preempted = True
            trainer.should_stop = True
