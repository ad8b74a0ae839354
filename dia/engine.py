"""The optimization state of K independent attack problems, and one vectorized update step.

All trainables of a problem (its dummies and, for DIA, mask parameters) live side by side in one row of a
flat (K, D) leaf tensor; `Layout` gives named views of it. Adam moments, the best iterate and every
per-problem counter (learning rate for ReduceLROnPlateau, early stopping, status) are tensors with a
leading K dimension. One `advance` call updates all problems with a few dozen tensor operations, no
Python loops over problems or parameters and no host synchronisation, so results do not depend on how
problems are grouped: a problem that converges, stops or diverges is frozen while the others go on.

We deliberately do not use `torch.optim.Adam` / `ReduceLROnPlateau`: they hold one learning rate per
parameter group, and here every problem needs its own schedule. The arithmetic follows torch's Adam and
ReduceLROnPlateau (mode 'min', relative threshold 1e-4) exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

STATUS = ("running", "converged", "early_stopped", "max_iterations", "diverged")
RUNNING, CONVERGED, EARLY_STOPPED, MAX_ITERATIONS, DIVERGED = range(len(STATUS))


@dataclass(frozen=True)
class Schedule:
    """Optimizer, learning-rate schedule and stopping rules (the paper's defaults)."""

    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    signed: frozenset[str] = frozenset({"x"})  # trainables whose gradient is replaced by its sign
    lr_factor: float = 0.1
    lr_patience: int = 800
    plateau_threshold: float = 1e-4
    early_stop_patience: int = 4000
    loss_threshold: float = 1e-5
    max_iterations: int = 20000
    # Which iterate an improving loss keeps: "after_step" (the paper's code: the iterate the step produced
    # from the one whose loss improved) or "at_loss" (the iterate the loss was computed at).
    best_iterate: str = "after_step"


@dataclass(frozen=True)
class Layout:
    """Names and per-problem shapes of the trainables packed into one row of the flat buffer."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, tensors: dict[str, Tensor]) -> Layout:
        return cls(tuple((n, tuple(t.shape[1:])) for n, t in tensors.items()))

    def spans(self) -> list[tuple[str, tuple[int, ...], int, int]]:
        out, start = [], 0
        for name, shape in self.shapes:
            size = math.prod(shape)
            out.append((name, shape, start, start + size))
            start += size
        return out

    def pack(self, tensors: dict[str, Tensor]) -> Tensor:
        return torch.cat([tensors[n].flatten(1) for n, _ in self.shapes], dim=1)

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: flat[:, a:b].view(flat.shape[0], *shape) for n, shape, a, b in self.spans()}

    def columns(self, names: frozenset[str], device: torch.device | str) -> Tensor:
        """A (D,) bool mask of the columns that belong to `names`."""
        cols = torch.zeros(self.spans()[-1][3], dtype=torch.bool)
        for n, _, a, b in self.spans():
            cols[a:b] = n in names
        return cols.to(device)


@dataclass
class AttackState:
    """The whole attack state for K problems: enough to checkpoint and resume bit for bit."""

    flat: Tensor  # (K, D) trainables, a leaf that requires grad
    exp_avg: Tensor  # (K, D)
    exp_avg_sq: Tensor  # (K, D)
    best: Tensor  # (K, D) best iterate
    lr: Tensor  # (K,)
    plateau_best: Tensor  # (K,)
    plateau_bad: Tensor  # (K,) iterations without plateau improvement
    best_loss: Tensor  # (K,)
    best_iteration: Tensor  # (K,)
    since_best: Tensor  # (K,) iterations without improvement (early stopping)
    last_loss: Tensor  # (K,)
    iterations: Tensor  # (K,) iterations each problem ran (its own step count: problems may start at different times)
    status: Tensor  # (K,) index into STATUS
    iteration: Tensor  # () steps the program ran (problems count their own: `iterations`)
    layout: Layout

    @classmethod
    def create(cls, params: dict[str, Tensor], lr: float) -> AttackState:
        layout = Layout.of(params)
        flat = layout.pack(params).detach().clone()
        k, device = flat.shape[0], flat.device
        inf = torch.full((k,), float("inf"), device=device)
        zeros = torch.zeros(k, dtype=torch.long, device=device)
        return cls(
            flat=flat.requires_grad_(True),
            exp_avg=torch.zeros_like(flat),
            exp_avg_sq=torch.zeros_like(flat),
            best=flat.detach().clone(),
            lr=torch.full((k,), float(lr), device=device),
            plateau_best=inf.clone(),
            plateau_bad=zeros.clone(),
            best_loss=inf.clone(),
            best_iteration=zeros.clone(),
            since_best=zeros.clone(),
            last_loss=inf.clone(),
            iterations=zeros.clone(),
            status=zeros.clone(),
            iteration=torch.zeros((), dtype=torch.long, device=device),
            layout=layout,
        )

    @property
    def params(self) -> dict[str, Tensor]:
        """Named (K, ...) views of the trainables (differentiable through `flat`)."""
        return self.layout.views(self.flat)

    @property
    def best_params(self) -> dict[str, Tensor]:
        return self.layout.views(self.best)

    @property
    def num_problems(self) -> int:
        return self.lr.shape[0]

    @property
    def active(self) -> Tensor:
        return self.status == RUNNING

    def as_dict(self) -> dict[str, Tensor]:
        """Flat name -> tensor dict (safe for `torch.save`, loadable with `weights_only=True`)."""
        return {f.name: getattr(self, f.name).detach().cpu() for f in fields(self) if f.name != "layout"}

    def put(self, rows: Tensor, other: AttackState) -> None:
        """Overwrite rows `rows` (an index) with all rows of `other` (same layout): a problem enters a slot."""
        for f in fields(self):
            if f.name not in ("layout", "iteration"):
                getattr(self, f.name).data[rows] = getattr(other, f.name).detach().to(self.flat.device)

    @classmethod
    def from_dict(cls, saved: dict[str, Tensor], layout: Layout, device: torch.device | str = "cpu") -> AttackState:
        kwargs = {f.name: saved[f.name].to(device) for f in fields(cls) if f.name != "layout"}
        kwargs["flat"] = kwargs["flat"].clone().requires_grad_(True)
        return cls(layout=layout, **kwargs)


def _rows(flag: Tensor) -> Tensor:
    """A (K,) tensor as a (K, 1) column, to broadcast over (K, D)."""
    return flag.unsqueeze(1)


@torch.no_grad()
def advance(
    state: AttackState,
    losses: Tensor,
    grad: Tensor,
    schedule: Schedule,
    project: Callable[[dict[str, Tensor]], None],
    signed_columns: Tensor | None = None,
) -> None:
    """One iteration for all running problems, given their losses (K,) and the gradient (K, D) at `state.flat`.

    Order as in the paper's code: note an improved loss, (signed) Adam step, projection onto the valid
    set, keep the best iterate (by default the projected iterate after the improving step, as the paper's
    code does; `schedule.best_iterate="at_loss"` keeps the one the loss was measured at), plateau
    schedule, stopping rules. Problems that are not running are left untouched.
    `signed_columns` (D,) marks the columns whose gradient is replaced by its sign (default: from
    `schedule.signed`).
    """
    i = state.iterations  # each problem's own step count (equal for problems that started together)
    running = state.active
    finite = torch.isfinite(losses)
    step = running & finite

    improved = step & (losses < state.best_loss)
    if schedule.best_iterate == "at_loss":
        state.best = torch.where(_rows(improved), state.flat.detach(), state.best)
    state.best_loss = torch.where(improved, losses, state.best_loss)
    state.best_iteration = torch.where(improved, i, state.best_iteration)
    state.since_best = torch.where(improved, 0, state.since_best + step.long())
    state.last_loss = torch.where(running, losses, state.last_loss)

    # Adam (torch.optim.Adam's arithmetic) with a per-problem learning rate and step count i + 1.
    if signed_columns is None:
        signed_columns = state.layout.columns(schedule.signed, grad.device)
    g = torch.where(signed_columns, grad.sign(), grad)
    b1, b2 = schedule.betas
    t = (i + 1).to(state.lr.dtype)
    bias1, bias2 = 1 - b1**t, 1 - b2**t
    rows = _rows(step)
    state.exp_avg = torch.where(rows, state.exp_avg * b1 + g * (1 - b1), state.exp_avg)
    state.exp_avg_sq = torch.where(rows, state.exp_avg_sq * b2 + g * g * (1 - b2), state.exp_avg_sq)
    denom = state.exp_avg_sq.sqrt() / _rows(bias2.sqrt()) + schedule.eps
    update = _rows(state.lr / bias1) * state.exp_avg / denom
    state.flat.sub_(torch.where(rows, update, 0.0))
    project(state.params)
    if schedule.best_iterate == "after_step":
        state.best = torch.where(_rows(improved), state.flat.detach(), state.best)

    # ReduceLROnPlateau(mode='min', threshold_mode='rel'), stepped on the loss of this iteration.
    better = step & (losses < state.plateau_best * (1 - schedule.plateau_threshold))
    state.plateau_best = torch.where(better, losses, state.plateau_best)
    bad = torch.where(better, 0, state.plateau_bad + (step & ~better).long())
    over = step & (bad > schedule.lr_patience)
    reduce = over & (state.lr * (1 - schedule.lr_factor) > 1e-8)  # torch's eps on the lr change
    state.lr = torch.where(reduce, state.lr * schedule.lr_factor, state.lr)
    state.plateau_bad = torch.where(over, 0, bad)

    # Stopping rules, most specific last (it wins).
    state.iterations = torch.where(running, i + 1, state.iterations)
    status = state.status
    status = torch.where(running & (i + 1 >= schedule.max_iterations), MAX_ITERATIONS, status)
    status = torch.where(running & (state.since_best >= schedule.early_stop_patience), EARLY_STOPPED, status)
    status = torch.where(running & (state.best_loss < schedule.loss_threshold), CONVERGED, status)
    status = torch.where(running & ~finite, DIVERGED, status)
    state.status = status
    state.iteration = state.iteration + 1


@dataclass
class AttackResult:
    """Best iterate and bookkeeping per problem (all on CPU): what an attack hands back, and what a checkpoint keeps."""

    x: Tensor  # (K, B, C, H, W) normalized
    masks: dict[str, Tensor] | None  # recovered masks (K, B, ...) for attacks that optimize them
    best_loss: Tensor
    best_iteration: Tensor
    iterations: Tensor
    status: list[str]
    rates: dict[str, Tensor] | None = None  # learned dropout rates (K,) per site, for attacks that learn them

    def take(self, index: Tensor) -> AttackResult:
        """The problems `index` (a (n,) index) of this result, in that order."""
        idx = index.cpu()
        return AttackResult(
            x=self.x[idx],
            masks=None if self.masks is None else {k: v[idx] for k, v in self.masks.items()},
            best_loss=self.best_loss[idx],
            best_iteration=self.best_iteration[idx],
            iterations=self.iterations[idx],
            status=[self.status[int(i)] for i in idx],
            rates=None if self.rates is None else {k: v[idx] for k, v in self.rates.items()},
        )

    @classmethod
    def cat(cls, parts: list[AttackResult]) -> AttackResult:
        """Several results of consecutive problems as one."""
        return cls(
            x=torch.cat([p.x for p in parts]),
            masks=None
            if parts[0].masks is None
            else {k: torch.cat([p.masks[k] for p in parts]) for k in parts[0].masks},
            best_loss=torch.cat([p.best_loss for p in parts]),
            best_iteration=torch.cat([p.best_iteration for p in parts]),
            iterations=torch.cat([p.iterations for p in parts]),
            status=[s for p in parts for s in p.status],
            rates=None
            if parts[0].rates is None
            else {k: torch.cat([p.rates[k] for p in parts]) for k in parts[0].rates},
        )
