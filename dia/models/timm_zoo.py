"""timm models as zoo models: randomly initialised (never downloaded), every stochastic site capturable.

* ``resnet18``: timm's ResNet-18; dropout before the classifier (timm's ``drop_rate``, applied with
  ``F.dropout`` inside ``forward_head``: a functional site), optional stochastic depth; with
  ``model.block_dropout=true`` also dropout inside each of its 8 residual blocks (an ``nn.Dropout`` of the same p
  in the block's ``drop_block`` slot, after its first convolution and BatchNorm, before the ReLU: sites
  ``layer<i>.<j>.drop_block``, masks of the feature map's shape).
* ``timm``: any timm architecture, ``model.arch=<name>``. ``model.dropout`` is the p of every dropout site the
  model has (timm's ``drop_rate``/``proj_drop_rate``/``pos_drop_rate`` and every other ``nn.Dropout``),
  ``model.attn_dropout`` that of attention-weight sites (null: ``model.dropout``), ``model.drop_path`` timm's
  ``drop_path_rate`` (stochastic depth, increasing linearly over the blocks as timm schedules it).
  timm's ViT-B/16 is ``model=timm model.arch=vit_base_patch16_224``; ``model=vit_b16`` is the paper's
  (dia.models.vit).

How the sites are made capturable is `dia.models.capture.make_capturable`: dropout modules and ``DropPath``
are replaced by capturable sites, fused attention is switched off (so attention dropout runs through the
``attn_drop`` module), and functional ``F.dropout`` calls get a site of their own, found by a probe pass.

BatchNorm (``model.batch_norm``): ``running`` (default) makes every BatchNorm normalize with its running
statistics in train and eval mode alike and never update them (frozen statistics, as in fine-tuning with
frozen BatchNorm): the client's training step and the attacker's copy are the same function for any batch
size, including B=1 at 32 px, where the last ResNet stage is 1x1 and batch statistics do not exist.
``native`` keeps PyTorch's BatchNorm: the client normalizes with its batch's statistics (train mode) and
the attack's copy does the same (`torch.func.replace_all_batch_norm_modules_` in dia.attacks.ig); it
needs more than one value per channel, i.e. B >= 2 for ResNet-18 on 32 px inputs.
"""

from __future__ import annotations

import difflib
import re
import warnings
from typing import Any

import torch
from torch import nn

from dia.errors import UserError
from dia.models import register_model, register_site_part
from dia.models.batchnorm import share_statistics
from dia.models.capture import FunctionalDropoutSite, ModelInputError, UncapturableModel, make_capturable
from dia.models.dropout import CapturableDropout, CapturableDropPath, dropout_sites

BATCH_NORM = ("running", "native")


# ---- the builders ----------------------------------------------------------------------------------


@register_model("resnet18")
def build_resnet18(cfg: Any, *, channels: int, image_size: int, num_classes: int) -> nn.Module:
    _check_rates(cfg)
    if getattr(cfg, "bn_stats", False) and cfg.batch_norm != "native":
        raise UserError("model.bn_stats=true: frozen BatchNorm has no batch statistics; set model.batch_norm=native")
    model = _create(
        "resnet18",
        "model=resnet18",
        channels,
        image_size,
        dict(num_classes=num_classes, in_chans=channels, drop_rate=cfg.dropout, drop_path_rate=cfg.drop_path),
    )
    if getattr(cfg, "block_dropout", False):
        for block in model.modules():
            if isinstance(getattr(block, "drop_block", None), nn.Identity):
                block.drop_block = nn.Dropout(cfg.dropout)
    model = _capturable(model, "model=resnet18", channels, image_size, batch_norm=cfg.batch_norm)
    if getattr(cfg, "bn_stats", False):
        share_statistics(model)
    return model


@register_model("timm")
def build_timm(cfg: Any, *, channels: int, image_size: int, num_classes: int) -> nn.Module:
    _check_rates(cfg)
    arch = check_arch(cfg.arch)
    what = f"model.arch={arch}"
    attn = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout
    rates = dict(
        drop_rate=cfg.dropout,
        proj_drop_rate=cfg.dropout,
        pos_drop_rate=cfg.dropout,
        attn_drop_rate=attn,
        drop_path_rate=cfg.drop_path,
    )
    model = _create(
        arch,
        what,
        channels,
        image_size,
        dict(num_classes=num_classes, in_chans=channels, img_size=image_size, **rates),
        optional=("img_size", *rates),
    )
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if (
        isinstance(patch, (tuple, list))
        and patch
        and all(isinstance(s, int) and s > 0 for s in patch)
        and any(image_size % s for s in patch)
    ):
        raise UserError(f"{what} has patch size {tuple(patch)}, which does not divide the input size {image_size}")
    for name, module in model.named_modules():  # model.dropout / model.attn_dropout at every dropout module
        if type(module) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d):
            module.p = attn if _is_attention_site(name) else cfg.dropout
    model = _capturable(model, what, channels, image_size, batch_norm=cfg.batch_norm)
    sites = dropout_sites(model)
    if cfg.drop_path > 0 and not any(s.kind == "drop_path" for s in sites.values()):
        raise UserError(f"{what} has no stochastic depth (DropPath) sites; leave model.drop_path at 0")
    if cfg.attn_dropout and not any(_is_attention_site(n) for n in sites):
        raise UserError(f"{what} has no attention dropout sites; leave model.attn_dropout unset")
    if cfg.dropout > 0 and not any(s.p > 0 and s.kind != "drop_path" for s in sites.values()):
        warnings.warn(f"{what} has no dropout sites: model.dropout={cfg.dropout:g} has no effect", stacklevel=2)
    return model


# ---- shared machinery ------------------------------------------------------------------------------------


def check_arch(arch: str) -> str:
    """The timm architecture name, or a one-line UserError naming close matches."""
    import timm

    arch = str(arch)
    if timm.is_model(arch):
        return arch
    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    if not close:  # a prefix or family name ('convnext', 'vit_tiny')
        close = [n for n in names if n.startswith(arch)][:5]
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models()"
    raise UserError(f"model.arch: unknown timm model '{arch}'{hint}")


def _check_rates(cfg: Any) -> None:
    for key in ("attn_dropout", "drop_path"):
        value = getattr(cfg, key, None)
        if value is not None and not 0.0 <= value < 1.0:
            raise UserError(f"model.{key}={value!r}: must be in [0, 1)")
    if getattr(cfg, "batch_norm", "running") not in BATCH_NORM:
        raise UserError(f"model.batch_norm={cfg.batch_norm!r}: must be one of: {', '.join(BATCH_NORM)}")


def _create(
    arch: str, what: str, channels: int, image_size: int, kwargs: dict[str, Any], optional: tuple[str, ...] = ()
) -> nn.Module:
    """timm.create_model(arch, pretrained=False, **kwargs), leaving out `optional` arguments the model does not take."""
    import timm

    kwargs = dict(kwargs)
    while True:
        try:
            return timm.create_model(arch, pretrained=False, **kwargs)
        except TypeError as exc:
            bad = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
            if bad and bad.group(1) in kwargs and bad.group(1) in optional:
                kwargs.pop(bad.group(1))
                continue
            raise UserError(f"{what}: timm cannot build it with {_fmt(kwargs)} ({_line(exc)})") from None
        except Exception as exc:
            raise UserError(
                f"{what} cannot be built for {channels}x{image_size}x{image_size} inputs ({_line(exc)})"
            ) from None


def _capturable(model: nn.Module, what: str, channels: int, image_size: int, *, batch_norm: str) -> nn.Module:
    if batch_norm == "running":
        running_stats_batch_norm(model)
    native_bn = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in _RUNNING.values() for m in model.modules()
    )
    example = torch.randn(
        2 if native_bn else 1, channels, image_size, image_size, generator=torch.Generator().manual_seed(0)
    )
    try:
        return make_capturable(model, example, converters=[_drop_path])
    except ModelInputError as exc:
        raise UserError(f"{what} cannot take {channels}x{image_size}x{image_size} inputs ({exc})") from None
    except UncapturableModel as exc:
        raise UserError(f"{what}: {exc}") from None


def _drop_path(module: nn.Module) -> nn.Module | None:
    from timm.layers import DropPath

    if isinstance(module, DropPath):
        return CapturableDropPath(float(module.drop_prob), getattr(module, "scale_by_keep", True))
    return None


def _is_attention_site(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return "attn_drop" in leaf


class _RunningStats:
    """BatchNorm mixin: normalize with the running statistics in train mode too, and never update them.

    `track_running_stats` is False on these modules (their statistics are fixed), which also tells
    `torch.func.replace_all_batch_norm_modules_` (the attack's copy of the model) to leave them as they are.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.training
        self.training = False
        try:
            return super().forward(x)  # type: ignore[misc]
        finally:
            self.training = training


_RUNNING: dict[type, type] = {}


def running_stats_batch_norm(model: nn.Module) -> int:
    """Make every BatchNorm of `model` use its running statistics in train and eval mode (state dict unchanged)."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and cls not in _RUNNING.values():
            if cls not in _RUNNING:
                _RUNNING[cls] = type(f"RunningStats{cls.__name__}", (_RunningStats, cls), {"__module__": __name__})
            module.__class__ = _RUNNING[cls]
            if module.running_mean is not None:
                module.track_running_stats = False
            count += 1
    return count


def _fmt(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in kwargs.items())


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


# Which part of the network a site of a timm ViT-style model is in (for per-part mask measures).
_PARTS = (
    (re.compile(r"(.*\.)?(pos_drop|patch_drop)"), "embedding"),
    (
        re.compile(r".*(attn\.attn_drop|functional_attn_drop\w*)"),
        "attention",
    ),  # attention weights (SDPA's dropout_p too)
    (re.compile(r".*attn\.proj_drop"), "attention_out"),
    (re.compile(r".*mlp\.drop\d*"), "mlp"),
    (re.compile(r".*drop_path\d*"), "drop_path"),
)


@register_site_part
def site_part(name: str) -> str | None:
    """The part of a timm model a site is in ('embedding', 'attention', 'attention_out', 'mlp', 'drop_path'), or
    None."""
    return next((part for pattern, part in _PARTS if pattern.fullmatch(name)), None)


__all__ = [
    "build_resnet18",
    "build_timm",
    "site_part",
    "check_arch",
    "running_stats_batch_norm",
    "CapturableDropout",
    "FunctionalDropoutSite",
]
