"""Resumable progress of one run: its finished groups' results and its running group's attack state.

A run's problems are attacked in groups (of at most `attack.parallel` problems); a group may share one
program with groups of other runs (a pack, dia.run.pack). Each run saves only its own rows, by trainable
name (`flat/x`, `exp_avg/mask/<site>`, ...), so a group resumes in any pack: trainables its attack does
not have (masks of another attack in the pack) start fresh and never influence its rows.

Saved as one flat dict of tensors (`torch.save`, loadable with `weights_only=True`), written atomically
in the run's `.partial` folder. A checkpoint that cannot be read is reported in one line that names it.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from torch import Tensor

from dia.engine import STATUS, AttackResult, AttackState, Layout
from dia.errors import UserError
from dia.run.files import save_tensors

WIDE = ("flat", "exp_avg", "exp_avg_sq", "best")  # the (K, D) fields, saved per trainable


class Checkpoint:
    """What a run has finished (per group of problems) and where its running group stands."""

    def __init__(self, path: Path, *, persist: bool = True) -> None:
        self.path, self.persist = path, persist  # persist=False (run.checkpoint_every=-1): kept in memory only
        self.group_size: int | None = None
        self.done: dict[int, AttackResult] = {}
        self.running: int | None = None
        self.state: dict[str, Tensor] | None = None  # the running group's rows (see `state_rows`)
        if persist and path.is_file():
            try:
                self._load(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as exc:  # noqa: BLE001 - truncated, corrupt, or not ours
                raise UserError(f"checkpoint '{path}' cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                                f"delete it to restart this run from iteration 0: rm '{path}'") from None

    @property
    def iteration(self) -> int:
        """The iteration the running group resumes at (0 when none is running)."""
        return 0 if self.state is None else int(self.state["iteration"])

    def _load(self, flat: dict[str, Tensor]) -> None:
        self.group_size = int(flat["meta/group_size"]) or None
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
        if not self.persist:
            return
        flat: dict[str, Tensor] = {
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

    def progress(self, group: int, rows: dict[str, Tensor]) -> None:
        self.running, self.state = group, rows
        self.save()

    def finished(self, group: int, result: AttackResult) -> None:
        self.done[group] = result
        self.running, self.state = None, None
        self.save()


def state_rows(state: AttackState, rows: slice) -> dict[str, Tensor]:
    """Rows `rows` of an attack state, the (K, D) fields split by trainable name (composition-independent)."""
    out: dict[str, Tensor] = {}
    for f in fields(state):
        if f.name == "layout":
            continue
        value = getattr(state, f.name).detach()
        if f.name == "iteration":  # the rows' own: where they resume
            out[f.name] = state.iterations[rows].max().cpu().clone()
        elif f.name in WIDE:
            out.update({f"{f.name}/{n}": t.cpu().clone() for n, t in state.layout.views(value[rows]).items()})
        else:
            out[f.name] = value[rows].cpu().clone()
    return out


def join_rows(saved: list[dict[str, Tensor]], layout: Layout, initial: dict[str, Tensor]) -> dict[str, Tensor]:
    """An `AttackState.as_dict()` for a module of `layout` from consecutive saved row blocks (`state_rows`).

    A trainable a block did not save starts from `initial` (the module's initial parameters) with zero
    Adam moments: it belongs to another attack of the pack and never touches that block's rows.
    """
    sizes = [int(s["lr"].shape[0]) for s in saved]
    out: dict[str, Tensor] = {"iteration": torch.stack([s["iteration"] for s in saved]).max()}
    narrow = [k for k in saved[0] if "/" not in k and k != "iteration"]
    out.update({k: torch.cat([s[k] for s in saved]) for k in narrow})
    for wide in WIDE:
        named: dict[str, Tensor] = {}
        for name, _ in layout.shapes:
            blocks, start = [], 0
            for s, k in zip(saved, sizes):
                base = initial[name][start : start + k].cpu()
                fresh = base if wide in ("flat", "best") else torch.zeros_like(base)
                blocks.append(s.get(f"{wide}/{name}", fresh))
                start += k
            named[name] = torch.cat(blocks)
        out[wide] = layout.pack(named)
    return out
