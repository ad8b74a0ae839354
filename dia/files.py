"""Files: every file lands whole (temp file + rename); files someone else wrote are read bounded, regular files only."""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
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


def save_tensors(path: Path, tensors: dict[str, Any]) -> Path:
    """A flat dict of tensors: loadable with `torch.load(path, weights_only=True)`."""
    import torch

    return atomic_write(
        path, lambda tmp: torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    )


# ---- reading what someone else may have written: regular files only, bounded ---------------------------
MAX_READ = 256 << 20  # a metrics.json, grid.json, config.yaml or curves.jsonl larger than this is not one dia wrote


def read_regular(path: Path, limit: int = MAX_READ) -> bytes:
    """The bytes of `path` if it is a regular file (opened without blocking: a FIFO is refused, not waited on)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        if st.st_size > limit:
            raise OSError(f"larger than {limit >> 20} MiB")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    """A JSON file (regular, UTF-8); ValueError for anything else (RecursionError included)."""
    try:
        return json.loads(read_regular(path).decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except OSError as exc:
        raise ValueError(str(exc.strerror or exc)) from None
