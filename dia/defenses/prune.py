"""Gradient pruning: per layer, the largest (1 - ratio) share of entries by magnitude kept, the rest zeroed.

Settings: configs/defense/prune.yaml. `attack.model_defense` lets the attacker match only what survived
(`dia.defenses.surviving`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dia.defenses import Grads, register_defense


def prune_mask(g: Tensor, ratio: float) -> Tensor:
    """True at the round((1 - ratio) * numel) entries of largest magnitude."""
    k = int(round((1.0 - ratio) * g.numel()))
    keep = torch.zeros(g.numel(), dtype=torch.bool, device=g.device)
    keep[g.flatten().abs().topk(k).indices] = True
    return keep.view_as(g)


@register_defense(
    "prune",
    strength="ratio",
    axis="prune ratio",
    label=lambda d: f"prune {d['ratio']:g}",
    checks=[("ratio", lambda v: 0 <= v < 1, "must be in [0, 1)")],
)
def prune(grads: Grads, cfg: Any, generator: torch.Generator) -> Grads:
    """Per layer, keep the largest `1 - ratio` share of entries by magnitude, zero the rest."""
    return {n: torch.where(prune_mask(g, cfg.ratio), g, torch.zeros_like(g)) for n, g in grads.items()}
