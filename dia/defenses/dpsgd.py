"""DP-SGD for one step: per-example clipping, Gaussian noise on the sum, divided by the batch size.

Its (epsilon, delta) comes from opacus' RDP accountant (`dia.defenses.privacy`). Settings: configs/defense/dpsgd.yaml.
"""

from __future__ import annotations

from typing import Any

import torch

from dia.defenses import Grads, default_of, register_defense


def clip_per_example(per_example: Grads, clip: float) -> Grads:
    """Scale each example's gradient (leading dim B) to L2 norm <= clip over all parameters (opacus' factor)."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_example.values()]).sum(0).sqrt()  # (B,)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {n: g * factor.view(-1, *([1] * (g.dim() - 1))) for n, g in per_example.items()}


@register_defense(
    "dpsgd",
    per_example=True,
    private=True,
    strength="noise_multiplier",
    axis="noise multiplier σ",
    label=lambda d: (
        f"dpsgd σ={d['noise_multiplier']:g} C={d['clip']:g}"
        + ("" if d.get("delta") in (None, default_of("dpsgd", "delta")) else f" δ={d['delta']:g}")
    ),
    checks=[
        ("clip", lambda v: v > 0, "must be > 0"),
        ("noise_multiplier", lambda v: v >= 0, "must be >= 0"),
        ("delta", lambda v: 0 < v < 1, "must be in (0, 1)"),
    ],
)
def dpsgd(per_example: Grads, cfg: Any, generator: torch.Generator) -> Grads:
    """(sum_i clip(g_i) + N(0, (sigma C)^2 I)) / B: the per-example gradients (B, ...) -> the sent gradient."""
    clipped = clip_per_example(per_example, cfg.clip)
    std = cfg.noise_multiplier * cfg.clip
    out = {}
    for n, g in clipped.items():
        noise = torch.randn(g.shape[1:], generator=generator, dtype=g.dtype, device=g.device)
        out[n] = (g.sum(0) + std * noise) / g.shape[0]
    return out
