"""Making any model's stochastic sites capturable: dropout modules, DropPath, and functional dropout calls.

`make_capturable(model, example)` converts `nn.Dropout*` and timm's `DropPath` modules to capturable sites,
turns fused attention off where a module has the flag, and finds the `F.dropout` /
`F.scaled_dot_product_attention(dropout_p=...)` calls a forward makes with one probe pass: each call site
(the calling module plus the code location of the call) becomes a `FunctionalDropoutSite` child of the
calling module. Inside `dropout_control` those functions are routed to their sites (`ROUTING`).
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dia.models.dropout import (
    _F_DROPOUT,
    _F_SDPA,
    CapturableChannelDropout,
    CapturableDropout,
    Kind,
    dropout_control,
    name_sites,
)

# ---- functional dropout: routing F.dropout / F.scaled_dot_product_attention calls to their sites ----------

_KEY_ATTR = "_dia_functional_sites"  # on a module that calls F.dropout: {call key: child site name}
CallKey = tuple[tuple[str, str, int], ...]


@dataclass
class _Call:
    owner: nn.Module
    key: CallKey
    op: str  # "dropout" | "sdpa"
    p: float


class _Routing:
    """Swaps `torch.nn.functional.dropout` / `.scaled_dot_product_attention` for routers while needed (refcounted)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth = 0
        self.probe: list[_Call] | None = None  # set during make_capturable's probe pass
        self.probe_modules: set[int] = set()

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0:
                F.dropout = _routed_dropout
                F.scaled_dot_product_attention = _routed_sdpa
            self.depth += 1

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                F.dropout = _F_DROPOUT
                F.scaled_dot_product_attention = _F_SDPA


ROUTING = _Routing()


class FunctionalDropoutSite(CapturableDropout):
    """The site of a functional dropout call (`F.dropout`, or the `dropout_p` of `F.scaled_dot_product_attention`).

    A child of the module whose forward makes the call; `origin` says where the call is. It only acts
    inside a `dropout_control` block (outside one, the model's own call runs untouched).
    """

    kind: Kind = "functional"
    router = ROUTING  # dropout_control routes F.dropout / F.scaled_dot_product_attention while it is active

    def __init__(self, p: float, origin: str = "") -> None:
        super().__init__(p)
        self.origin = origin

    def describe(self) -> str:
        return f"functional: {self.origin}"

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site!r}, origin={self.origin!r}"


def _caller(frame: Any) -> tuple[nn.Module, CallKey] | None:
    """The innermost module whose code (directly or through helper functions) made the call, and the call path.

    The key is the (file, function, line) of every frame from the call up to that module's method: it
    names the call site, not the call, so it is the same on every forward.
    """
    key = []
    for _ in range(32):
        if frame is None:
            return None
        code = frame.f_code
        key.append((code.co_filename, code.co_name, frame.f_lineno))
        owner = frame.f_locals.get("self") if "self" in code.co_varnames else None
        if isinstance(owner, nn.Module):
            return owner, tuple(key)
        frame = frame.f_back
    return None


def _site_for(frame: Any, op: str, p: float) -> FunctionalDropoutSite | None:
    """The controlled site of this call, or None (the call then runs untouched)."""
    found = _caller(frame)
    if found is None:
        return None
    owner, key = found
    table = owner.__dict__.get(_KEY_ATTR)
    if table is not None and key in table:
        site = owner._modules[table[key]]
        return site if site._control is not None else None  # type: ignore[return-value]
    probe = ROUTING.probe
    if probe is not None and id(owner) in ROUTING.probe_modules and (op == "dropout" or p > 0):
        if all(c.key != key or c.owner is not owner for c in probe):
            probe.append(_Call(owner, key, op, float(p)))
    return None


def _routed_dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    site = _site_for(sys._getframe(1), "dropout", p)
    if site is not None:
        return site(input)
    if ROUTING.probe is not None:
        return input  # the probe pass runs with dropout off
    return _F_DROPOUT(input, p, training, inplace)


def _routed_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    site = _site_for(sys._getframe(1), "sdpa", dropout_p)
    if site is None:
        if ROUTING.probe is not None:
            dropout_p = 0.0
        extra = {"enable_gqa": True} if enable_gqa else {}  # torch < 2.5 has no enable_gqa
        return _F_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra
        )
    # the math of scaled_dot_product_attention, with the attention weights through the site
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    scores = query @ key.transpose(-2, -1) * (1.0 / math.sqrt(query.shape[-1]) if scale is None else scale)
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return site(scores.softmax(dim=-1)) @ value


# ---- making a third-party model capturable ----------------------------------------------------------------


class UncapturableModel(ValueError):
    """The model has randomness `make_capturable` cannot capture."""


class ModelInputError(UncapturableModel):
    """The model cannot run on the example input (its own message)."""


Converter = Callable[[nn.Module], nn.Module | None]


def _default_converter(module: nn.Module) -> nn.Module | None:
    if type(module) is nn.Dropout:
        return CapturableDropout(module.p)
    for dims in (1, 2, 3):
        if type(module) is getattr(nn, f"Dropout{dims}d"):
            return CapturableChannelDropout(module.p, dims)
    return None


def convert_dropout_modules(model: nn.Module, converters: list[Converter] | None = None) -> int:
    """Replace dropout modules by capturable sites (`nn.Dropout`, `nn.Dropout1d/2d/3d`, plus `converters`).

    A converter returns the replacement for a module, or None to leave it. Returns how many were replaced.
    """
    convs = [_default_converter, *(converters or [])]
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CapturableDropout):
                continue
            for conv in convs:
                new = conv(child)
                if new is not None:
                    new.train(child.training)
                    setattr(parent, name, new)
                    count += 1
                    break
    return count


def disable_fused_attention(model: nn.Module) -> int:
    """Set `fused_attn = False` on every module that has that flag (timm's attention layers).

    Their attention dropout then runs through their `attn_drop` module instead of the `dropout_p` of a
    fused kernel, so it is a module site (named like our small ViT's). Returns how many were switched.
    """
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = False
            count += 1
    return count


def make_capturable(
    model: nn.Module, example: Tensor, *, converters: list[Converter] | None = None, check: bool = True
) -> nn.Module:
    """Make every stochastic site of `model` capturable; returns the model.

    1. dropout modules become capturable sites (`convert_dropout_modules`); fused attention is switched off
       where a module has a `fused_attn` flag (`disable_fused_attention`);
    2. one probe pass on `example` (train mode, dropout off, no gradient) finds every functional dropout call
       (`F.dropout`, `F.scaled_dot_product_attention` with `dropout_p > 0`) and gives it a
       `FunctionalDropoutSite` child of the calling module; converted modules that never ran (e.g. an
       `attn_drop` that only lends its p to a fused kernel) go back to plain `nn.Dropout`;
    3. with `check`, a second pass with every site off must give the probe's output: any randomness left
       (an op nobody routes) raises `UncapturableModel`.

    Buffers and the train/eval mode are left as they were. An `example` the model cannot take raises
    `ModelInputError` with the model's own message.
    """
    convert_dropout_modules(model, converters)
    disable_fused_attention(model)
    name_sites(model)
    training = model.training
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    try:
        calls: list[_Call] = []
        with torch.no_grad(), _probing(model, calls), dropout_control(model, "off") as ctl:
            ctl.visited = set()
            try:
                reference = model(example)
            except Exception as exc:
                text = str(exc).strip()
                raise ModelInputError(
                    f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
                ) from exc
        _add_functional_sites(calls)
        _release_unused(model, ctl.visited)
        name_sites(model)
        if check:
            with torch.no_grad(), dropout_control(model, "off"):
                again = model(example)
            ref, out = _first_tensor(reference), _first_tensor(again)
            if ref is not None and out is not None and not torch.allclose(ref, out, rtol=1e-4, atol=1e-5):
                raise UncapturableModel(
                    "the model is still random with every dropout site off: it has a stochastic op dia cannot "
                    "capture (only dropout modules, DropPath, F.dropout and attention dropout are captured)"
                )
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        model.train(training)
    return model


@contextmanager
def _probing(model: nn.Module, calls: list[_Call]) -> Iterator[None]:
    with ROUTING.lock:
        if ROUTING.probe is not None:
            raise RuntimeError("make_capturable is not reentrant")
        ROUTING.probe, ROUTING.probe_modules = calls, {id(m) for m in model.modules()}
    ROUTING.enter()
    try:
        yield
    finally:
        ROUTING.exit()
        with ROUTING.lock:
            ROUTING.probe, ROUTING.probe_modules = None, set()


def _add_functional_sites(calls: list[_Call]) -> None:
    for call in calls:
        table = call.owner.__dict__.setdefault(_KEY_ATTR, {})
        base = "functional_dropout" if call.op == "dropout" else "functional_attn_drop"
        name, i = base, 1
        while name in call.owner._modules or hasattr(call.owner, name):
            name, i = f"{base}_{i}", i + 1
        file, func, line = call.key[0]
        what = "F.dropout" if call.op == "dropout" else "F.scaled_dot_product_attention(dropout_p)"
        short = "/".join(file.replace("\\", "/").split("/")[-2:])
        site = FunctionalDropoutSite(call.p, origin=f"{what} in {func}() at {short}:{line}")
        call.owner.add_module(name, site)
        table[call.key] = name


def _release_unused(model: nn.Module, visited: set[str]) -> None:
    """Converted module sites that never ran hold no mask: plain dropout modules again (they keep their p)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (CapturableDropout, CapturableChannelDropout) and child.site not in visited:
                plain = (
                    nn.Dropout(child.p)
                    if type(child) is CapturableDropout
                    else getattr(nn, f"Dropout{child.dims}d")(child.p)
                )
                plain.train(child.training)
                setattr(parent, name, plain)


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None
