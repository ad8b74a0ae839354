"""The optimization state of K independent attack problems, and one vectorized update step.

Everything per problem lives in tensors with a leading K dimension: the trainable tensors (dummies and,
for DIA, mask parameters), Adam moments, a per-problem learning rate (ReduceLROnPlateau), early-stopping
counters and the best iterate. One `advance` call updates all problems without Python loops over them
and without host synchronisation, so results do not depend on how problems are grouped: a problem that
converges, stops or diverges is frozen while the others go on.

We deliberately do not use `torch.optim.Adam` / `ReduceLROnPlateau`: they hold one learning rate per
parameter group, and here every problem needs its own schedule. The arithmetic follows torch's Adam and
ReduceLROnPlateau (mode 'min', relative threshold 1e-4) exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

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


@dataclass
class AttackState:
    """The whole attack state for K problems: enough to checkpoint and resume bit for bit."""

    params: dict[str, Tensor]  # trainables, (K, ...) leaves that require grad
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    best: dict[str, Tensor]  # best iterate of each trainable
    lr: Tensor  # (K,)
    plateau_best: Tensor  # (K,)
    plateau_bad: Tensor  # (K,) iterations without plateau improvement
    best_loss: Tensor  # (K,)
    best_iteration: Tensor  # (K,)
    since_best: Tensor  # (K,) iterations without improvement (early stopping)
    last_loss: Tensor  # (K,)
    iterations: Tensor  # (K,) iterations each problem ran
    status: Tensor  # (K,) index into STATUS
    iteration: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))  # global step

    @classmethod
    def create(cls, params: dict[str, Tensor], lr: float) -> "AttackState":
        k = next(iter(params.values())).shape[0]
        device = next(iter(params.values())).device
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        inf = torch.full((k,), float("inf"), device=device)
        zeros = torch.zeros(k, dtype=torch.long, device=device)
        return cls(
            params=leaves,
            exp_avg={n: torch.zeros_like(p) for n, p in params.items()},
            exp_avg_sq={n: torch.zeros_like(p) for n, p in params.items()},
            best={n: p.detach().clone() for n, p in params.items()},
            lr=torch.full((k,), float(lr), device=device),
            plateau_best=inf.clone(), plateau_bad=zeros.clone(), best_loss=inf.clone(),
            best_iteration=zeros.clone(), since_best=zeros.clone(), last_loss=inf.clone(),
            iterations=zeros.clone(), status=zeros.clone(),
            iteration=torch.zeros((), dtype=torch.long, device=device),
        )

    @property
    def num_problems(self) -> int:
        return self.lr.shape[0]

    @property
    def active(self) -> Tensor:
        return self.status == RUNNING

    def as_dict(self) -> dict[str, Tensor]:
        """Flat name -> tensor dict (safe for `torch.save`, loadable with `weights_only=True`)."""
        out: dict[str, Tensor] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                out.update({f"{f.name}/{n}": t.detach().cpu() for n, t in value.items()})
            else:
                out[f.name] = value.detach().cpu()
        return out

    @classmethod
    def from_dict(cls, flat: dict[str, Tensor], device: torch.device | str = "cpu") -> "AttackState":
        kwargs: dict = {}
        for f in fields(cls):
            prefix = f"{f.name}/"
            group = {k[len(prefix):]: v.to(device) for k, v in flat.items() if k.startswith(prefix)}
            kwargs[f.name] = group if group or f.name in ("params", "exp_avg", "exp_avg_sq", "best") else flat[f.name].to(device)
        kwargs["params"] = {n: p.clone().requires_grad_(True) for n, p in kwargs["params"].items()}
        return cls(**kwargs)


def _rows(flag: Tensor, like: Tensor) -> Tensor:
    """Broadcast a (K,) flag over a (K, ...) tensor."""
    return flag.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def advance(
    state: AttackState,
    losses: Tensor,
    grads: dict[str, Tensor],
    schedule: Schedule,
    project: Callable[[dict[str, Tensor]], None],
) -> None:
    """One iteration for all running problems, given their losses (K,) and gradients at `state.params`.

    Order as in the paper's code: keep the best iterate, (signed) Adam step, projection onto the valid
    set, plateau schedule, stopping rules. Problems that are not running are left untouched.
    """
    i = state.iteration
    running = state.active
    finite = torch.isfinite(losses)
    step = running & finite

    improved = step & (losses < state.best_loss)
    for name, p in state.params.items():
        state.best[name] = torch.where(_rows(improved, p), p.detach(), state.best[name])
    state.best_loss = torch.where(improved, losses, state.best_loss)
    state.best_iteration = torch.where(improved, i, state.best_iteration)
    state.since_best = torch.where(improved, 0, state.since_best + step.long())
    state.last_loss = torch.where(running, losses, state.last_loss)

    # Adam (torch.optim.Adam's arithmetic) with a per-problem learning rate; all running problems have
    # taken the same number of steps, i + 1.
    b1, b2 = schedule.betas
    t = (i + 1).to(state.lr.dtype)
    bias1, bias2 = 1 - b1**t, 1 - b2**t
    for name, p in state.params.items():
        g = grads[name]
        if name in schedule.signed:
            g = g.sign()
        rows = _rows(step, p)
        m = torch.where(rows, state.exp_avg[name] * b1 + g * (1 - b1), state.exp_avg[name])
        v = torch.where(rows, state.exp_avg_sq[name] * b2 + g * g * (1 - b2), state.exp_avg_sq[name])
        state.exp_avg[name], state.exp_avg_sq[name] = m, v
        denom = v.sqrt() / bias2.sqrt() + schedule.eps
        update = _rows(state.lr / bias1, p) * m / denom
        p.sub_(torch.where(rows, update, torch.zeros((), device=p.device)))
    project(state.params)

    # ReduceLROnPlateau(mode='min', threshold_mode='rel'), stepped on the loss of this iteration.
    better = step & (losses < state.plateau_best * (1 - schedule.plateau_threshold))
    state.plateau_best = torch.where(better, losses, state.plateau_best)
    state.plateau_bad = torch.where(better, 0, state.plateau_bad + (step & ~better).long())
    reduce = step & (state.plateau_bad > schedule.lr_patience)
    reduce = reduce & (state.lr * (1 - schedule.lr_factor) > 1e-8)  # torch's eps on the lr change
    state.lr = torch.where(reduce, state.lr * schedule.lr_factor, state.lr)
    state.plateau_bad = torch.where(step & (state.plateau_bad > schedule.lr_patience), 0, state.plateau_bad)

    # Stopping rules, most specific first.
    state.iterations = torch.where(running, i + 1, state.iterations)
    status = state.status
    status = torch.where(running & (i + 1 >= schedule.max_iterations), MAX_ITERATIONS, status)
    status = torch.where(running & (state.since_best >= schedule.early_stop_patience), EARLY_STOPPED, status)
    status = torch.where(running & (state.best_loss < schedule.loss_threshold), CONVERGED, status)
    status = torch.where(running & ~finite, DIVERGED, status)
    state.status = status
    state.iteration = i + 1
