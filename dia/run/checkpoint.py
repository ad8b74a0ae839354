"""Resumable progress of one run: its finished groups' results and its running group's attack state.

A run's problems are attacked in groups (of at most `attack.parallel` problems); a group may share one
program with groups of other runs (a pack, dia.run.pack). Each run saves only its own rows, by trainable
name (`flat/x`, `exp_avg/mask/<site>`, ...), so a group resumes in any pack: trainables its attack does
not have (masks of another attack in the pack) start fresh and never influence its rows.

Saved as one flat dict of tensors (`torch.save`, loadable with `weights_only=True`), written atomically
in the run's `.partial` folder, with the fingerprint of the run's config (`dia.run.folder.fingerprint`)
and the wall time spent so far. A checkpoint is checked against the run whose folder holds it (the
`config.yaml` beside it) before anything uses it: unreadable, of another run, or inconsistent with the
run (group indices, iteration counters past the budget, shapes, dtypes, non-tensor values) is one
`UserError` naming the file, which is kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from dia.engine import STATUS, AttackResult, AttackState, Layout
from dia.errors import UserError
from dia.files import save_tensors
from dia.run import record
from dia.run.folder import fingerprint

WIDE = ("flat", "exp_avg", "exp_avg_sq", "best")  # the (K, D) fields, saved per trainable
NARROW = tuple(f.name for f in fields(AttackState) if f.name not in (*WIDE, "layout", "iteration"))  # (K,) fields
INTEGER = ("plateau_bad", "best_iteration", "since_best", "iterations", "status", "iteration")  # int64; the rest float


class Rows(dict):
    """A saved row block (`state_rows`) that knows the checkpoint file it came from (for messages)."""

    source: Path | None = None


@dataclass
class Expect:
    """What a run's config says its checkpoint must look like."""

    problems: int  # client gradients (victims / batch_size)
    x_shape: tuple[int, ...]  # one problem's dummies: (B, C, H, W)
    max_iterations: int
    fingerprint: str
    starts: int = 1  # rows per problem of the running group's state (attack.restarts)

    @classmethod
    def of(cls, config: Path) -> Expect | None:
        """From the run's saved config.yaml (None when it cannot be read: the checks that need it are skipped)."""
        try:
            text = record.read_config_text(config.parent)
            c = yaml.safe_load(text)
            n = len(c["victims"]) if c.get("victims") is not None else int(c["num_victims"])
            b = int(c["batch_size"])
            return cls(
                n // b,
                (b, int(c["data"]["channels"]), int(c["data"]["image_size"]), int(c["data"]["image_size"])),
                int(c["attack"]["max_iterations"]),
                fingerprint(text),
                int(c["attack"].get("restarts", 1) or 1),
            )
        except Exception:
            return None


class Checkpoint:
    """What a run has finished (per group of problems) and where its running group stands."""

    def __init__(self, path: Path, *, persist: bool = True) -> None:
        self.path, self.persist = path, persist  # persist=False (run.checkpoint_every=-1): kept in memory only
        self.group_size: int | None = None
        self.done: dict[int, AttackResult] = {}
        self.running: int | None = None
        self.state: dict[str, Tensor] | None = None  # the running group's rows (see `state_rows`)
        self.started = time.time()
        self.elapsed_before = 0.0  # wall time of the processes that worked on the run before this one
        self.expect = Expect.of(path.parent / record.CONFIG)
        if not persist:
            return
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise self._bad("is not a regular file")
        if path.is_file():
            try:
                flat = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise self._bad(
                    f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
                ) from None
            self._load(flat)

    def _bad(self, why: str) -> UserError:
        return UserError(
            f"checkpoint '{self.path}' {why}; it is kept: delete it to restart this run from iteration 0: "
            f"rm '{self.path}'"
        )

    def elapsed(self) -> float:
        """Wall time spent on the run so far, over every process that worked on it (seconds)."""
        return self.elapsed_before + time.time() - self.started

    @property
    def iteration(self) -> int:
        """The iteration the running group resumes at (0 when none is running)."""
        return 0 if self.state is None else int(self.state["iteration"])

    def _load(self, flat: Any) -> None:
        try:
            self._check(flat)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise self._bad(
                f"does not fit this run ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
            ) from None
        self.group_size = int(flat["meta/group_size"]) or None
        running = int(flat["meta/running"])
        self.running = None if running < 0 else running
        self.elapsed_before = float(flat["meta/elapsed_s"]) if "meta/elapsed_s" in flat else 0.0
        state = Rows({k[len("state/") :]: v for k, v in flat.items() if k.startswith("state/")})
        state.source = self.path
        self.state = state or None
        for c in {int(k.split("/")[1]) for k in flat if k.startswith("done/")}:
            p = f"done/{c}/"
            masks = {k[len(p + "masks/") :]: v for k, v in flat.items() if k.startswith(p + "masks/")}
            rates = {k[len(p + "rates/") :]: v for k, v in flat.items() if k.startswith(p + "rates/")}
            self.done[c] = AttackResult(
                x=flat[p + "x"],
                masks=masks or None,
                best_loss=flat[p + "best_loss"],
                best_iteration=flat[p + "best_iteration"],
                iterations=flat[p + "iterations"],
                status=[STATUS[int(s)] for s in flat[p + "status"]],
                rates=rates or None,
            )

    def _check(self, flat: Any) -> None:
        """Everything `_load` and a resume rely on, against the run's config: a UserError naming the file otherwise."""
        _Contents(flat, self.expect, self._bad).check()

    def save(self) -> None:
        if not self.persist:
            return
        flat: dict[str, Tensor] = {
            "meta/group_size": torch.tensor(self.group_size or 0),
            "meta/running": torch.tensor(-1 if self.running is None else self.running),
            "meta/elapsed_s": torch.tensor(self.elapsed(), dtype=torch.float64),
        }
        if self.expect is not None:
            flat["meta/fingerprint"] = torch.tensor(list(bytes.fromhex(self.expect.fingerprint)), dtype=torch.uint8)
        for c, r in self.done.items():
            p = f"done/{c}/"
            flat.update(
                {
                    p + "x": r.x,
                    p + "best_loss": r.best_loss,
                    p + "best_iteration": r.best_iteration,
                    p + "iterations": r.iterations,
                    p + "status": torch.tensor([STATUS.index(s) for s in r.status]),
                }
            )
            flat.update({f"{p}masks/{k}": v for k, v in (r.masks or {}).items()})
            flat.update({f"{p}rates/{k}": v for k, v in (r.rates or {}).items()})
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
    Adam moments: it belongs to another attack of the pack and never touches that block's rows. A saved
    trainable whose shape or dtype is not the module's is a UserError naming the block's checkpoint.
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
                mine = s.get(f"{wide}/{name}", fresh)
                if mine.shape != base.shape or mine.dtype != base.dtype:
                    where = getattr(s, "source", None)
                    raise UserError(
                        f"checkpoint '{where}' does not fit this run: '{wide}/{name}' is {mine.dtype} of shape "
                        f"{tuple(mine.shape)}, the attack has {base.dtype} of shape {tuple(base.shape)}; it is "
                        f"kept: delete it to restart this run from iteration 0: rm '{where}'"
                    )
                blocks.append(mine)
                start += k
            named[name] = torch.cat(blocks)
        out[wide] = layout.pack(named)
    return out


class _Contents:
    """The checks of a checkpoint's tensors (`flat`) against what its run's config `expect`s; `bad(why)` is the
    UserError naming the file. In order: the structure, the identity, the groups, each finished group, the
    running group's state, the metadata."""

    def __init__(self, flat: Any, expect: Expect | None, bad: Callable[[str], UserError]) -> None:
        self.flat, self.e, self.bad = flat, expect, bad

    def check(self) -> None:
        self.structure()
        self.identity()
        size, running, done_groups, has_state = self.groups()
        for g in done_groups:
            self.finished(g, self.rows(size, g))
        if has_state:
            k = self.rows(size, running)
            self.running_state(None if k is None else k * (self.e.starts if self.e is not None else 1))
        self.meta()

    def structure(self) -> None:
        flat, bad = self.flat, self.bad
        if not isinstance(flat, dict) or not all(isinstance(k, str) for k in flat):
            raise bad("is not a dia checkpoint (not a dict of named tensors)")
        odd = next((k for k, v in flat.items() if not isinstance(v, Tensor)), None)
        if odd is not None:
            raise bad(f"holds '{odd}', which is not a tensor")
        for key in ("meta/group_size", "meta/running"):
            if key not in flat or flat[key].dim() != 0 or flat[key].dtype != torch.int64:
                raise bad(f"has no integer '{key}'")
        unknown = next((k for k in flat if not k.startswith(("meta/", "done/", "state/"))), None)
        if unknown is not None:
            raise bad(f"holds an unknown entry '{unknown}'")

    def identity(self) -> None:
        if "meta/fingerprint" in self.flat and self.e is not None:
            fp = self.flat["meta/fingerprint"]
            if fp.dtype != torch.uint8 or bytes(fp.tolist()).hex() != self.e.fingerprint:
                raise self.bad(
                    "belongs to another run (its config differs from this folder's config.yaml: another seed, "
                    "data or attack setting)"
                )

    def groups(self) -> tuple[int, int, list[int], bool]:
        """(group size, the running group, the finished groups, whether a running state is saved), checked."""
        flat, bad = self.flat, self.bad
        size, running = int(flat["meta/group_size"]), int(flat["meta/running"])
        n = self.e.problems if self.e is not None else None
        done = {k.split("/")[1] for k in flat if k.startswith("done/")}
        if not all(d.isdigit() and len(d) < 10 for d in done):
            raise bad("has a finished group that is not numbered")
        done_groups = sorted(int(d) for d in done)
        has_state = any(k.startswith("state/") for k in flat)
        if size == 0 and (done_groups or has_state or running >= 0):
            raise bad("has progress but no group size")
        if size < 0 or (n is not None and size > n):
            raise bad(f"has group size {size} for a run of {n} problem(s)")
        groups = math.ceil(n / size) if n is not None and size > 0 else None
        if running < -1 or (groups is not None and running >= groups) or running in done_groups:
            raise bad(
                f"says group {running} is running (the run has {groups} group(s), finished: {done_groups or 'none'})"
            )
        if (running >= 0) != has_state:
            raise bad("has a running group without its state (or a state without a running group)")
        if groups is not None and any(g >= groups for g in done_groups):
            raise bad(f"has finished group {max(done_groups)}; the run has {groups} group(s)")
        return size, running, done_groups, has_state

    def rows(self, size: int, g: int) -> int | None:
        """The problems of group `g` (None: unknown)."""
        n = self.e.problems if self.e is not None else None
        return None if n is None or size == 0 else min(size, n - g * size)

    def tensor(self, key: str, k: int | None, *, integer: bool, shape: tuple[int, ...] | None = ()) -> Tensor:
        """flat[key]: int64 or floating point, one row per problem (k of them), each of `shape` (None: any)."""
        t, bad = self.flat.get(key), self.bad
        if t is None:
            raise bad(f"has no '{key}'")
        if integer and t.dtype != torch.int64 or not integer and not t.is_floating_point():
            raise bad(f"holds '{key}' as {t.dtype} (expected {'int64' if integer else 'floating point'})")
        if t.dim() < 1 or k is not None and t.shape[0] != k:
            raise bad(f"holds '{key}' of shape {tuple(t.shape)}; this group has {k} problem(s)")
        if shape is not None and tuple(t.shape[1:]) != tuple(shape):
            raise bad(f"holds '{key}' of shape {tuple(t.shape)}; this run expects ({k}, {', '.join(map(str, shape))})")
        return t

    def counters(self, prefix: str, k: int | None) -> None:
        budget = self.e.max_iterations if self.e is not None else None
        its = self.tensor(prefix + "iterations", k, integer=True)
        if its.numel() and (int(its.min()) < 0 or budget is not None and int(its.max()) > budget):
            raise self.bad(
                f"holds iteration counters {int(its.min())}..{int(its.max())} outside 0..{budget} "
                "(attack.max_iterations)"
            )
        status = self.tensor(prefix + "status", k, integer=True)
        if status.numel() and not 0 <= int(status.min()) <= int(status.max()) < len(STATUS):
            raise self.bad(f"holds a status outside 0..{len(STATUS) - 1}")
        self.tensor(prefix + "best_iteration", k, integer=True)
        self.tensor(prefix + "best_loss", k, integer=False)

    def finished(self, g: int, k: int | None) -> None:
        p, x_shape = f"done/{g}/", self.e.x_shape if self.e is not None else None
        self.tensor(p + "x", k, integer=False, shape=x_shape)
        self.counters(p, k)
        for key in (k_ for k_ in self.flat if k_.startswith((p + "masks/", p + "rates/"))):
            self.tensor(key, k, integer=False, shape=None)
        known = ("x", "best_loss", "best_iteration", "iterations", "status")
        extra = next(
            (
                key
                for key in self.flat
                if key.startswith(p) and key[len(p) :] not in known and not key.startswith((p + "masks/", p + "rates/"))
            ),
            None,
        )
        if extra:
            raise self.bad(f"holds an unknown entry '{extra}'")

    def running_state(self, k: int | None) -> None:
        flat, bad, x_shape = self.flat, self.bad, self.e.x_shape if self.e is not None else None
        self.counters("state/", k)
        for name in NARROW:
            self.tensor(f"state/{name}", k, integer=name in INTEGER)
        it = flat.get("state/iteration")
        if it is None or it.dim() != 0 or it.dtype != torch.int64:
            raise bad("has no integer 'state/iteration'")
        top = int(flat["state/iterations"].max()) if flat["state/iterations"].numel() else 0
        if int(it) != top:
            raise bad(f"says the running group is at iteration {int(it)} but its problems ran {top}")
        for wide in WIDE:
            self.tensor(f"state/{wide}/x", k, integer=False, shape=x_shape)
        for key in flat:
            rest = key[len("state/") :]
            if key.startswith("state/") and "/" in rest:
                if rest.split("/")[0] not in WIDE:
                    raise bad(f"holds an unknown entry '{key}'")
                self.tensor(key, k, integer=False, shape=None)
            elif key.startswith("state/") and rest not in (*NARROW, "iteration"):
                raise bad(f"holds an unknown entry '{key}'")

    def meta(self) -> None:
        key = "meta/elapsed_s"
        t = self.flat.get(key)
        if t is not None and (t.dim() != 0 or not t.is_floating_point() or not 0 <= float(t) < 1e12):
            raise self.bad(f"holds '{key}' that is not a number of seconds")
