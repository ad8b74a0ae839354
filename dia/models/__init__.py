"""Model zoo: every model's dropout sites are `CapturableDropout` modules (see dia.models.dropout).

Our own models (`mlp`, `vit`, `vit_b16`, `cnn`) are written with capturable sites; timm models (`resnet18`,
`timm`) are made capturable after they are built (dia.models.timm_zoo, `make_capturable`). A model's
settings are its YAML (`configs/model/<name>.yaml`, typed by dia.config.schema); its builder reads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dia.errors import UserError
from dia.models import timm_zoo, vit
from dia.models.cnn import build_cnn
from dia.models.dropout import CapturableDropout, dropout_control, dropout_sites, name_sites
from dia.models.mlp import build_mlp
from dia.models.timm_zoo import build_resnet18, build_timm
from dia.models.vit import build_vit
from dia.registry import Registry

MODELS: Registry = Registry("model")
MODELS.register("mlp")(build_mlp)
MODELS.register("vit")(build_vit)
MODELS.register("cnn")(build_cnn)
MODELS.register("resnet18")(build_resnet18)
MODELS.register("vit_b16")(build_vit)
MODELS.register("timm")(build_timm)

__all__ = [
    "MODELS",
    "build_model",
    "build_for",
    "CapturableDropout",
    "dropout_control",
    "dropout_sites",
    "describe_sites",
    "site_parts",
]

# Rules naming the part of the network a dropout site is in, each next to its model's code (first match wins).
_PART_RULES = (vit.site_part, timm_zoo.site_part)


def site_parts(names: Iterable[str]) -> dict[str, str]:
    """The part of the network each site is in, from its name: 'embedding', 'attention' (weights),
    'attention_out', 'mlp' for the ViTs (ours and timm's), 'drop_path'; 'hidden' for other sites
    (the MLP's and CNN's hidden layers, ResNet's pooled features)."""
    return {n: next((p for rule in _PART_RULES if (p := rule(n)) is not None), "hidden") for n in names}


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
