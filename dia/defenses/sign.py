"""Sign-only gradients (signSGD): every entry sent as -1, 0 or +1. Settings: configs/defense/sign.yaml."""

from __future__ import annotations

from typing import Any

import torch

from dia.defenses import Grads, register_defense


@register_defense("sign", label=lambda d: "sign")
def sign(grads: Grads, cfg: Any, generator: torch.Generator) -> Grads:
    """Sign-only: every entry becomes -1, 0 or +1."""
    return {n: torch.sign(g) for n, g in grads.items()}
