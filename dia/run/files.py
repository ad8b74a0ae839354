"""Writing a run's results: every file lands whole (temp file + rename), and a run folder appears only when done."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` then rename tmp to `path`, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null, tensors become lists."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> Path:
    text = json.dumps(_clean(data), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A flat dict of tensors: loadable with `torch.load(path, weights_only=True)`."""
    return atomic_write(
        path, lambda tmp: torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    )
