"""The Dropout Inversion Attack: optimize the dummies and the client's dropout masks jointly.

Masks start as Bernoulli(1 - p) draws, stay in [0, 1] and are pulled toward the keep-rate 1 - p by
lambda * |(1 - mean(mask)) - p| per dropout site (`attack.mask_weight`). Two parametrizations
(`attack.mask_param`):

* ``clip``: the mask values themselves, clipped to [0, 1] after each step (the paper's);
* ``sigmoid``: mask = sigmoid(logits), logits initialised at +/- ``mask_init_logit``.

The attacker need not know p: `attack.assumed_rate` (null: the model's p) is the rate it initialises,
scales (1/(1-p)) and regularizes toward; `attack.rate=learn` makes it a trainable logit per problem and
site, started at that rate and optimized with the masks (plain Adam, like the masks), which the
keep-rate penalty pulls toward the learned rate; the result is reported as `mask_rate`.

DropPath (stochastic depth) sites drop whole residual branches per sample; like the paper, DIA does not
model them unless ``model_drop_path`` (then their per-sample masks are optimized like any other).

Mask gradients are not sign-replaced (only the dummies' are), as in the paper's code. Settings:
configs/attack/dia.yaml.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dia.attacks.ig import InvertingGradients
from dia.attacks.registry import register
from dia.errors import UserError
from dia.problems import Problems

MASK_PARAMS = ("clip", "sigmoid")
RATE_MODES = ("known", "learn")


@register("dia")
class DropoutInversionAttack(InvertingGradients):
    """IG plus one trainable mask per dropout site and problem."""

    checks = [
        ("mask_param", lambda v: v in MASK_PARAMS, f"must be one of: {', '.join(MASK_PARAMS)}"),
        ("mask_weight", lambda v: 0 <= v < float("inf"), "must be >= 0"),
        ("mask_init_logit", lambda v: 0 < v < float("inf"), "must be > 0"),
        ("assumed_rate", lambda v: 0 <= v < 1, "must be null (the model's rate) or in [0, 1)"),
        ("rate", lambda v: v in RATE_MODES, f"must be one of: {', '.join(RATE_MODES)}"),
    ]

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        if getattr(cfg, "rate", None) == "learn" and getattr(cfg, "assumed_rate", None) == 0:
            raise UserError(
                "attack.assumed_rate=0: rate=learn starts from it and needs it in (0, 1); set it > 0 or null"
            )

    def site_role(self, problems: Problems, site: str) -> str | None:
        if problems.kinds.get(site) == "drop_path" and not self.cfg.model_drop_path:
            return None  # not modelled: the attacker's copy keeps every residual branch
        return "train"

    def init_mask(self, problems: Problems, site: str, generators: list[torch.Generator]) -> Tensor:
        """Bernoulli(1 - p) draws from each problem's generator (sigmoid: logits at +/- mask_init_logit)."""
        keep = torch.full(self.trained_shape(problems, site), 1.0 - self.attacker_rate(problems, site))
        draws = torch.stack([torch.bernoulli(keep, generator=g) for g in generators])
        if self.cfg.mask_param == "sigmoid":
            draws = (2 * draws - 1) * self.cfg.mask_init_logit
        return draws

    def mask_weight(self) -> float:
        return self.cfg.mask_weight

    def mask_parametrization(self) -> str:
        return self.cfg.mask_param

    def attacker_rate(self, problems: Problems, site: str) -> float:
        """`assumed_rate`, or the model's p when it is null."""
        assumed = self.cfg.assumed_rate
        return problems.rates[site] if assumed is None else float(assumed)

    def learns_rate(self) -> bool:
        return self.cfg.rate == "learn"
