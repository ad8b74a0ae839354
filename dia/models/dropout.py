"""Capturable dropout: one module that drops at random, records the mask it drew, or applies a given mask.

Every dropout site of a zoo model is a `CapturableDropout`. Outside a `dropout_control` block it behaves
exactly like `nn.Dropout`. Inside one, all sites of the model follow the block's mode:

* ``record``: draw a Bernoulli(1-p) keep-mask (from the block's generator) and store it under the site name
  (the client);
* ``replay``: apply the mask given for the site name (WIIG's oracle masks, DIA's optimized masks); masks
  may be fractional in [0, 1];
* ``off``: no dropout at all (IG's attacker model, which runs in eval mode as in the paper's code).

Masks have the shape of the site's input, batch dimension included, and are applied with the usual
1/(1-p) scaling. Sites with p == 0 never drop and hold no mask.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Mode = Literal["record", "replay", "off"]


@dataclass
class DropoutControl:
    mode: Mode
    masks: dict[str, Tensor] = field(default_factory=dict)
    generator: torch.Generator | None = None


class CapturableDropout(nn.Module):
    """`nn.Dropout` whose mask can be recorded or supplied (see module docstring)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.site = ""  # set by name_sites(); the key of this site's mask
        self._control: DropoutControl | None = None

    def forward(self, x: Tensor) -> Tensor:
        ctl = self._control
        if ctl is None:
            return F.dropout(x, self.p, self.training)
        if ctl.mode == "off" or self.p == 0.0:
            return x
        if ctl.mode == "record":
            keep = torch.full(x.shape, 1.0 - self.p, dtype=x.dtype, device=x.device)
            mask = torch.bernoulli(keep, generator=ctl.generator)
            ctl.masks[self.site] = mask
        else:
            mask = ctl.masks[self.site]
        return x * mask / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site!r}"


def name_sites(model: nn.Module) -> nn.Module:
    """Give every dropout site its module path as mask key; returns the model for chaining."""
    for name, module in model.named_modules():
        if isinstance(module, CapturableDropout):
            module.site = name
    return model


def dropout_sites(model: nn.Module, *, active_only: bool = False) -> dict[str, CapturableDropout]:
    """All capturable dropout sites by name (only those with p > 0 when `active_only`)."""
    return {
        m.site: m
        for m in model.modules()
        if isinstance(m, CapturableDropout) and (m.p > 0 or not active_only)
    }


def set_dropout_rate(model: nn.Module, p: float) -> None:
    """Set p at every dropout site (`model.dropout` sets p everywhere)."""
    for site in dropout_sites(model).values():
        site.p = float(p)


@contextmanager
def dropout_control(
    model: nn.Module,
    mode: Mode,
    masks: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[DropoutControl]:
    """Put every dropout site of `model` under one mode for the duration of the block."""
    ctl = DropoutControl(mode, {} if masks is None else masks, generator)
    sites = list(dropout_sites(model).values())
    for site in sites:
        site._control = ctl
    try:
        yield ctl
    finally:
        for site in sites:
            site._control = None
