"""Defenses a client applies to the gradient it sends: after dropout, before the server sees it.

A defense is a choice of the `defense` config group: one module of this package that registers its function at
its definition (`@register_defense`) and `configs/defense/<choice>.yaml` (its settings):

* ``none``: the gradient as computed (the default; nothing changes, bit for bit);
* ``dpsgd``: DP-SGD for one step: each example's gradient (with the dropout mask the client drew for that
  example) clipped to L2 norm ``clip``, summed, Gaussian noise of std ``noise_multiplier * clip`` added
  to the sum, divided by the batch size B (the client's loss is a mean over its batch, as opacus does);
  the (epsilon, delta) of that release comes from opacus' RDP accountant (`privacy`);
* ``prune``: per layer, the largest ``1 - ratio`` share of entries by magnitude kept, the rest zeroed;
* ``quantize``: per layer, ``bits``-bit symmetric uniform quantization: 2^bits - 1 levels spanning
  [-max|g|, max|g|], with ``nearest`` or unbiased ``stochastic`` rounding;
* ``sign``: sign-only (signSGD), 1 bit per entry.

Defenses compose in the order given: ``defense=[prune,dpsgd]`` (or ``defense=prune+dpsgd``; the saved
config holds ``name: prune+dpsgd``). Stages listed before ``dpsgd`` act on each example's gradient
(before clipping); ``dpsgd`` turns the per-example gradients into the one sent gradient; stages after it
act on that (post-processing: the epsilon is unchanged). Without ``dpsgd`` every stage acts on the sent
gradient, in order. Each stage's keys (``defense.clip``, ``defense.ratio``, ...) are in one flat section.

A FedAvg client (`client.local_steps` T > 1, dia.problems) applies ``dpsgd`` and the stages before it to every
local step's gradient (as DP-SGD training does) and the other stages to the update it sends
(`split_defense`); the accountant composes the T steps (`privacy`).

Randomness (DP noise, stochastic rounding) comes only from the generator the caller passes in: one per
client, seeded apart from the client's dropout and the attacker's initialisation (`dia.problems`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import permutations
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from dia import config
from dia.config import Check, run_checks, stage_names
from dia.errors import UserError
from dia.gradients import problem_gradients
from dia.registry import Registry

Grads = dict[str, Tensor]


@dataclass(frozen=True)
class Stage:
    """One defense: `apply(grads, cfg, generator)`; `per_example` stages take (B, ...) gradients and aggregate.

    What a report shows of it is said here too: `label(settings)` names its settings in a table row, and
    `strength` is the settings key that says how strong it is (the x axis of the defense figure, `axis` its
    label; `stronger_when_smaller` for keys such as bits). A stage without a strength is one point. `checks`:
    its settings' rules (dia.config.run_checks).
    """

    apply: Callable[[Grads, Any, torch.Generator], Grads]
    per_example: bool = False
    label: Callable[[Mapping[str, Any]], str] = lambda d: str(d.get("name"))
    strength: str | None = None
    axis: str = ""
    stronger_when_smaller: bool = False
    private: bool = False  # a differential-privacy release: runs report its (epsilon, delta) (`privacy`)
    checks: list[Check] = field(default_factory=list)


DEFENSES: Registry[Stage] = Registry("defense")


def register_defense(name: str, **stage: Any) -> Callable[[Callable], Callable]:
    """Decorator: make `fn(grads, cfg, generator) -> grads` the defense `defense=<name>`; `stage`: the other
    fields of its `Stage` (label, strength, checks, ...)."""

    def deco(fn: Callable) -> Callable:
        DEFENSES.register(name)(Stage(fn, **stage))
        return fn

    return deco


@functools.cache
def default_of(name: str, key: str) -> Any:
    """A default of configs/defense/<name>.yaml (labels leave defaults out)."""
    return config.group_settings("defense", name)[key]


@register_defense("none", label=lambda d: "none")
def identity(grads: Grads, cfg: Any, generator: torch.Generator) -> Grads:
    """No defense: the gradient as computed."""
    return grads


def compositions() -> list[list[str]]:
    """Every defense and every composition `check_composition` allows (each order of distinct stages)."""
    names = [n for n in DEFENSES.names() if n != "none"]
    out = [["none"]]
    for k in range(1, len(names) + 1):
        for combo in permutations(names, k):
            try:
                check_composition(list(combo))
            except UserError:
                continue
            out.append(list(combo))
    return out


def check_composition(parts: list[str]) -> None:
    """A composition's stages exist, none is 'none', and at most one aggregates per-example gradients."""
    stages = [DEFENSES.get(p) for p in parts]
    if len(parts) > 1 and "none" in parts:
        raise UserError(f"defense={'+'.join(parts)}: 'none' cannot be composed with other defenses")
    if len(set(parts)) != len(parts):
        raise UserError(f"defense={'+'.join(parts)}: a defense is listed twice")
    if sum(s.per_example for s in stages) > 1:
        raise UserError(f"defense={'+'.join(parts)}: at most one per-example defense (dpsgd)")


def check_defense(cfg: Any) -> None:
    """One-line `UserError` for an invalid composition or value of the composed defense section."""
    names = stage_names(cfg.name)
    check_composition(names)
    for name in names:
        run_checks(cfg, DEFENSES.get(name).checks, prefix="defense.")


# ---- applying a defense --------------------------------------------------------------------------
def is_none(cfg: Any) -> bool:
    return cfg is None or stage_names(cfg.name) == ["none"]


def per_example_gradients(model: nn.Module, x: Tensor, y: Tensor, masks: Mapping[str, Tensor]) -> Grads:
    """Each example's gradient (B, ...) under the dropout masks the client drew for it (row i of every mask).

    The gradient of the example's own cross-entropy, so their mean is the client's (mean-loss) gradient.
    """
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UserError(
            "defense=dpsgd with batch_size > 1: per-example gradients are undefined for BatchNorm "
            "models (examples share batch statistics); use batch_size=1 or a model without BatchNorm"
        )
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = {n: m.unsqueeze(1) for n, m in masks.items()}  # each example is a 'problem' with a batch of one
    with torch.no_grad():
        return problem_gradients(model, params, x.unsqueeze(1), y.unsqueeze(1), rows, "replay")


def defend(
    grads: Grads,
    cfg: Any,
    generator: torch.Generator,
    per_example: Callable[[], Grads] | None = None,
) -> Grads:
    """The gradient the client sends: `grads` (its mean-loss gradient) through the stages of `cfg`, in order.

    `per_example()` gives the (B, ...) per-example gradients; only a `dpsgd` stage asks for them.
    """
    if is_none(cfg):
        return grads
    stages = [DEFENSES.get(n) for n in stage_names(cfg.name)]
    split = next((i for i, s in enumerate(stages) if s.per_example), None)
    if split is None:
        for stage in stages:
            grads = stage.apply(grads, cfg, generator)
        return grads
    per = per_example() if per_example is not None else {n: g.unsqueeze(0) for n, g in grads.items()}
    for stage in stages[:split]:  # before DP-SGD: on each example's gradient
        rows = [
            stage.apply({n: g[i] for n, g in per.items()}, cfg, generator)
            for i in range(next(iter(per.values())).shape[0])
        ]
        per = {n: torch.stack([r[n] for r in rows]) for n in per}
    grads = stages[split].apply(per, cfg, generator)
    for stage in stages[split + 1 :]:  # after DP-SGD: post-processing of the sent gradient
        grads = stage.apply(grads, cfg, generator)
    return grads


def split_defense(cfg: Any) -> tuple[Any, Any]:
    """A FedAvg client's defense as (per step, on the final update): DP-SGD and the stages before it act on every
    local step's gradient (as DP-SGD training does), the other stages on the update the client sends."""
    if is_none(cfg):
        return None, None
    names = stage_names(cfg.name)
    split = next((i + 1 for i, n in enumerate(names) if DEFENSES.get(n).per_example), 0)
    return _with_stages(cfg, names[:split]), _with_stages(cfg, names[split:])


def _with_stages(cfg: Any, names: list[str]) -> Any:
    """`cfg` (a defense section) restricted to the stages `names` (None: no stage)."""
    if not names:
        return None
    out = copy.deepcopy(cfg)
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, name="+".join(names))
    out.name = "+".join(names)
    return out


def surviving(grads: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Grads:
    """`attack.model_defense`: the attacker's gradient restricted to where the sent gradient is nonzero.

    Pruning (and rounding to 0) is public in the zeros of what the client sends; matching only the
    surviving entries stops the attack from chasing zeros its dense gradient cannot produce.
    """
    return {n: g * (targets[n] != 0).to(g.dtype) for n, g in grads.items()}


def privacy(cfg: Any, steps: int = 1) -> dict[str, float | None] | None:
    """The (epsilon, delta) of one client's release (sampling rate 1; `steps` local DP-SGD steps composed, one for
    FedSGD), or None. Example-level DP of the Gaussian mechanism, from opacus' RDP accountant; epsilon None for
    no noise."""
    if is_none(cfg) or "dpsgd" not in stage_names(cfg.name):
        return None
    if cfg.noise_multiplier == 0:
        return {"epsilon": None, "delta": float(cfg.delta)}
    from opacus.accountants import RDPAccountant  # imported here: only DP runs need it

    accountant = RDPAccountant()
    for _ in range(steps):  # the accountant composes its steps (RDP adds up)
        accountant.step(noise_multiplier=float(cfg.noise_multiplier), sample_rate=1.0)
    return {"epsilon": float(accountant.get_epsilon(delta=float(cfg.delta))), "delta": float(cfg.delta)}


def summary(cfg: Any, model_defense: bool = False, steps: int = 1) -> dict[str, Any]:
    """What metrics.json records about the defense: its keys, the attacker's knowledge of it, (epsilon, delta)
    of the client's release (`steps` local steps)."""
    params = (
        {"name": "none"}
        if cfg is None
        else dict(OmegaConf.to_container(cfg) if OmegaConf.is_config(cfg) else dataclasses.asdict(cfg))
    )
    dp = privacy(cfg, steps)
    return {**params, "model_defense": bool(model_defense), "epsilon": None if dp is None else dp["epsilon"]}


for _module in pkgutil.iter_modules(__path__):  # every defense of the package registers itself
    importlib.import_module(f"{__name__}.{_module.name}")

from dia.defenses.dpsgd import clip_per_example, dpsgd  # noqa: E402
from dia.defenses.prune import prune, prune_mask  # noqa: E402
from dia.defenses.quantize import ROUNDINGS, quantize  # noqa: E402
from dia.defenses.sign import sign  # noqa: E402

# compose's code checks for `defense=` (registered from here: config imports no code)
config.register_check("defense", lambda cfg: check_defense(cfg.defense))

__all__ = [
    "DEFENSES",
    "Stage",
    "Grads",
    "register_defense",
    "default_of",
    "identity",
    "compositions",
    "check_composition",
    "check_defense",
    "is_none",
    "per_example_gradients",
    "defend",
    "split_defense",
    "surviving",
    "privacy",
    "summary",
    "clip_per_example",
    "dpsgd",
    "prune",
    "prune_mask",
    "ROUNDINGS",
    "quantize",
    "sign",
]
