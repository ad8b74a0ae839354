"""Names that come from a config: a grid cell's id, and values written back as command-line text.

A cell's id depends on its own overrides only (`cell_id`): a readable prefix of its headline keys (data,
model, rate, attack, victims) and a hash of every override that can change the result (`logger.*` and
the per-run placement keys do not). `python -m dia.train ... run.name=auto-cell` names its run folder with
the id `dia.grid` gives the same cell (dia.grid.sweep), and tags and reports write values as `format_value`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import yaml

AUTO_CELL = "auto-cell"  # run.name=auto-cell: name the run folder with its cell id (see `cell_id`)
RESERVED = ("run.output_dir", "run.name", "logger.wandb.group", "logger.wandb.tags")  # set by dia.grid per cell
HEADLINE = (
    "data",
    "model",
    "model.dropout",
    "client.local_steps",
    "attack",
    "victims",
    "num_victims",
)  # the readable prefix of an id


def _not_hashed(key: str) -> bool:
    """Keys that cannot change a run's result (where it goes, how it is logged) stay out of a cell's id."""
    return key in RESERVED or key.startswith("logger.") or key in ("run.progress",)


def format_value(value: Any) -> str:
    """A value as dia.train's `key=value` parser (YAML) reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return (
            "["
            + ", ".join(
                json.dumps(v) if isinstance(v, str) and not re.fullmatch(r"[A-Za-z0-9._-]+", v) else format_value(v)
                for v in value
            )
            + "]"
        )
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value and not re.search(r"[,\[\]{}\s]", value)
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    return str(value)


def parse_value(text: str) -> Any:
    """Command-line text as a plain value, the way dia.train parses a non-string key (YAML, OmegaConf's flavour)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except Exception:
        return text


def canonical(value: Any) -> Any:
    """The value a cell's hash sees: as dia.train parses its command-line text (integral floats as ints)."""
    if isinstance(value, str):
        value = parse_value(value)
        if isinstance(value, str):
            return value
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def short(key: str, value: Any) -> str:
    """A readable, filesystem-safe piece of a cell id for one coordinate."""
    if key in ("data", "model", "attack"):
        text = str(value)
    elif key == "model.dropout":
        text = f"p{value:g}" if isinstance(value, (int, float)) else f"p{value}"
    elif key == "num_victims":
        text = f"n{value}"
    elif key == "client.local_steps":  # FedAvg's T; FedSGD (T = 1) keeps the ids it always had
        text = f"T{value}"
    elif key == "victims" and isinstance(value, list) and value:
        ints = all(isinstance(v, int) for v in value)
        if ints and value == list(range(value[0], value[0] + len(value))):
            text = f"v{value[0]}-{value[-1]}"
        else:
            text = f"v{len(value)}x" + hashlib.sha1(json.dumps(value).encode()).hexdigest()[:4]
    else:
        text = f"{key.rsplit('.', 1)[-1]}{format_value(value)}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_.")[:40] or "x"


def cell_id(overrides: dict[str, Any]) -> str:
    """The stable id of the cell that `overrides` (dia.train key -> value) describe.

    `<data>-<model>-p<rate>-<attack>-<victims>-<hash>` (headline keys that are set, in that order), the hash
    over every override except logging/placement keys, values canonicalized as dia.train parses them, so a
    grid's cell and the same arguments given to dia.train by a W&B agent get the same id.
    """
    hashed = {k: canonical(v) for k, v in overrides.items() if not _not_hashed(k)}
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]
    prefix = "-".join(
        short(k, hashed[k]) for k in HEADLINE if k in hashed and not (k == "client.local_steps" and hashed[k] == 1)
    )
    return f"{prefix}-{digest}" if prefix else digest
