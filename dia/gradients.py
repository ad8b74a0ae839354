"""The shared gradient as a function of (inputs, masks): the client's and the attacker's view of it.

`client_gradients` is what a client sends: a normal stochastic training step (model in train mode,
dropout drawn at random and recorded). `problem_gradients` is the attacker's differentiable model of it
for K independent problems at once: `vmap(grad(loss))` over the problems, so one program serves any K
and the outer autograd graph reaches the dummy inputs and mask parameters.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dia.models.dropout import Mode, dropout_control


def client_gradients(
    model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One client's shared gradient on batch (x, y) with dropout active, and the masks it drew."""
    model.train()
    params = dict(model.named_parameters())
    with dropout_control(model, "record", generator=generator) as ctl:
        loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return {n: g.detach() for n, g in zip(params, grads)}, {k: v.detach() for k, v in ctl.masks.items()}


def problem_gradients(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    masks: Mapping[str, Tensor] | None,
    mode: Mode,
) -> dict[str, Tensor]:
    """Parameter gradients for K problems: x (K, B, ...), y (K, B), masks {site: (K, B, ...)} -> {name: (K, ...)}.

    Differentiable w.r.t. `x` and `masks` (create-graph semantics), not w.r.t. `params`.
    """
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xk: Tensor, yk: Tensor, mk: dict[str, Tensor]) -> Tensor:
        with dropout_control(model, mode, dict(mk)):
            out = functional_call(model, (p, buffers), (xk,))
        return F.cross_entropy(out, yk)

    masks = dict(masks or {})
    if type(model) not in _SEQUENTIAL:
        try:
            return vmap(grad(loss), in_dims=(None, 0, 0, 0 if masks else None))(dict(params), x, y, masks)
        except (RuntimeError, NotImplementedError) as exc:  # an operation vmap cannot batch
            _SEQUENTIAL.add(type(model))
            warnings.warn(f"{type(model).__name__} cannot be vectorized over problems ({str(exc).splitlines()[0][:120]}); "
                          "attacking its problems one after another", stacklevel=2)
    per_problem = [grad(loss)(dict(params), x[k], y[k], {n: m[k] for n, m in masks.items()}) for k in range(x.shape[0])]
    return {n: torch.stack([g[n] for g in per_problem]) for n in per_problem[0]}


_SEQUENTIAL: set[type] = set()  # model classes found not to vmap: the sequential path, with one notice
