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


def replay_gap(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
    """A client's step on (x, y) (seeded masks), then the attacker's gradient of that one problem: replaying the
    client's recorded masks must give the client's gradient (asserted here); returns the masks and how far the
    gradient with dropout off is from it (the gap dropout makes)."""
    from dia.gradients import client_gradients, problem_gradients

    target, masks = client_gradients(model, x, y, generator=torch.Generator().manual_seed(1))
    params = {n: p.detach() for n, p in model.named_parameters()}
    one = {k: v.unsqueeze(0) for k, v in masks.items()}  # one problem
    replay = problem_gradients(model, params, x[None], y[None], one, "replay")
    off = problem_gradients(model, params, x[None], y[None], None, "off")
    for n in target:
        torch.testing.assert_close(replay[n][0], target[n], rtol=1e-5, atol=1e-6)
    return masks, max((off[n][0] - target[n]).abs().max().item() for n in target)
