"""Helpers the tests share (importable as `helpers`: pytest puts tests/ on the path)."""

from __future__ import annotations

from typing import Any

import torch

from dia import attacks
from dia.engine import AttackResult


def attack_alone(
    model: torch.nn.Module,
    problems: Any,
    cfg: Any,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
) -> AttackResult:
    """The result of the attack section `cfg.attack` on `problems` (as its server sees them), in memory: the one
    entry point (dia.attacks.attack) with one part."""
    part = attacks.part(cfg.attack, problems)
    program = attacks.attack(model, [part], device=torch.device(device), progress=progress, lower=lower, upper=upper)
    return program.result()
