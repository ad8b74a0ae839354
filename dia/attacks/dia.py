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

from dia.attacks.ig import AttackConfig, InvertingGradients
from dia.losses import keep_rate_penalty
from dia.models.dropout import Mode

PREFIX = "mask/"


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

    mask_mode: Mode = "replay"

    def init_mask_params(self, generators: list[torch.Generator]) -> dict[str, Tensor]:
        out = {}
        for site, shape in self.problems.mask_shapes.items():
            if self.problems.kinds.get(site) == "drop_path" and not self.cfg.model_drop_path:
                continue  # not modelled: the attacker's copy keeps every residual branch
            keep = torch.full(shape, 1.0 - self.problems.rates[site])
            draws = torch.stack([torch.bernoulli(keep, generator=g) for g in generators])
            if self.cfg.mask_param == "sigmoid":
                draws = (2 * draws - 1) * self.cfg.mask_init_logit
            out[PREFIX + site] = draws
        return out

    def masks(self, params: dict[str, Tensor]) -> dict[str, Tensor] | None:
        raw = {k[len(PREFIX):]: v for k, v in params.items() if k.startswith(PREFIX)}
        if self.cfg.mask_param == "sigmoid":
            return {k: torch.sigmoid(v) for k, v in raw.items()}
        return raw

    def regularizer(self, masks: dict[str, Tensor] | None) -> Tensor | float:
        if not masks:
            return 0.0
        return self.cfg.mask_weight * keep_rate_penalty(masks, self.problems.rates)

    def mask_curves(self) -> dict[str, Tensor]:
        """Mean keep-rate of the current masks (the client's is 1 - p) and their share of undecided entries."""
        masks = self.masks(self.state.params)
        if not masks:
            return {}
        flat = torch.cat([m.detach().flatten(1) for m in masks.values()], dim=1)
        return {
            "masks/keep_rate": flat.mean(),
            "masks/undecided": ((flat > 0.1) & (flat < 0.9)).float().mean(),
        }

    def project(self, params: dict[str, Tensor]) -> None:
        super().project(params)
        if self.cfg.mask_param == "clip":
            for k, v in params.items():
                if k.startswith(PREFIX):
                    v.clamp_(0.0, 1.0)
