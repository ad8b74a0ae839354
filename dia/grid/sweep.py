"""Sweep files -> grid cells: reading W&B grid sweep files and enumerating their cells lazily, with stable ids.

A grid is one W&B sweep file, or a folder of them (the grid is the union of its files, e.g. one file per
block of the paper's design: `sweeps/paper/{mnist-cifar10,imagenet}.yaml`). Every file is a plain W&B
grid sweep (`method: grid`, `parameters` with `values`/`value`, and the command that runs dia.train), so
`wandb sweep FILE` accepts it as it is and a W&B agent only ever gets cells of the design.

Cells are the cartesian products of the files' parameters, files in name order, the first parameter
varying slowest. They are never all held in memory: `len(grid)` is a sum of products and `grid.cell(i)`
decodes index i (mixed radix), so `--count` of a 20^6-cell sweep is instant.

A cell's id depends on its own overrides only (`cell_id`): a readable prefix of its headline keys (data,
model, rate, attack, victims) and a hash of every override that can change the result (`logger.*` and
the per-run placement keys do not). Growing a grid, reordering its parameters or splitting it into files
never renames a cell, and `python -m dia.train ... run.name=auto-cell` (what the sweep files' command
passes, so W&B agents get it) names its run folder with the same id as `dia.grid` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from dia.errors import UserError

WANDB_COMMAND = ["${env}", "${interpreter}", "-m", "dia.train", "${args_no_hyphens}"]
AUTO_CELL = "auto-cell"  # run.name=auto-cell: name the run folder with its cell id (see `cell_id`)
SWEEP_KEYS = {"name", "description", "program", "method", "metric", "parameters", "command", "project", "entity",
              "run_cap", "early_terminate"}
RESERVED = ("run.output_dir", "run.name", "logger.wandb.group", "logger.wandb.tags")  # set by dia.grid per cell
AGENT_ARGS = ("run.name", "run.output_dir")  # literal arguments a sweep file's command may add for W&B agents
HEADLINE = ("data", "model", "model.dropout", "attack", "victims", "num_victims")  # the readable prefix of an id


def _not_hashed(key: str) -> bool:
    """Keys that cannot change a run's result (where it goes, how it is logged) stay out of a cell's id."""
    return key in RESERVED or key.startswith("logger.") or key in ("run.progress",)


# ----------------------------------------------------------------------------------------------- values

def format_value(value: Any) -> str:
    """A value as dia.train's `key=value` parser (YAML) reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(json.dumps(v) if isinstance(v, str) and not re.fullmatch(r"[A-Za-z0-9._-]+", v)
                               else format_value(v) for v in value) + "]"
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
    except Exception:  # noqa: BLE001 - unparsable text is kept as text
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


def _short(key: str, value: Any) -> str:
    """A readable, filesystem-safe piece of a cell id for one coordinate."""
    if key in ("data", "model", "attack"):
        text = str(value)
    elif key == "model.dropout":
        text = f"p{value:g}" if isinstance(value, (int, float)) else f"p{value}"
    elif key == "num_victims":
        text = f"n{value}"
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
    prefix = "-".join(_short(k, hashed[k]) for k in HEADLINE if k in hashed)
    return f"{prefix}-{digest}" if prefix else digest


# ----------------------------------------------------------------------------------------------- grid

@dataclass
class Cell:
    index: int
    id: str
    overrides: dict[str, Any]  # every parameter of the cell, in parameter order
    coords: dict[str, Any]  # the parameters that vary across the grid

    def args(self) -> list[str]:
        return [f"{k}={format_value(v)}" for k, v in self.overrides.items()]

    def tags(self, grid: str) -> list[str]:
        return [f"grid:{grid}"] + [f"{k}:{format_value(v) if not isinstance(v, list) else _short(k, v)}" for k, v in self.coords.items()]


@dataclass
class Block:
    """One sweep file: its parameters (key -> the values it takes) and the file's W&B spec."""

    path: Path
    spec: dict[str, Any]
    params: dict[str, list[Any]]

    def __len__(self) -> int:
        return math.prod(len(v) for v in self.params.values())

    def overrides(self, i: int) -> dict[str, Any]:
        """The i-th combination (mixed radix, the first parameter varying slowest)."""
        out: dict[str, Any] = {}
        for key in reversed(list(self.params)):
            values = self.params[key]
            i, r = divmod(i, len(values))
            out[key] = values[r]
        return {k: out[k] for k in self.params}


@dataclass
class Grid:
    name: str
    path: Path  # the sweep file or folder
    sha256: str  # of the file(s), in order
    blocks: list[Block]

    def __len__(self) -> int:
        return sum(len(b) for b in self.blocks)

    @property
    def varying(self) -> list[str]:
        """Parameters that take more than one value across the grid (or are not set by every file)."""
        keys: dict[str, set[str]] = {}
        for b in self.blocks:
            for k, vals in b.params.items():
                keys.setdefault(k, set()).update(json.dumps(v, sort_keys=True) for v in vals)
        return [k for k, seen in keys.items() if len(seen) > 1 or any(k not in b.params for b in self.blocks)]

    def cell(self, index: int) -> Cell:
        n = len(self)
        if not 0 <= index < n:
            raise UserError(f"cell index {index} is outside the grid '{self.name}' ({n} cells: valid 0..{n - 1})")
        i = index
        for b in self.blocks:
            if i < len(b):
                overrides = b.overrides(i)
                return Cell(index, cell_id(overrides), overrides, {k: overrides[k] for k in self.varying if k in overrides})
            i -= len(b)
        raise AssertionError("unreachable")

    @property
    def cells(self) -> Cells:
        """Every cell, in order: a lazy sequence (`len`, indexing, slicing, iteration), never all in memory."""
        return Cells(self)


class Cells(Sequence):
    """The cells of a grid, computed on demand."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self.grid.cell(i) for i in range(*index.indices(len(self)))]
        return self.grid.cell(index + len(self) if index < 0 else index)

    def __iter__(self) -> Iterator[Cell]:
        varying, index = self.grid.varying, 0
        for b in self.grid.blocks:
            for i in range(len(b)):
                overrides = b.overrides(i)
                yield Cell(index, cell_id(overrides), overrides, {k: overrides[k] for k in varying if k in overrides})
                index += 1


def _values(where: str, spec: Any) -> list[Any]:
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a mapping with 'values' (a list) or 'value'")
    if "values" in spec:
        vals = spec["values"]
        if not isinstance(vals, list) or not vals:
            raise UserError(f"{where}.values: expected a non-empty list")
        return vals
    if "value" in spec:
        return [spec["value"]]
    raise UserError(f"{where}: a grid sweep needs 'values' or 'value' (distributions are not grid parameters)")


def _parameters(where: str, params: Any) -> dict[str, list[Any]]:
    if not isinstance(params, dict) or not params:
        raise UserError(f"{where}: expected a mapping of dia.train keys to {{values: [...]}}")
    out = {}
    for key, spec in params.items():
        key = str(key)
        if key in RESERVED:
            raise UserError(f"{where}.{key}: set by dia.grid for every cell; remove it from the sweep file")
        out[key] = _values(f"{where}.{key}", spec)
    return out


def _check_command(path: Path, command: Any) -> None:
    """The command must run dia.train with the sweep's arguments; it may add run.name=auto-cell and run.output_dir."""
    if command is None:
        return
    if not isinstance(command, list) or [str(c) for c in command[:len(WANDB_COMMAND)]] != WANDB_COMMAND:
        raise UserError(f"{path}: command must start with {WANDB_COMMAND} (dia.grid runs exactly these arguments)")
    for extra in command[len(WANDB_COMMAND):]:
        key, _, value = str(extra).partition("=")
        if key not in AGENT_ARGS or (key == "run.name" and value != AUTO_CELL):
            raise UserError(f"{path}: command argument '{extra}' would make W&B agents run another cell than dia.grid; "
                            f"allowed after ${{args_no_hyphens}}: run.name={AUTO_CELL}, run.output_dir=DIR")


def _read(path: Path) -> tuple[bytes, dict[str, Any]]:
    try:
        raw = path.read_bytes()
        spec = yaml.safe_load(raw)
    except OSError as exc:
        raise UserError(f"sweep file '{path}': cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a W&B sweep mapping (method, metric, parameters, command)")
    if "dia" in spec:
        raise UserError(f"{path}: the 'dia' section is gone (W&B rejects it); put each block in its own file of one folder "
                        "and give dia.grid the folder (see docs/cluster.md)")
    unknown = sorted(set(map(str, spec)) - SWEEP_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown top-level key '{unknown[0]}'; valid: {', '.join(sorted(SWEEP_KEYS))}")
    if spec.get("method", "grid") != "grid":
        raise UserError(f"{path}: method '{spec.get('method')}' is not supported by dia.grid; use method: grid")
    _check_command(path, spec.get("command"))
    return raw, spec


def _name(path: Path, text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise UserError(f"{path}: name '{text}' must be letters, digits, '.', '_' or '-' (it names the results folder)")
    return text


def load(path: str | Path) -> Grid:
    """A grid from a sweep file (named by its `name:`, else its stem) or a folder of them (named after the folder)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise UserError(f"sweep folder '{path}' holds no .yaml files")
        name = _name(path, path.resolve().name)
    elif path.is_file():
        files = [path]
        name = ""
    else:
        raise UserError(f"sweep file '{path}' does not exist")
    digest = hashlib.sha256()
    blocks = []
    for f in files:
        raw, spec = _read(f)
        digest.update(raw)
        if not name:
            name = _name(f, str(spec.get("name") or f.stem))
        blocks.append(Block(f, spec, _parameters(f"{f}: parameters", spec.get("parameters"))))
    return Grid(name, path, digest.hexdigest(), blocks)


def wandb_sweeps(grid: Grid) -> list[dict[str, Any]]:
    """The grid's files as W&B sweeps for agents: logging online (offline runs cannot report to a sweep) in group <grid>."""
    out = []
    for b in grid.blocks:
        spec = dict(b.spec)
        stem = b.path.stem if len(grid.blocks) > 1 else ""
        spec["name"] = f"{grid.name}-{stem}" if stem else grid.name
        parameters = dict(spec["parameters"])
        parameters["logger.wandb.mode"] = {"value": "online"}
        parameters["logger.wandb.group"] = {"value": grid.name}
        spec["parameters"] = parameters
        spec.setdefault("command", WANDB_COMMAND + [f"run.name={AUTO_CELL}"])
        out.append(spec)
    return out
