"""The Dropout Inversion Attack: optimize the dummies and the client's dropout masks jointly.

Masks start as Bernoulli(1 - p) draws, stay in [0, 1] and are pulled toward the keep-rate 1 - p by
lambda * |(1 - mean(mask)) - p| per dropout site (`attack.mask_weight`). Two parametrizations
(`attack.mask_param`):

* ``clip``: the mask values themselves, clipped to [0, 1] after each step (the paper's);
* ``sigmoid``: mask = sigmoid(logits), logits initialised at +/- ``mask_init_logit``.

DropPath (stochastic depth) sites drop whole residual branches per sample; like the paper, DIA does not
model them unless ``model_drop_path`` (then their per-sample masks are optimized like any other).

Mask gradients are not sign-replaced (only the dummies' are), as in the paper's code. Settings:
configs/attack/dia.yaml.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dia.attacks import register
from dia.attacks.ig import InvertingGradients, Part

MASK_PARAMS = ("clip", "sigmoid")


@register("dia")
class DropoutInversionAttack(InvertingGradients):
    """IG plus one trainable mask per dropout site and problem."""

    checks = [
        ("mask_param", lambda v: v in MASK_PARAMS, f"must be one of: {', '.join(MASK_PARAMS)}"),
        ("mask_weight", lambda v: 0 <= v < float("inf"), "must be >= 0"),
        ("mask_init_logit", lambda v: 0 < v < float("inf"), "must be > 0"),
    ]

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

    @classmethod
    def mask_parametrization(cls, part: Part) -> str:
        return part.cfg.mask_param
