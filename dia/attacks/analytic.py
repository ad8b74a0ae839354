"""The analytic leak of a first fully connected layer: images read off the gradient, no optimization.

If the flattened input x of a B = 1 client enters a linear layer with a bias, z = W x + b, the shared
gradient holds dL/dW = delta x^T and dL/db = delta (delta = dL/dz): every row j of the weight gradient is
delta_j x, so x = dW_j / db_j for every unit with db_j != 0, exactly, whatever the layers above do to delta:
dropout after that layer only zeroes some delta_j (Geiping et al. 2020, Prop. D.1; Phong et al. 2017). The
attack takes the least-squares solution over all such units, sum_j db_j dW_j / sum_j db_j^2.

With B > 1 images, row j is sum_i delta_ij x_i: one image's input only where the other images pass no
gradient through unit j. Dropout makes such units common: unit j is dropped independently for each image,
so it is kept for exactly one of two images with probability 2p(1-p) (ReLU zeros help too). Their quotients
dW_j / db_j all equal the same image, while mixed units give unit-dependent blends; so the attack groups the
quotients that agree (relative distance below `analytic_tol`), takes the B largest groups (of at least
`analytic_min_units` units) as the images, and starts the slots it could not fill from the usual random
init. Labels play no part: what decides is which images reach a unit, not their classes.

It runs as one part of a program like any attack, so its runs have the same folder, metrics, report and
packs: the closed form is where its dummies start (`init_images`), and its objective is measured, not
optimized (IG's gradient distance at the images, detached: the images never move). Its YAML sets one
iteration, no compilation, and a loss threshold above any cosine distance, so every problem ends
`converged` after that one evaluation; its `loss` is IG's distance of the closed-form images (the
attacker's model without dropout), for reference only.

Refused in one line when the model's first parameter is not a linear layer over the flattened input
followed by its bias (`first_layer`). Settings: configs/attack/analytic.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dia.attacks.ig import InvertingGradients
from dia.attacks.registry import register
from dia.errors import UserError
from dia.losses import cosine_distance
from dia.problems import Problems


def first_layer(problems: Problems) -> tuple[str, str]:
    """The names of the first linear layer's weight and bias gradients, or a one-line UserError.

    The first parameter must be a weight (units, C*H*W) over the flattened input, and the next its bias (units,)."""
    names = list(problems.targets)
    features = math.prod(problems.input_shape[1:])
    shape = tuple(problems.targets[names[0]].shape[1:]) if names else ()
    bias = names[0].removesuffix("weight") + "bias" if names and names[0].endswith("weight") else None
    fits = len(shape) == 2 and shape[1] == features and bias in problems.targets
    if not fits or tuple(problems.targets[bias].shape[1:]) != shape[:1] or names[1] != bias:
        first = f"'{names[0]}' has shape {shape}" if names else "no parameters"
        raise UserError(
            "attack=analytic: needs a first fully connected layer with a bias over the flattened input "
            f"({features} features); this model's first parameter {first}"
            + ("" if fits else ", not (units, features) followed by its bias")
            + " (the MLP has one with model.bias=true)"
        )
    return names[0], bias


def leak(dw: Tensor, db: Tensor, slots: int, *, tol: float, min_units: int) -> list[Tensor]:
    """The inputs one client's first-layer gradient (dw (H, D), db (H,)) gives away: at most `slots` flat images.

    One slot: the least-squares quotient over every unit with a nonzero bias gradient (exact). Several: the
    quotients of single units, grouped where they agree within relative distance `tol`; groups of at least
    `min_units` units, largest first."""
    dw, db = dw.double(), db.double()
    live = db.abs() > 1e-7 * db.abs().max().clamp_min(1e-30)
    if not bool(live.any()):
        return []
    if slots == 1:
        return [(db[live] @ dw[live]) / db[live].pow(2).sum()]
    order = torch.nonzero(live).flatten()
    order = order[db[order].abs().argsort(descending=True)]
    quotients = dw[order] / db[order, None]
    scale = quotients.norm(dim=1).clamp_min(1e-12)
    close = torch.cdist(quotients, quotients) <= tol * torch.minimum(scale[:, None], scale[None, :])
    free = torch.ones(len(order), dtype=torch.bool)
    groups = []
    for i in range(len(order)):  # each unit, strongest first, founds a group of the free units that agree with it
        if free[i]:
            members = close[i] & free
            free &= ~members
            if int(members.sum()) >= min_units:
                groups.append(members)
    groups.sort(key=lambda m: -int(m.sum()))
    out = []
    for members in groups[:slots]:
        units = order[members]
        out.append((db[units] @ dw[units]) / db[units].pow(2).sum())
    return out


@register("analytic")
class AnalyticLeak(InvertingGradients):
    """No optimization: the images of a first linear layer with a bias, read off its gradient."""

    checks = [
        ("analytic_tol", lambda v: 0 < v < 1, "must be in (0, 1)"),
        ("analytic_min_units", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be >= 1"),
    ]

    @classmethod
    def view(cls, problems: Problems) -> Problems:
        public = super().view(problems)
        first_layer(public)
        return public

    def init_images(self, problems: Problems, generators: list[torch.Generator], init: Callable[..., Tensor]) -> Tensor:
        """The closed form per problem; slots it cannot fill (B > 1) keep the random init."""
        x = super().init_images(problems, generators, init)
        weight, bias = first_layer(problems)
        b = problems.input_shape[0]
        for k in range(x.shape[0]):
            found = leak(
                problems.targets[weight][k].cpu(),
                problems.targets[bias][k].cpu(),
                b,
                tol=self.cfg.analytic_tol,
                min_units=1 if b == 1 else self.cfg.analytic_min_units,
            )
            for slot, image in enumerate(found):
                x[k, slot] = image.view(problems.input_shape[1:]).to(x.dtype)
        return x

    def distance(self, grads: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        """IG's distance at the images, detached: measured, never optimized (the images stay where they started)."""
        return cosine_distance({n: g.detach() for n, g in grads.items()}, targets)

    def prior(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0])


__all__ = ["AnalyticLeak", "first_layer", "leak"]
