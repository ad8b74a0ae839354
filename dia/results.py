"""Writing a run's results: every file lands whole (temp file + rename), and a run folder appears only when done."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from dia.errors import UserError


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
    return atomic_write(path, lambda tmp: torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))


class RunFolder:
    """A run's folder: built as `.<name>.partial` beside its final place and renamed there by `finish()`.

    An unfinished folder of the same name and the same `config_text` is resumed (it keeps its checkpoint);
    one with another config is replaced.
    """

    def __init__(self, root: Path, name: str, config_text: str | None = None) -> None:
        self.final = root / name
        self.path = root / f".{name}.partial"
        self.resumed = False
        if self.final.exists():
            raise UserError(f"run.name: '{self.final}' already exists; choose another run.name")
        if self.path.is_dir():
            saved = self.path / "config.yaml"
            if config_text is not None and saved.is_file() and saved.read_text() == config_text:
                self.resumed = True
                return
            shutil.rmtree(self.path)
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not os.access(root, os.W_OK):
                raise PermissionError("not writable")
            self.path.mkdir(exist_ok=False)
        except (OSError, PermissionError) as exc:
            raise UserError(f"run.output_dir: cannot write to '{root}' ({exc.strerror or exc})") from None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def finish(self) -> Path:
        os.replace(self.path, self.final)
        self.path = self.final
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
