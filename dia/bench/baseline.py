"""The paper authors' attack loop, re-implemented for benchmarking only (not used by the attacks).

Mirrors `IterativeGradientInversionAttack.attack_batch` / `_gradient_closure` and `DropoutInversionAttack`
of github.com/dAI-SY-Group/DropoutInversionAttack (src/attacks.py): one victim batch per attack, one
`torch.optim.Adam([dummy] + masks, lr=0.1)`, and per iteration

    zero_grad -> autograd.grad(CE, model.parameters(), create_graph=True) -> cosine distance over all
    parameters + 1e-5 * TV (+ DIA: 1e-4 * sum_l |(1 - mean(mask_l)) - p_l|) -> backward -> sign of the
    dummy's gradient -> Adam step -> clamp dummy to the valid box, clip masks to [0, 1] ->
    ReduceLROnPlateau(factor 0.1, patience 800).step(loss) -> early-stopper bookkeeping,

with the loss read back to the host (`.item()`) every iteration, as the authors' closure does. As there,
the model's parameters require grad, so `backward` also fills (and wastes) their `.grad`; the attacker's
model runs in eval mode, without dropout for IG and with the (trainable) masks for DIA. The masks are
leaf tensors applied through `dropout_control(model, "replay", masks)`, which is exactly the authors'
module-level `MaskDropout.do_mask` (x * mask / (1 - p)). Like the authors' code, the first iterate is
not clamped to the box and the "best" dummy is the one *after* the step whose loss improved.

`dia.bench` times our vectorized engine against this loop; tests/test_bench.py checks that both give
the same losses from the same starting point.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dia.models.dropout import dropout_control


def _tv(x: Tensor) -> Tensor:
    """The authors' anisotropic TV of a (B, C, H, W) batch."""
    dx = torch.mean(torch.abs(x[:, :, :, :-1] - x[:, :, :, 1:]))
    dy = torch.mean(torch.abs(x[:, :, :-1, :] - x[:, :, 1:, :]))
    return dx + dy


def _cosine(grads: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """The authors' GCosineDistance: 1 - <g, t> / (|g| |t| + 1e-8) over all parameters."""
    dot = pn = tn = 0
    for name, t in targets.items():
        g = grads[name]
        dot, pn, tn = dot + (g * t).sum(), pn + g.pow(2).sum(), tn + t.pow(2).sum()
    return 1 - dot / (pn.sqrt() * tn.sqrt() + 1e-8)


class _EarlyStopping:
    """The authors' utils.EarlyStopping for a minimized metric (delta 0)."""

    def __init__(self, patience: int) -> None:
        self.patience, self.counter, self.best, self.stop, self.improved = patience, 0, None, False, False

    def __call__(self, value: float) -> None:
        if self.best is not None and value >= self.best:
            self.improved = False
            self.counter += 1
            self.stop = self.counter >= self.patience
        else:
            self.improved, self.best, self.counter = True, value, 0


def run_baseline(
    model: nn.Module,
    target_grads: Mapping[str, Tensor],
    label: Tensor,
    rates: Mapping[str, float],
    mask_shapes: Mapping[str, tuple[int, ...]],
    *,
    attack: str,
    iterations: int,
    lower: Tensor,
    upper: Tensor,
    seed: int,
    input_shape: tuple[int, ...] | None = None,
    init_x: Tensor | None = None,
    init_masks: Mapping[str, Tensor] | None = None,
    lr: float = 0.1,
    tv_weight: float = 1e-5,
    mask_weight: float = 1e-4,
    lr_patience: int = 800,
    early_stop_patience: int = 4000,
) -> tuple[Tensor, list[float]]:
    """Attack one victim batch with the authors' loop; returns the best dummy (B, C, H, W) and the losses.

    `target_grads` {param name: gradient} and `label` (B,) are one client's; `rates` / `mask_shapes` are
    per dropout site (batch dimension included). Without `init_x` / `init_masks` the start is drawn from
    `seed` like our engine draws it (randn dummy of `input_shape`, then one Bernoulli(1 - p) mask per
    site); pass them to start both from exactly the same point.
    """
    if attack not in ("ig", "dia"):
        raise ValueError(f"attack must be 'ig' or 'dia', got {attack!r}")
    device = lower.device
    gen = torch.Generator().manual_seed(seed)
    if init_x is None:
        if input_shape is None:
            raise ValueError("give input_shape or init_x")
        init_x = torch.randn(input_shape, generator=gen)
    dummy = init_x.detach().clone().to(device).requires_grad_(True)
    masks: dict[str, Tensor] = {}
    if attack == "dia":
        for site, shape in mask_shapes.items():
            m = (
                init_masks[site]
                if init_masks is not None
                else torch.bernoulli(torch.full(shape, 1.0 - rates[site]), generator=gen)
            )
            masks[site] = m.detach().clone().to(device).requires_grad_(True)

    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    saved = (model.training, [p.requires_grad for p in params])
    model.eval().requires_grad_(True)  # as in the authors' code: parameters are leaves of the graph
    optimizer = torch.optim.Adam([dummy, *masks.values()], lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=lr_patience)
    stopper = _EarlyStopping(early_stop_patience)
    losses: list[float] = []
    best_x = dummy.detach().clone()
    try:
        for _ in range(iterations):
            optimizer.zero_grad()
            model.zero_grad()
            with dropout_control(model, "replay" if masks else "off", masks):
                ce = F.cross_entropy(model(dummy), label)
            grads = dict(zip(names, torch.autograd.grad(ce, params, create_graph=True)))
            loss = _cosine(grads, target_grads) + tv_weight * _tv(dummy)
            for site, m in masks.items():
                loss = loss + mask_weight * ((1 - m.mean()) - rates[site]).abs()
            loss.backward()
            dummy.grad.sign_()
            value = loss.item()  # host sync every iteration, as the authors' closure
            optimizer.step()
            with torch.no_grad():
                dummy.data = torch.max(torch.min(dummy, upper), lower)
                for m in masks.values():
                    m.clip_(0, 1)
            scheduler.step(value)
            stopper(value)
            if stopper.improved:
                best_x = dummy.detach().clone()
            losses.append(value)
            if stopper.stop or stopper.best < 1e-5:
                break
    finally:
        model.train(saved[0])
        for p, flag in zip(params, saved[1]):
            p.requires_grad_(flag)
            p.grad = None
    return best_x, losses
