"""Capturable dropout: one module that drops at random, records the mask it drew, or applies a given mask.

Every dropout site of a zoo model is a `CapturableDropout`. Outside a `dropout_control` block it behaves
exactly like `nn.Dropout`. Inside one, all sites of the model follow the block's mode:

* ``record``: draw a Bernoulli(1-p) keep-mask (from the block's generator) and store it under the site name
  (the client);
* ``replay``: apply the mask given for the site name (WIIG's oracle masks, DIA's optimized masks); masks
  may be fractional in [0, 1];
* ``apply``: multiply by the mask given for the site name as it is (already scaled, whatever the site's p):
  a pack of attack problems with different dropout rates runs one attacker model this way;
* ``off``: no dropout at all (IG's attacker model, which runs in eval mode as in the paper's code).

Masks have the shape of the site's input, batch dimension included, and are applied with the usual
1/(1-p) scaling. Sites with p == 0 never drop and hold no mask.

A module that one forward calls several times (a common habit: one `self.drop` after every layer) is one site
per call, in call order: the first call is the site `<module path>`, the k-th call after it `<module path>#<k>`
(`call_key`), each with its own mask of its own shape. A record pass (or `make_capturable`'s probe) counts the
calls (`calls`), so `dropout_sites` lists every call site after the model has run once under control.

Sites come in three kinds (`site.kind`), so that attacks and reports can tell them apart:

* ``module``: a dropout module of the model (our own models' sites; `nn.Dropout` and `nn.Dropout1d/2d/3d`
  modules of third-party models, replaced by `dia.models.capture.convert_dropout_modules`; channel dropout masks have
  shape (B, C, 1, ...));
* ``drop_path``: stochastic depth (timm's `DropPath`), dropout of whole residual branches: one keep value
  per sample, mask shape (B, 1, 1, ...);
* ``functional``: dropout applied functionally inside some module's forward (`F.dropout(...)`, or the
  `dropout_p` of a fused `F.scaled_dot_product_attention`). `dia.models.capture.make_capturable` finds these call
  sites with
  one probe pass and gives each a `dia.models.capture.FunctionalDropoutSite` child module of the module that makes
  the call;
  inside a `dropout_control` block of such a model `F.dropout` and `F.scaled_dot_product_attention` are
  routed to that site, identified by the calling module and the code location of the call (a stable key:
  the same across calls, under `torch.func.vmap`/`grad`/`functional_call`, and in deep copies).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Mode = Literal["record", "replay", "apply", "off"]
Kind = Literal["module", "drop_path", "functional"]

# The real functional ops: sites call these, so routing never loops back into itself.
_F_DROPOUT = F.dropout
_F_SDPA = F.scaled_dot_product_attention


@dataclass
class DropoutControl:
    mode: Mode
    masks: dict[str, Tensor] = field(default_factory=dict)
    generator: torch.Generator | None = None
    visited: set[str] | None = None  # when a set: the names of the sites that ran (probe passes)
    calls: dict[str, int] = field(default_factory=dict)  # per site module: how often it ran in this block


def call_key(site: str, k: int) -> str:
    """The site name of the `k`-th call (from 0) of module site `site` in one forward: `site`, `site#1`, ..."""
    return site if k == 0 else f"{site}#{k}"


class CapturableDropout(nn.Module):
    """`nn.Dropout` whose mask can be recorded or supplied (see module docstring)."""

    kind: Kind = "module"
    # What must be active while the site is controlled, or None: an object with enter()/exit().
    # Functional sites (dia.models.capture) route F.dropout calls to themselves through it.
    router: ClassVar[Any] = None

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.site = ""  # set by name_sites(); the key of this site's mask (of its first call: `call_key`)
        self.calls = 1  # how many times one forward calls this module (counted by record and probe passes)
        self._control: DropoutControl | None = None

    def mask_shape(self, x: Tensor) -> tuple[int, ...]:
        """The shape of this site's keep-mask for input `x` (batch dimension included)."""
        return tuple(x.shape)

    def scale(self) -> float:
        """What kept values are multiplied by."""
        return 1.0 / (1.0 - self.p)

    def uncontrolled(self, x: Tensor) -> Tensor:
        """The behaviour outside a `dropout_control` block."""
        return _F_DROPOUT(x, self.p, self.training)

    def forward(self, x: Tensor) -> Tensor:
        ctl = self._control
        if ctl is None:
            return self.uncontrolled(x)
        k = ctl.calls.get(self.site, 0)
        ctl.calls[self.site] = k + 1
        key = call_key(self.site, k)
        if ctl.visited is not None or ctl.mode == "record":  # passes that count the calls (never the attacker's)
            self.calls = max(self.calls, k + 1)
            if ctl.visited is not None:
                ctl.visited.add(key)
        if ctl.mode == "apply":
            given = ctl.masks.get(key)
            return x if given is None else x * given
        if ctl.mode == "off" or self.p == 0.0:
            return x
        if ctl.mode == "record":
            keep = torch.full(self.mask_shape(x), 1.0 - self.p, dtype=x.dtype, device=x.device)
            mask = torch.bernoulli(keep, generator=ctl.generator)
            ctl.masks[key] = mask
        else:
            mask = ctl.masks.get(key)
            if mask is None:  # a site the attacker does not model (e.g. DropPath for DIA by default): no drop
                return x
        return x * mask * self.scale()

    def describe(self) -> str:
        """How this site is captured, for `describe_sites`."""
        return "CapturableDropout module"

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site!r}"


class CapturableChannelDropout(CapturableDropout):
    """`nn.Dropout1d/2d/3d`: whole channels dropped; mask shape (B, C, 1, ...)."""

    def __init__(self, p: float = 0.5, dims: int = 2) -> None:
        super().__init__(p)
        self.dims = int(dims)

    def mask_shape(self, x: Tensor) -> tuple[int, ...]:
        return tuple(x.shape[:2]) + (1,) * (x.ndim - 2)

    def uncontrolled(self, x: Tensor) -> Tensor:
        return getattr(F, f"dropout{self.dims}d")(x, self.p, self.training)

    def describe(self) -> str:
        return f"CapturableChannelDropout module (replaces nn.Dropout{self.dims}d)"


class CapturableDropPath(CapturableDropout):
    """Stochastic depth (timm's `DropPath`): a residual branch kept or dropped per sample, mask (B, 1, 1, ...)."""

    kind: Kind = "drop_path"

    def __init__(self, p: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__(p)
        self.scale_by_keep = bool(scale_by_keep)

    def mask_shape(self, x: Tensor) -> tuple[int, ...]:
        return (x.shape[0],) + (1,) * (x.ndim - 1)

    def scale(self) -> float:
        return 1.0 / (1.0 - self.p) if self.scale_by_keep else 1.0

    def uncontrolled(self, x: Tensor) -> Tensor:  # timm.layers.drop_path
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(self.mask_shape(x)).bernoulli_(1.0 - self.p)
        return x * keep * self.scale()

    def describe(self) -> str:
        return "CapturableDropPath module (replaces timm DropPath)"

    def extra_repr(self) -> str:
        return f"p={self.p}, scale_by_keep={self.scale_by_keep}, site={self.site!r}"


def name_sites(model: nn.Module) -> nn.Module:
    """Give every dropout site its module path as mask key; returns the model for chaining."""
    for name, module in model.named_modules():
        if isinstance(module, CapturableDropout):
            module.site = name
    return model


def dropout_sites(model: nn.Module, *, active_only: bool = False) -> dict[str, CapturableDropout]:
    """All capturable dropout sites by name (only those with p > 0 when `active_only`): one per call of a module
    that a forward calls several times (`call_key`; known once the model ran in a record or probe pass)."""
    return {
        call_key(m.site, k): m
        for m in model.modules()
        if isinstance(m, CapturableDropout) and (m.p > 0 or not active_only)
        for k in range(m.calls)
    }


@contextmanager
def dropout_control(
    model: nn.Module,
    mode: Mode,
    masks: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[DropoutControl]:
    """Put every dropout site of `model` under one mode for the duration of the block."""
    ctl = DropoutControl(mode, {} if masks is None else masks, generator)
    sites = list({id(s): s for s in dropout_sites(model).values()}.values())
    routers = list({id(s.router): s.router for s in sites if s.router is not None}.values())
    for site in sites:
        site._control = ctl
    for router in routers:
        router.enter()
    try:
        yield ctl
    finally:
        for router in routers:
            router.exit()
        for site in sites:
            site._control = None
