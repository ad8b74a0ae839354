"""Per-layer symmetric uniform quantization to 2^bits - 1 levels in [-max|g|, max|g|], nearest or stochastic
(unbiased) rounding. Settings: configs/defense/quantize.yaml."""

from __future__ import annotations

from typing import Any

import torch

from dia.defenses import Grads, register_defense

ROUNDINGS = ("nearest", "stochastic")


@register_defense(
    "quantize",
    strength="bits",
    axis="bits",
    stronger_when_smaller=True,
    label=lambda d: f"quantize {d['bits']}b" + (" stochastic" if d.get("rounding") == "stochastic" else ""),
    checks=[
        ("bits", lambda v: 2 <= v <= 16, "must be in 2..16 (1 bit: defense=sign)"),
        ("rounding", lambda v: v in ROUNDINGS, f"must be one of: {', '.join(ROUNDINGS)}"),
    ],
)
def quantize(grads: Grads, cfg: Any, generator: torch.Generator) -> Grads:
    """Per layer, round g / max|g| onto the 2^bits - 1 levels {-L..L}/L, L = 2^(bits-1) - 1, and scale back."""
    levels = 2 ** (cfg.bits - 1) - 1
    out = {}
    for n, g in grads.items():
        scale = g.abs().max()
        if scale == 0:
            out[n] = g.clone()
            continue
        v = g / scale * levels
        if cfg.rounding == "stochastic":  # up with probability frac(v): unbiased
            q = torch.floor(v + torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device))
        else:
            q = torch.round(v)
        out[n] = q.clamp(-levels, levels) * (scale / levels)
    return out
