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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dia.lowrank import LowRank, worth_factoring
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


class NotFactorable(Exception):
    """The model's per-problem gradients cannot be read off one batched pass (the message says why)."""


# The layers whose per-problem parameter gradients `factored_problem_gradients` takes from their inputs and output
# gradients (exact types: a subclass may compute something else in its forward).
FACTORED_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class FactorPlan:
    """Per layer of a model, the names of its weight and bias (or None) among the model's parameters."""

    layers: tuple[tuple[nn.Module, str, str | None], ...]

    @classmethod
    def of(cls, model: nn.Module) -> FactorPlan:
        """The plan of `model`, or NotFactorable: every parameter must be the weight or bias of exactly one
        nn.Linear or nn.Conv2d (zero padding given as numbers, one group)."""
        owners: dict[int, str] = {}
        layers = []
        for prefix, m in model.named_modules():
            own = dict(m.named_parameters(recurse=False))
            if not own:
                continue
            if type(m) not in FACTORED_LAYERS or set(own) - {"weight", "bias"}:
                raise NotFactorable(f"{prefix or 'the model'} ({type(m).__name__}) holds parameters {sorted(own)}")
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
                raise NotFactorable(f"{prefix} is a grouped, non-zero-padded or 'same'-padded convolution")
            name = {n: f"{prefix}.{n}" if prefix else n for n in own}  # as in model.named_parameters()
            for n, p in own.items():
                if id(p) in owners:
                    raise NotFactorable(f"{name[n]} shares its tensor with {owners[id(p)]}")
                owners[id(p)] = name[n]
            layers.append((m, name["weight"], name.get("bias")))
        if not layers:
            raise NotFactorable("the model has no parameters")
        return cls(tuple(layers))


def factored_problem_gradients(
    model: nn.Module,
    plan: FactorPlan,
    x: Tensor,
    y: Tensor,
    masks: Mapping[str, Tensor] | None,
    mode: Mode,
) -> dict[str, Tensor | LowRank]:
    """`problem_gradients` (FedSGD) from one batched pass of all K problems' rows, without torch.func: x (K, B, ...),
    y (K, B), masks {site: (K, B, ...)} -> {name: (K, ...)}, a linear layer's weight gradient as its factors
    (dia.lowrank.LowRank) where they are smaller than the matrix.

    Each layer's per-problem weight gradient is the sum over the problem's rows of (output gradient) x (input) (for
    a convolution: the K problems' weight gradients are those of one convolution with K groups), so one forward of
    all K * B rows and one backward to the layers' outputs give every problem's gradient. That holds only for a
    model that treats the rows of a batch independently (no batch statistics) and runs each layer once: the caller
    checks the result against `each_problem_gradient` before trusting it (dia.attacks.program). Differentiable
    w.r.t. `x` and `masks`.

    torch.func's vmap computes the same, but its per-operation overhead dominates small models in eager mode
    (docs/benchmarks.md); and it cannot keep a weight gradient as factors.
    """
    k, b = x.shape[:2]
    seen: list[tuple[Tensor, Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, i, o: seen.append((i[0], o))) for m, _, _ in plan.layers]
    try:
        with dropout_control(model, mode, {n: m.flatten(0, 1) for n, m in (masks or {}).items()}):
            out = model(x.flatten(0, 1))
    finally:
        for h in hooks:
            h.remove()
    if len(seen) != len(plan.layers):
        raise NotFactorable(f"{len(plan.layers)} layers ran {len(seen)} times in one forward")
    loss = F.cross_entropy(out, y.flatten(), reduction="none").view(k, b).mean(1).sum()
    deltas = torch.autograd.grad(loss, [o for _, o in seen], create_graph=True)
    grads: dict[str, Tensor | LowRank] = {}
    for (m, weight, bias), (a, _), d in zip(plan.layers, seen, deltas):
        if isinstance(m, nn.Linear):
            left, right = d.reshape(k, -1, d.shape[-1]), a.reshape(k, -1, a.shape[-1])  # (K, rows, out / in)
            g = LowRank(left, right)
            grads[weight] = g if worth_factoring(left.shape[1], m.out_features, m.in_features) else g.dense()
            row_sums = left.sum(1)
        else:  # Conv2d: the K problems' convolutions side by side as the groups of one, their rows as its batch
            c, o = a.shape[1], d.shape[1]
            a_g = a.reshape(k, b, *a.shape[1:]).transpose(0, 1).reshape(b, k * c, *a.shape[2:])
            d_g = d.reshape(k, b, *d.shape[1:]).transpose(0, 1).reshape(b, k * o, *d.shape[2:])
            w = torch.nn.grad.conv2d_weight(
                a_g, (k * o, *m.weight.shape[1:]), d_g, m.stride, m.padding, m.dilation, groups=k
            )
            grads[weight] = w.view(k, *m.weight.shape)
            row_sums = d.reshape(k, b, o, -1).sum((1, 3))
        if bias is not None:
            grads[bias] = row_sums
    return grads


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
