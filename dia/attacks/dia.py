"""The Dropout Inversion Attack: optimize the dummies and the client's dropout masks jointly.

Masks start as Bernoulli(1 - p) draws, stay in [0, 1] and are pulled toward the keep-rate 1 - p by
lambda * |(1 - mean(mask)) - p| per dropout site. Two parametrizations:

* ``clip``: the mask values themselves, clipped to [0, 1] after each step (the paper's);
* ``sigmoid``: mask = sigmoid(logits), logits initialised at +/- ``mask_init_logit``.

DropPath (stochastic depth) sites drop whole residual branches per sample; like the paper, DIA does not
model them unless ``model_drop_path`` (then their per-sample masks are optimized like any other).

Mask gradients are not sign-replaced (only the dummies' are), as in the paper's code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dia.attacks.ig import AttackConfig, InvertingGradients, Part


@dataclass
class DIAConfig(AttackConfig):
    name: str = "dia"
    mask_weight: float = 1e-4
    mask_param: str = "clip"  # clip | sigmoid
    mask_init_logit: float = 3.0  # sigmoid only: |initial logit|
    model_drop_path: bool = False  # also optimize DropPath (stochastic depth) masks; the paper does not


MASK_PARAMS = ("clip", "sigmoid")


class DropoutInversionAttack(InvertingGradients):
    """IG plus one trainable mask per dropout site and problem."""

    @classmethod
    def trains_masks(cls) -> bool:
        return True

    @classmethod
    def site_role(cls, part: Part, site: str) -> str | None:
        if part.problems.kinds.get(site) == "drop_path" and not part.cfg.model_drop_path:
            return None  # not modelled: the attacker's copy keeps every residual branch
        return "train"

    @classmethod
    def init_mask(cls, part: Part, site: str, generators: list[torch.Generator]) -> Tensor:
        """Bernoulli(1 - p) draws from each problem's generator (sigmoid: logits at +/- mask_init_logit)."""
        keep = torch.full(part.problems.mask_shapes[site], 1.0 - part.problems.rates[site])
        draws = torch.stack([torch.bernoulli(keep, generator=g) for g in generators])
        if part.cfg.mask_param == "sigmoid":
            draws = (2 * draws - 1) * part.cfg.mask_init_logit
        return draws

    @classmethod
    def mask_weight(cls, part: Part) -> float:
        return part.cfg.mask_weight
