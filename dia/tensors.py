"""What a tensor handed in from outside (an update, a checkpoint, masks, images) must be before anything computes
with it: a dense tensor with values (not sparse, quantized or on the meta device), of real floating point (or
integer, where counts and labels are asked for), finite. Each defect is one `UserError` line naming where the
tensor came from (`where`: "update: 'fc1.weight'", "model.checkpoint 'ckpt.pt': 'fc1.weight'", ...).

A leaf: torch and NumPy are imported when a function runs, so the rooms above stay cheap to import.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from dia.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor


def dense(value: Any, where: str) -> Tensor:
    """`value` (a tensor or a NumPy array of numbers) as a dense tensor that holds values."""
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise UserError(f"{where} is an array of {value.dtype}; give numbers")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{where} is a {type(value).__name__}, not a tensor")
    if value.device.type == "meta":
        raise UserError(f"{where} is on the meta device (a shape without values); give a tensor that holds its values")
    if value.layout != torch.strided:
        layout = str(value.layout).removeprefix("torch.")
        raise UserError(f"{where} is a {layout} tensor; give a dense one (.to_dense())")
    if value.is_quantized:
        raise UserError(f"{where} is a quantized tensor ({value.dtype}); give floating-point values (.dequantize())")
    return value


def floating(value: Any, where: str, *, finite: bool = True) -> Tensor:
    """`value` as a dense tensor of real floating point, finite unless `finite=False`."""
    import torch

    t = dense(value, where)
    if t.is_complex():
        raise UserError(f"{where} has dtype {t.dtype}; dia takes real floating-point values")
    if not t.is_floating_point():
        raise UserError(f"{where} has dtype {t.dtype}; give floating-point values")
    if finite and t.numel() and not bool(torch.isfinite(t).all()):
        raise UserError(f"{where} holds NaN or inf")
    return t


def integers(value: Any, where: str) -> Tensor:
    """`value` as a dense int64 tensor: integer dtypes, or floats that are whole numbers."""
    import torch

    t = dense(value, where)
    if t.is_floating_point():
        if not (bool(torch.isfinite(t).all()) and bool((t == t.round()).all())):
            raise UserError(f"{where} holds values that are not whole numbers ({t.dtype}); give integers")
    elif t.dtype == torch.bool or t.is_complex():
        raise UserError(f"{where} has dtype {t.dtype}; give integers")
    return t.long()


def number(value: Any, where: str) -> float:
    """One number: a Python int/float or a tensor/array of one element (what a saved scalar is)."""
    if isinstance(value, bool):
        raise UserError(f"{where} is a bool; give a number")
    if isinstance(value, (int, float)):
        return float(value)
    import torch

    t = dense(value, where)
    if t.numel() != 1:
        raise UserError(f"{where} holds {t.numel()} values {tuple(t.shape)}; give one number")
    if t.is_complex() or t.dtype == torch.bool:
        raise UserError(f"{where} has dtype {t.dtype}; give one real number")
    return float(t.reshape(()).item())


def whole(value: Any, where: str, *, low: int, high: int) -> int:
    """One whole number in [low, high] (`number`, with no fractional part)."""
    v = number(value, where)
    if not (math.isfinite(v) and v == int(v) and low <= v <= high):
        raise UserError(f"{where}={_show(v)}: must be an integer in {low}..{high}")
    return int(v)


def positive(value: Any, where: str) -> float:
    """One finite number > 0 (a learning rate)."""
    v = number(value, where)
    if not (math.isfinite(v) and v > 0):
        raise UserError(f"{where}={_show(v)}: must be a finite number > 0")
    return v


def _show(v: float) -> str:
    return str(int(v)) if math.isfinite(v) and v == int(v) else repr(v)


__all__ = ["dense", "floating", "integers", "number", "whole", "positive"]
