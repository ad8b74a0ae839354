"""A run folder's files: the one module that writes and reads them.

    config.yaml          the fully resolved config (`--config` reruns it)
    metrics.json         the summary: status, coordinates (attack, model, data, dropout), means and per-victim rows
    curves.jsonl         curve points while the attack runs, one JSON object per line
    reconstructions.pt   tensors (originals, reconstructions, recovered masks): `torch.load(f, weights_only=True)`
    reconstructions.png  originals above reconstructions, each titled with its SSIM

dia.train's runs (dia.run.runs), `dia.save`, the loggers and dia.report all go through here, so a folder any of
them writes is one the others read. A folder is a finished run when it holds a metrics.json with the keys of
`REQUIRED`; metrics.json is written last. Every file is written whole (dia.files: temp file + rename); files
are read as someone else may have left them (regular files only, bounded, a torn last line of curves.jsonl
dropped).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from dia.files import read_json, read_regular, save_tensors, write_json, write_text

CONFIG = "config.yaml"
METRICS = "metrics.json"
CURVES = "curves.jsonl"
TENSORS = "reconstructions.pt"
PICTURE = "reconstructions.png"
STATUSES = ("completed", "diverged")  # a finished run's "status"
# What every metrics.json holds, and what a reader needs of one (the coordinates of its row and the rows: an older
# metrics.json without the status or means is still read).
REQUIRED = ("status", "attack", "model", "data", "dropout", "mean", "victims")
READ = ("attack", "model", "data", "dropout", "victims")


# ---- config.yaml ----------------------------------------------------------------------------------------
def write_config(folder: Path, text: str) -> Path:
    return write_text(Path(folder) / CONFIG, text)


def read_config_text(folder: Path) -> str | None:
    """A run's config.yaml as its text (None when it has none or it cannot be read)."""
    try:
        return read_regular(Path(folder) / CONFIG).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def read_config(folder: Path) -> dict[str, Any]:
    """A run's config.yaml as a plain dict ({} when it has none); ValueError when it cannot be read."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(read_regular(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise ValueError(f"{path} cannot be read ({type(exc).__name__})") from None
    return data if isinstance(data, dict) else {}


# ---- metrics.json ---------------------------------------------------------------------------------------
def summary(
    *, status: str, attack: str, model: str, data: str, dropout: float, rows: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """metrics.json's content: the run's status and coordinates, the mean of every metric over `rows` (the
    per-victim rows of dia.scores.score), the rows, and what else the writer records (`extra`)."""
    from dia.metrics import mean_metrics  # here: readers of a run folder (dia.report) need no torch

    if status not in STATUSES:
        raise ValueError(f"status {status!r}: one of {', '.join(STATUSES)}")
    head = {"status": status, "attack": attack, "model": model, "data": data, "dropout": float(dropout)}
    return {**head, "mean": mean_metrics(rows), **extra, "victims": rows}


def write_metrics(folder: Path, content: dict[str, Any]) -> Path:
    missing = [k for k in REQUIRED if k not in content]
    if missing:
        raise ValueError(f"metrics.json without {', '.join(missing)}: build it with dia.run.record.summary")
    return write_json(Path(folder) / METRICS, content)


def read_metrics(path: Path) -> dict[str, Any]:
    """A metrics.json (the file, or its folder), checked to be one a run wrote; ValueError otherwise."""
    path = Path(path)
    path = path / METRICS if path.is_dir() else path
    try:
        m = read_json(path)
        missing = [k for k in READ if k not in m]
        if missing:
            raise KeyError(", ".join(missing))
        for key in ("data", "model", "attack"):
            m[key] = str(m[key])
        m["dropout"] = float(m["dropout"])
        if not math.isfinite(m["dropout"]):
            raise ValueError("dropout is not a number")
        if not isinstance(m["victims"], list) or not all(isinstance(v, dict) for v in m["victims"]):
            raise TypeError("victims is not a list of per-victim rows")
    except (KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise ValueError(f"{type(exc).__name__}: {str(exc)[:80]}") from None
    return m


# ---- curves.jsonl ---------------------------------------------------------------------------------------
def append_curves(folder: Path, points: Sequence[dict[str, Any]]) -> None:
    """Add curve points ({"group", "iteration", "step", name: value, ...}) to the folder's curves.jsonl."""
    with open(Path(folder) / CURVES, "a") as f:
        f.writelines(json.dumps(p) + "\n" for p in points)


def read_curves(folder: Path) -> list[dict[str, Any]]:
    """The folder's curve points, in order ([] without a curves.jsonl; lines that are not a JSON object, a torn
    last line included, are dropped: curves are a picture, not a result)."""
    path = Path(folder) / CURVES
    if not path.is_file():
        return []
    out = []
    for line in read_regular(path).decode("utf-8", errors="replace").splitlines():
        try:
            point = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(point, dict):
            out.append(point)
    return out


def keep_curves(folder: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite curves.jsonl with the points `keep` says (on resume: those of the saved progress)."""
    text = "".join(json.dumps(p) + "\n" for p in read_curves(folder) if keep(p))
    write_text(Path(folder) / CURVES, text)


def step(point: dict[str, Any]) -> int:
    """The global step of a curve point (a run's groups of problems follow each other)."""
    return int(point.get("step", point.get("iteration", 0)))


# ---- reconstructions.pt and .png ------------------------------------------------------------------------
def write_tensors(folder: Path, tensors: dict[str, Any]) -> Path:
    return save_tensors(Path(folder) / TENSORS, tensors)


def read_tensors(folder: Path) -> dict[str, Any]:
    """reconstructions.pt (weights_only: tensors only); ValueError when missing or unreadable."""
    import torch

    path = Path(folder) / TENSORS
    try:
        with io.BytesIO(read_regular(path)) as f:
            out = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle, not ours: not a record
        first = str(exc).splitlines()[0][:80] if str(exc) else ""
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {first})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path} holds a {type(out).__name__}, not named tensors")
    return out


class Captions(list):
    """Each victim's caption, and (`clients`) the client whose gradient it came from when clients send B > 1 images:
    the picture frames each client's images (dia.run.plotting)."""

    clients: list[int] | None = None


def titles(rows: list[dict[str, Any]], batch: int | None = None) -> Captions:
    """Each victim's caption: its index and its SSIM when it has one; with `clients` when clients send B > 1 images
    (`batch`; None: as the rows' `problem` say)."""
    problems = [r.get("problem") for r in rows]
    if batch is None:
        known = [p for p in problems if p is not None]
        batch = len(known) // len(set(known)) if known and len(known) == len(problems) else 1
    out = Captions()
    for r in rows:
        text = f"#{r.get('index', '?')}"
        if isinstance(r.get("ssim"), (int, float)):
            text += f"  SSIM {r['ssim']:.2f}"
        out.append(text)
    if batch > 1 and all(isinstance(p, int) for p in problems):
        out.clients = problems
    return out


def write_picture(folder: Path, originals: Any, reconstructions: Any, captions: list[str], *, title: str) -> Path:
    """reconstructions.png: originals above reconstructions (dia.run.plotting), each client's images framed when
    clients send B > 1 (`Captions.clients`)."""
    from dia.run.plotting import reconstruction_grid

    clients = getattr(captions, "clients", None)
    return reconstruction_grid(
        Path(folder) / PICTURE, originals, reconstructions, captions, title=title, clients=clients
    )


def picture_title(attack: str, model: str, data: str, dropout: float, steps: int = 1) -> str:
    return f"{attack.upper()} on {model}/{data}, p={dropout:g}" + (f", T={steps}" if steps > 1 else "")


__all__ = [
    "CONFIG",
    "METRICS",
    "CURVES",
    "TENSORS",
    "PICTURE",
    "STATUSES",
    "REQUIRED",
    "READ",
    "write_config",
    "read_config_text",
    "read_config",
    "summary",
    "write_metrics",
    "read_metrics",
    "append_curves",
    "read_curves",
    "keep_curves",
    "step",
    "write_tensors",
    "read_tensors",
    "Captions",
    "titles",
    "write_picture",
    "picture_title",
]
