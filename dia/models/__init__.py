"""Model zoo: every model's dropout sites are `CapturableDropout` modules (see dia.models.dropout).

Our own models (`mlp`, `vit`, `vit_b16`, `cnn`) are written with capturable sites; timm models (`resnet18`,
`timm`) are made capturable after they are built (dia.models.timm_zoo, `make_capturable`). A model is one module
of this package whose builder is registered at its definition (`@register_model("name")`) and one YAML,
`configs/model/<name>.yaml` (its settings, typed by dia.config.schema), which the builder reads. Every module
here is imported with the package, so a new file is found without naming it anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dia import config
from dia.errors import UserError
from dia.registry import Registry

Builder = Callable[..., nn.Module]  # builder(cfg, *, channels, image_size, num_classes) -> model
MODELS: Registry[Builder] = Registry("model")
# Rules naming the part of the network a dropout site is in, each registered next to its model's code (first
# match wins; `site_parts`).
PART_RULES: list[Callable[[str], str | None]] = []


def register_model(*names: str) -> Callable[[Builder], Builder]:
    """Decorator: make a builder the code of `model=<name>` for each of `names`."""

    def deco(builder: Builder) -> Builder:
        for name in names:
            MODELS.register(name)(builder)
        return builder

    return deco


def register_site_part(rule: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """Decorator: a rule naming the part of the network a site (by its name) is in, or None when not its model's."""
    PART_RULES.append(rule)
    return rule


from dia.models.dropout import CapturableDropout, dropout_control, dropout_sites, name_sites  # noqa: E402

for _module in pkgutil.iter_modules(__path__):  # every model of the package registers itself
    importlib.import_module(f"{__name__}.{_module.name}")

# compose's code checks for `model=` (registered from here: config imports no code)
config.register_check("model", lambda cfg: MODELS.get(cfg.model.name))

__all__ = [
    "MODELS",
    "register_model",
    "register_site_part",
    "build_model",
    "build_for",
    "CapturableDropout",
    "dropout_control",
    "dropout_sites",
    "describe_sites",
    "site_parts",
]


def site_parts(names: Iterable[str]) -> dict[str, str]:
    """The part of the network each site is in, from its name: 'embedding', 'attention' (weights),
    'attention_out', 'mlp' for the ViTs (ours and timm's), 'drop_path'; 'hidden' for other sites
    (the MLP's and CNN's hidden layers, ResNet's pooled features)."""
    return {n: next((p for rule in PART_RULES if (p := rule(n)) is not None), "hidden") for n in names}


def build_model(cfg: Any, *, channels: int, image_size: int, num_classes: int, seed: int) -> nn.Module:
    """Build `cfg.name` with seeded random weights (or `cfg.checkpoint`), dropout sites named."""
    builder = MODELS.get(cfg.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(cfg, channels=channels, image_size=image_size, num_classes=num_classes)
    name_sites(model)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    return model


def build_for(cfg: Any) -> nn.Module:
    """The model of a whole run config (`cfg.model`) for its data (`cfg.data`), seeded with `cfg.run.seed`."""
    return build_model(
        cfg.model,
        channels=cfg.data.channels,
        image_size=cfg.data.image_size,
        num_classes=cfg.data.num_classes,
        seed=cfg.run.seed,
    )


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a user state dict safely (`weights_only=True`); one clear line when it does not fit."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"model.checkpoint: no such file '{path}'")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"model.checkpoint: cannot read '{path}' as a tensor state dict ({type(exc).__name__}: {exc})".splitlines()[
                0
            ]
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"model.checkpoint: '{path}' holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of '{k}' is {tuple(state[k].shape)}, model needs {tuple(own[k].shape)}")
        raise UserError(f"model.checkpoint: '{path}' does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(state)


def describe_sites(model: nn.Module, example: torch.Tensor) -> list[dict[str, Any]]:
    """Name, p, per-sample mask shape, kind and capture mechanism of every dropout site, from one recorded pass.

    `kind` is how the site is captured: "module" (a dropout module), "drop_path" (stochastic depth, one
    keep value per sample) or "functional" (a functional dropout call routed to a site); `captured_by`
    says it in words (for functional sites: which call, where).
    """
    with torch.no_grad(), dropout_control(model, "record") as ctl:
        model(example)
    return [
        {
            "site": name,
            "p": site.p,
            "mask_shape": list(ctl.masks[name].shape[1:]) if name in ctl.masks else None,
            "kind": site.kind,
            "captured_by": site.describe(),
        }
        for name, site in dropout_sites(model).items()
    ]
