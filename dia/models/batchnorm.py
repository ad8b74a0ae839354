"""BatchNorm statistics the server can know: each BatchNorm layer's batch mean and variance of a client's step.

A client whose BatchNorm runs in train mode normalizes with its batch's statistics, and a FedAvg client sends its
BatchNorm buffers with its weights: running = (1 - momentum) running + momentum * batch statistic, so the server,
which knows the buffers before the step, reads the batch mean and variance off them. A model built with
`model.bn_stats=true` has its BatchNorm layers marked (`share_statistics`); inside `batch_statistics(model)` every
marked layer that runs reports the mean and (biased) variance per channel of its input. The client's step
(dia.gradients.client_gradients) sends them beside its gradient, as entries `bn/<layer>/mean` and `bn/<layer>/var`
(`STATS`); the attacker's model of the step (dia.gradients.problem_gradients) computes the same entries for its
dummies, so an attack can match them (GradInversion's BatchNorm prior, Yin et al. 2021: `attack.bn_weight`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

STATS = "bn/"  # prefix of the statistics' entries: bn/<layer>/mean, bn/<layer>/var
_FLAG = "_dia_shares_statistics"
_ACTIVE: list[dict[str, Tensor]] = []  # the statistics being collected (innermost block last)


def share_statistics(model: nn.Module) -> int:
    """Mark every BatchNorm layer of `model` as one whose batch statistics the server learns; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            setattr(module, _FLAG, name)
            if not any(getattr(h, "__name__", "") == "_report" for h in module._forward_pre_hooks.values()):
                module.register_forward_pre_hook(_report)
            count += 1
    return count


def shares_statistics(model: nn.Module) -> bool:
    """Whether `model` has BatchNorm layers marked by `share_statistics`."""
    return any(getattr(m, _FLAG, None) is not None for m in model.modules())


def _report(module: nn.Module, args: tuple[Tensor, ...]) -> None:
    name = getattr(module, _FLAG, None)
    if not _ACTIVE or name is None:
        return
    x = args[0]
    dims = [0, *range(2, x.dim())]
    _ACTIVE[-1][f"{STATS}{name}/mean"] = x.mean(dims)
    _ACTIVE[-1][f"{STATS}{name}/var"] = x.var(dims, unbiased=False)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Collect the batch statistics of `model`'s marked BatchNorm layers while the block runs: {entry: (C,)}."""
    stats: dict[str, Tensor] = {}
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.pop()


__all__ = ["STATS", "share_statistics", "shares_statistics", "batch_statistics"]
