"""The shared gradient as a function of (inputs, masks): the client's and the attacker's view of it.

`client_gradients` is what a client sends: a normal stochastic training step (model in train mode,
dropout drawn at random and recorded); `client_update` is a FedAvg client's T local steps. `problem_gradients`
is the attacker's differentiable model of either for K independent problems at once: `vmap(grad(loss))` over
the problems (unrolled over the T local steps for FedAvg), so one program serves any K and the outer
autograd graph reaches the dummy inputs and mask parameters.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dia.models.batchnorm import batch_statistics, shares_statistics
from dia.models.dropout import Mode, dropout_control

if TYPE_CHECKING:
    from dia.problems import LocalTraining


def client_gradients(
    model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One client's shared gradient on batch (x, y) with dropout active, and the masks it drew. A model whose
    BatchNorm statistics the server learns (dia.models.batchnorm) adds them: entries `bn/<layer>/mean|var`."""
    model.train()
    params = dict(model.named_parameters())
    with dropout_control(model, "record", generator=generator) as ctl, batch_statistics(model) as stats:
        loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    sent = {n: g.detach() for n, g in zip(params, grads)} | {k: v.detach() for k, v in stats.items()}
    return sent, {k: v.detach() for k, v in ctl.masks.items()}


def client_update(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    local: LocalTraining,
    *,
    generator: torch.Generator | None = None,
    defend_step: Callable[[dict[str, Tensor], nn.Module, Tensor, Tensor, dict[str, Tensor]], dict[str, Tensor]]
    | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A FedAvg client's update on batch (x, y): its own copy of `model` takes `local.steps` plain SGD steps
    (each on its share of the batch, fresh dropout masks drawn and recorded by the model's own sites); returns
    (w_0 - w_T) / lr (the sum of the T gradients along the trajectory, in gradient units) and the masks
    {site: (T * b, ...)}, step after step. `defend_step(grads, model, x_t, y_t, masks_t)`: a per-step defense
    (DP-SGD) applied to each step's gradient before the step. `model` itself is not changed."""
    client = copy.deepcopy(model).train()
    params = dict(client.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=local.lr)
    steps: list[dict[str, Tensor]] = []
    for t in range(local.steps):
        sl = local.images(t, len(x))
        grads, masks = client_gradients(client, x[sl], y[sl], generator=generator)
        if defend_step is not None:
            grads = defend_step(grads, client, x[sl], y[sl], masks)
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
        steps.append(masks)
    update = {n: (start[n] - p.detach()) / local.lr for n, p in params.items()}
    return update, {s: torch.cat([m[s] for m in steps]) for s in steps[0]}


def problem_gradients(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    masks: Mapping[str, Tensor] | None,
    mode: Mode,
    local: LocalTraining | None = None,
) -> dict[str, Tensor]:
    """Parameter gradients for K problems: x (K, B, ...), y (K, B), masks {site: (K, B, ...)} -> {name: (K, ...)}.

    With `local` (FedAvg) the update of T local SGD steps instead, unrolled from `params` (the multi-step
    attack of Geiping et al. 2020): p_{t+1} = p_t - lr * g_t, each g_t on step t's images under step t's
    masks (rows t*b..(t+1)*b of each site's (T * b, ...) masks), returning sum_t g_t = (w_0 - w_T) / lr.
    Differentiable w.r.t. `x` and `masks` (create-graph semantics, through the whole trajectory), not w.r.t.
    `params`. A model whose BatchNorm statistics the server learns (dia.models.batchnorm) adds the dummies'
    batch statistics (`bn/<layer>/mean|var`, FedSGD only), as the client's step sends them.
    """
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xk: Tensor, yk: Tensor, mk: dict[str, Tensor]) -> Tensor:
        with dropout_control(model, mode, dict(mk)):
            out = functional_call(model, (p, buffers), (xk,))
        return F.cross_entropy(out, yk)

    def loss_and_statistics(
        p: dict[str, Tensor], xk: Tensor, yk: Tensor, mk: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        with dropout_control(model, mode, dict(mk)), batch_statistics(model) as stats:
            out = functional_call(model, (p, buffers), (xk,))
        return F.cross_entropy(out, yk), dict(stats)

    if local is None and shares_statistics(model):
        with_stats = grad(loss_and_statistics, has_aux=True)

        def fn(p: dict[str, Tensor], xk: Tensor, yk: Tensor, mk: dict[str, Tensor]) -> dict[str, Tensor]:
            grads, stats = with_stats(p, xk, yk, mk)
            return grads | stats

    else:
        fn = grad(loss) if local is None else _unrolled(grad(loss), local)
    masks = dict(masks or {})
    if type(model) not in _SEQUENTIAL:
        try:
            return vmap(fn, in_dims=(None, 0, 0, 0 if masks else None))(dict(params), x, y, masks)
        except (RuntimeError, NotImplementedError) as exc:  # an operation vmap cannot batch
            _SEQUENTIAL.add(type(model))
            warnings.warn(
                f"{type(model).__name__} cannot be vectorized over problems ({str(exc).splitlines()[0][:120]}); "
                "attacking its problems one after another",
                stacklevel=2,
            )
    per_problem = [fn(dict(params), x[k], y[k], {n: m[k] for n, m in masks.items()}) for k in range(x.shape[0])]
    return {n: torch.stack([g[n] for g in per_problem]) for n in per_problem[0]}


def each_problem_gradient(
    model: nn.Module, x: Tensor, y: Tensor, masks: Mapping[str, Tensor] | None, mode: Mode
) -> Iterator[dict[str, Tensor]]:
    """`problem_gradients` (FedSGD) without torch.func, one problem at a time: yields problem k's gradient
    {name: (1, *shape)} by plain autograd on `model`'s own parameters (which must require grad), with
    `create_graph` so the attack can differentiate through it.

    The same function of (x, masks) as the vectorized one, to float rounding; in eager mode it does without
    vmap's and functional_call's per-operation overhead, which dominates small models (docs/benchmarks.md), and
    the caller can use each gradient while it is still in cache instead of stacking K of them (the attack's eager
    program: `attack.eager=loop`; not for BatchNorm statistics the server knows). torch.compile takes the
    vectorized one.
    """
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    for k in range(x.shape[0]):
        with dropout_control(model, mode, {n: m[k] for n, m in (masks or {}).items()}):
            loss = F.cross_entropy(model(x[k]), y[k])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        yield {n: g.unsqueeze(0) for n, g in zip(names, grads)}


def _unrolled(step_grad: Any, local: LocalTraining) -> Any:
    """One problem's T local steps as a function of (p_0, x, y, masks): sum_t g_t along p_{t+1} = p_t - lr g_t."""

    def update(p0: dict[str, Tensor], xk: Tensor, yk: Tensor, mk: dict[str, Tensor]) -> dict[str, Tensor]:
        b = local.per_step(xk.shape[0])
        p, total = p0, None
        for t in range(local.steps):
            sl = local.images(t, xk.shape[0])
            g = step_grad(p, xk[sl], yk[sl], {n: m[t * b : (t + 1) * b] for n, m in mk.items()})
            total = g if total is None else {n: total[n] + g[n] for n in g}
            p = {n: p[n] - local.lr * g[n] for n in p}
        return total

    return update


_SEQUENTIAL: set[type] = set()  # model classes found not to vmap: the sequential path, with one notice
