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
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dia import config, tensors
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
    "load_checkpoint",
    "check_state",
    "check_model",
    "logits_classes",
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
    """Load a user state dict safely (`weights_only=True`), checked first (`check_state`): one clear line when it
    does not fit the model or holds what weights cannot be."""
    state = read_checkpoint(path)
    check_state(model, state, f"model.checkpoint: '{path}'")
    model.load_state_dict(state)


def read_checkpoint(path: str) -> dict[str, Any]:
    """The state dict in the file `path` (a `{name: tensor}` dict, or one under 'state_dict'), unchecked values."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"model.checkpoint: no such file '{path}'")
    try:
        with warnings.catch_warnings():  # torch's notes on what the file holds: check_state says what matters
            warnings.simplefilter("ignore")
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
    return state


def check_state(model: nn.Module, state: dict[Any, Any], where: str) -> None:
    """A state dict for `model`: string keys, the model's names, dense tensors of the model's shapes, real floating
    point and finite where the model's entry is floating (integers where it counts, as BatchNorm's
    num_batches_tracked). Each defect is one UserError line naming the key."""
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise UserError(f"{where} has the key {odd!r} ({type(odd).__name__}); a state dict maps names to tensors")
    own = model.state_dict()
    for k in sorted(set(own) & set(state)):
        if own[k].is_floating_point():
            tensors.floating(state[k], f"{where}: '{k}'")
        else:
            tensors.integers(state[k], f"{where}: '{k}'")
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
        raise UserError(f"{where} does not fit this model: {'; '.join(parts)}")


def check_model(model: Any, where: str = "model") -> None:
    """A model dia can attack: an `nn.Module` with parameters, every parameter and buffer a dense tensor with values
    (not on the meta device), its floating ones real and finite. One UserError line naming the entry."""
    if not isinstance(model, nn.Module):
        raise UserError(f"{where}: a {type(model).__name__}, not a torch.nn.Module")
    if not any(True for _ in model.parameters()):
        raise UserError(f"{where}: {type(model).__name__} has no parameters, so an update holds nothing of it")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise UserError(
                f"{where}: '{name}' is on the meta device (a shape without values); give the model its weights "
                "first (model.to_empty(device='cpu') and load_state_dict)"
            )
        if t.is_floating_point() or t.is_complex():
            tensors.floating(t.detach(), f"{where}: '{name}'")
        else:
            tensors.dense(t, f"{where}: '{name}'")


def logits_classes(model: nn.Module, example: torch.Tensor, where: str = "model") -> int:
    """How many classes the model's logits have, from one eval-mode pass on `example` (B, C, H, W); one UserError
    line when its forward does not return logits, a tensor (B, classes)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor):
        raise UserError(
            f"{where}: its forward returns a {type(out).__name__}; dia needs the logits, a tensor (batch, classes) "
            "(wrap the model in a module whose forward returns them)"
        )
    if out.dim() != 2 or out.shape[0] != example.shape[0] or out.shape[1] < 2:
        raise UserError(
            f"{where}: its forward returns a tensor of shape {tuple(out.shape)} for {example.shape[0]} image(s); "
            "dia needs the logits, (batch, classes) with at least 2 classes"
        )
    return int(out.shape[1])


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
