"""Reconstruction objectives as pure functions over K independent problems (leading dimension K)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from dia.lowrank import LowRank


def cosine_distance(grads: Mapping[str, Tensor], targets: Mapping[str, Tensor], eps: float = 1e-8) -> Tensor:
    """1 - cosine similarity between two gradients, each flattened over *all* parameters (IG's `sim` cost).

    `grads[name]` and `targets[name]` have shape (K, *param_shape); returns (K,). A gradient may be given as its
    factors (dia.lowrank.LowRank): its inner product and norm are then taken from them.
    """
    dot = pn = tn = 0.0
    for name, t in targets.items():
        g = grads[name]
        if isinstance(g, LowRank):
            dot = dot + g.inner(t)
            pn = pn + g.sq_norm()
        else:
            g, t = g.flatten(1), t.flatten(1)
            dot = dot + (g * t).sum(1)
            pn = pn + g.pow(2).sum(1)
        tn = tn + t.flatten(1).pow(2).sum(1)
    return 1.0 - dot / (pn.sqrt() * tn.sqrt() + eps)


def squared_distance(grads: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """DLG's distance: sum over parameters of ||g - t||^2, per problem (K,). A factored gradient (dia.lowrank.LowRank)
    is written out first: expanding the square would cancel catastrophically near a match, where the distance goes
    to zero."""
    total: Tensor | float = 0.0
    for name, t in targets.items():
        g = grads[name]
        g = g.dense() if isinstance(g, LowRank) else g
        total = total + (g - t.reshape(g.shape)).flatten(1).pow(2).sum(1)
    return torch.as_tensor(total)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation, mean absolute neighbour difference; x (K, B, C, H, W) -> (K,)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy


def mean_square(x: Tensor) -> Tensor:
    """The mean square of each problem's images (normalized space), an L2 image prior; x (K, B, ...) -> (K,)."""
    return x.flatten(1).pow(2).mean(1)


def batch_norm_prior(stats: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """GradInversion's BatchNorm prior: sum over the entries of `targets` (per layer, the client's batch mean and
    variance) of the L2 distance of the dummies' `stats` from them, per problem; (K, C) entries -> (K,)."""
    total: Tensor | float = 0.0
    for name, t in targets.items():
        total = total + (stats[name] - t).flatten(1).norm(dim=1)
    return torch.as_tensor(total)


def keep_rate_penalty(masks: Mapping[str, Tensor], rates: Mapping[str, float], steps: int = 1) -> Tensor:
    """DIA's regularizer: sum over sites of |(1 - mean(mask)) - p|, per problem; masks (K, ...) -> (K,).

    With `steps` T > 1 (FedAvg: a site's masks are T steps' masks along dim 1) it applies per step, averaged
    over the steps, so `mask_weight` means the same at every T."""
    total: Tensor | float = 0.0
    for name, m in masks.items():
        if steps == 1:
            total = total + ((1.0 - m.flatten(1).mean(1)) - rates[name]).abs()
        else:
            per_step = m.reshape(m.shape[0], steps, -1).mean(2)  # (K, T)
            total = total + ((1.0 - per_step) - torch.as_tensor(rates[name]).reshape(-1, 1)).abs().mean(1)
    return torch.as_tensor(total)
