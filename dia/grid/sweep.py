"""Sweep files -> grid cells: reading W&B grid sweep files and enumerating their cells lazily, with stable ids.

A grid is one W&B sweep file, or a folder of them (the grid is the union of its files, e.g. one file per
block of the paper's design: `sweeps/paper/{mnist-cifar10,imagenet}.yaml`). Every file is a plain W&B
grid sweep (`method: grid`, `parameters` with `values`/`value`, and the command that runs dia.train), so
`wandb sweep FILE` accepts it as it is and a W&B agent only ever gets cells of the design.

Cells are the cartesian products of the files' parameters, files in name order, and within a file in
W&B's own grid order (parameters sorted by name, the first varying slowest), so cell i of a one-file grid
is the i-th run a W&B grid sweep of that file makes. They are never all held in memory: `len(grid)` is a
sum of products and `grid.cell(i)` decodes index i (mixed radix), so `--count` of a 20^6-cell sweep is
instant. Array tasks (`--task T --per-task P`) take cells in *task order* instead: the keys that differ
inside a pack (attack, rate, victims, defense, logging) vary fastest, so P consecutive positions are whole
packs where the grid allows (`Grid.task`).

A grid's name, which names its results folder, is where its W&B agents write: the last part of the
command's `run.output_dir=results/<name>` (every file of a folder must name the folder), else the file's
`name:`, else its stem. So an agent's run of a cell and dia.grid's run of the same cell share a folder,
whether dia.grid is given the folder or one of its files.

Overrides given on the command line (`python -m dia.grid SWEEP key=value ...`, as dia.train takes them) apply to
every cell (`load(path, overrides)`): a shortened grid (`attack.max_iterations=100`) has cells of its own, with
ids of their own, beside those of the full grid in the same results folder (grid.json records each cell with
them, `with`). A key the grid varies cannot be overridden (its cells would collapse into one).

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dia.config.ids import AUTO_CELL, RESERVED, cell_id, format_value, parse_value, short
from dia.errors import UserError

WANDB_COMMAND = ["${env}", "${interpreter}", "-m", "dia.train", "${args_no_hyphens}"]
SWEEP_KEYS = {
    "name",
    "description",
    "program",
    "method",
    "metric",
    "parameters",
    "command",
    "project",
    "entity",
    "run_cap",
    "early_terminate",
}
AGENT_ARGS = ("run.name", "run.output_dir")  # literal arguments a sweep file's command may add for W&B agents
# keys that may differ between the runs of one packed program (dia.run.pack: PER_ROW, NOT_SHARED): fastest in task order
INNER = (
    "attack",
    "attack.mask_weight",
    "attack.assumed_rate",
    "attack.rate",
    "model.dropout",
    "victims",
    "num_victims",
    "victim_seed",
    "defense",
    "run.progress",
    "run.save_tensors",
)
INNER_PREFIXES = ("defense.", "logger.", "metrics.")
MAX_SWEEP_BYTES = 1 << 20  # a sweep file is a few hundred bytes; more is a mistake (or an attack)
MAX_TAG = 64  # W&B refuses longer tags


def _inner(key: str) -> bool:
    return key in INNER or key.startswith(INNER_PREFIXES)


# ----------------------------------------------------------------------------------------------- grid


@dataclass
class Cell:
    index: int
    id: str
    overrides: dict[str, Any]  # every parameter of the cell, in parameter order
    coords: dict[str, Any]  # the parameters that vary across the grid
    file: str = ""  # the sweep file (name) it comes from

    def args(self) -> list[str]:
        return [f"{k}={format_value(v)}" for k, v in self.overrides.items()]

    def tags(self, grid: str) -> list[str]:
        """W&B tags: the grid and the cell's coordinates, each cut to W&B's 64 characters (a hash keeps them
        distinct)."""
        tags = [f"grid:{grid}"] + [
            f"{k}:{format_value(v) if not isinstance(v, list) else short(k, v)}" for k, v in self.coords.items()
        ]
        return [
            t if len(t) <= MAX_TAG else t[: MAX_TAG - 9] + "~" + hashlib.sha1(t.encode()).hexdigest()[:8] for t in tags
        ]


@dataclass
class Block:
    """One sweep file: its parameters (key -> the values it takes, in file order) and the file's W&B spec."""

    path: Path
    spec: dict[str, Any]
    params: dict[str, list[Any]]

    def __len__(self) -> int:
        return math.prod(len(v) for v in self.params.values())

    @property
    def wandb_keys(self) -> list[str]:
        """W&B's grid order: parameters sorted by name (sweeps' HyperParameterSet), the first varying slowest."""
        return sorted(self.params)

    @property
    def task_keys(self) -> list[str]:
        """Task order: the keys that are the same within a pack first (slowest), then those that differ in it."""
        keys = self.wandb_keys
        return [k for k in keys if not _inner(k)] + [k for k in keys if _inner(k)]

    def _decode(self, i: int, keys: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in reversed(keys):
            i, out[key] = divmod(i, len(self.params[key]))
        return out

    def _encode(self, choice: dict[str, int], keys: list[str]) -> int:
        i = 0
        for key in keys:
            i = i * len(self.params[key]) + choice[key]
        return i

    def overrides(self, i: int) -> dict[str, Any]:
        """The i-th combination in W&B's order, as key -> value in file order."""
        choice = self._decode(i, self.wandb_keys)
        return {k: self.params[k][choice[k]] for k in self.params}

    def index_at(self, position: int) -> int:
        """The (W&B-order) index of the combination at `position` in task order."""
        return self._encode(self._decode(position, self.task_keys), self.wandb_keys)

    def position_of(self, index: int) -> int:
        """The task-order position of the combination with (W&B-order) index `index`."""
        return self._encode(self._decode(index, self.wandb_keys), self.task_keys)


@dataclass
class Grid:
    name: str
    path: Path  # the sweep file or folder
    sha256: str  # of the file(s), in order, and of the overrides
    blocks: list[Block]
    extra: dict[str, Any] = field(default_factory=dict)  # command-line overrides for every cell, key -> value

    @property
    def extra_args(self) -> list[str]:
        """The overrides as command-line arguments (what a child process or an array task is given)."""
        return [f"{k}={format_value(v)}" for k, v in self.extra.items()]

    @property
    def extra_text(self) -> str:
        """The overrides as one string (grid.json's `with` of each cell; "" for none)."""
        return " ".join(self.extra_args)

    def overrides_of(self, block: Block, i: int) -> dict[str, Any]:
        """The i-th combination of `block` with the command-line overrides (which replace a key the file fixes)."""
        return block.overrides(i) | self.extra

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

    def _block(self, index: int) -> tuple[int, Block, int]:
        """(offset, block, index within it) of a grid-wide index or position (blocks keep their place in both
        orders)."""
        n = len(self)
        if not 0 <= index < n:
            raise UserError(f"cell index {index} is outside the grid '{self.name}' ({n} cells: valid 0..{n - 1})")
        offset = 0
        for b in self.blocks:
            if index - offset < len(b):
                return offset, b, index - offset
            offset += len(b)
        raise AssertionError("unreachable")

    def cell(self, index: int) -> Cell:
        _, b, i = self._block(index)
        overrides = self.overrides_of(b, i)
        return Cell(
            index, cell_id(overrides), overrides, {k: overrides[k] for k in self.varying if k in overrides}, b.path.name
        )

    def index_at(self, position: int) -> int:
        """The cell index at task-order `position` (array tasks take consecutive positions: `task`)."""
        offset, b, p = self._block(position)
        return offset + b.index_at(p)

    def position_of(self, index: int) -> int:
        offset, b, i = self._block(index)
        return offset + b.position_of(i)

    def tasks(self, per: int) -> int:
        """How many array tasks of `per` cells the grid makes."""
        return -(-len(self) // per)

    def task(self, t: int, per: int) -> list[Cell]:
        """The cells of array task `t` (`per` consecutive positions in task order: whole packs where possible)."""
        if not 0 <= t < self.tasks(per):
            raise UserError(
                f"--task {t} is outside the grid '{self.name}' ({len(self)} cells in {self.tasks(per)} task(s) of "
                f"{per}: "
                f"valid 0..{self.tasks(per) - 1})"
            )
        return [self.cell(self.index_at(p)) for p in range(t * per, min(len(self), (t + 1) * per))]

    def task_of(self, index: int, per: int) -> int:
        return self.position_of(index) // per

    def check_size(self, what: str, limit: int = 100_000) -> None:
        """A UserError when `what` would expand more than `limit` cells (a typo in a values list, not a plan)."""
        if len(self) > limit:
            raise UserError(
                f"grid '{self.name}' has {len(self):,} cells; {what} handles at most {limit:,} "
                "(--count, --show I and --run I work on any size)"
            )

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
                overrides = self.grid.overrides_of(b, i)
                yield Cell(
                    index,
                    cell_id(overrides),
                    overrides,
                    {k: overrides[k] for k in varying if k in overrides},
                    b.path.name,
                )
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


def _parameters(where: str, params: Any, grid: str) -> dict[str, list[Any]]:
    if not isinstance(params, dict) or not params:
        raise UserError(f"{where}: expected a mapping of dia.train keys to {{values: [...]}}")
    out = {}
    for key, spec in params.items():
        key = str(key)
        values = _values(f"{where}.{key}", spec)
        # the group dia.grid gives every cell may be written out (--wandb-sweeps does, for agents); nothing else
        # reserved
        if key in RESERVED and not (key == "logger.wandb.group" and values == [grid]):
            raise UserError(f"{where}.{key}: set by dia.grid for every cell; remove it from the sweep file")
        out[key] = values
    return out


def _check_command(path: Path, command: Any) -> None:
    """The command must run dia.train with the sweep's arguments; it may add run.name=auto-cell and run.output_dir."""
    if command is None:
        return
    if not isinstance(command, list) or [str(c) for c in command[: len(WANDB_COMMAND)]] != WANDB_COMMAND:
        raise UserError(f"{path}: command must start with {WANDB_COMMAND} (dia.grid runs exactly these arguments)")
    for extra in command[len(WANDB_COMMAND) :]:
        key, _, value = str(extra).partition("=")
        if key not in AGENT_ARGS or (key == "run.name" and value != AUTO_CELL):
            raise UserError(
                f"{path}: command argument '{extra}' would make W&B agents run another cell than dia.grid; "
                f"allowed after ${{args_no_hyphens}}: run.name={AUTO_CELL}, run.output_dir=DIR"
            )


class _Refused(yaml.YAMLError):
    """YAML that parses but would not mean what it says to W&B and dia alike."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(f"line {mark.line + 1}: {message}" if mark is not None else message)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without what silently changes a sweep: duplicate keys (the last would win and the
    other values would be dropped) and aliases (`*name`: a few lines can expand to billions of values)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _Refused(
                "aliases (*name) are not supported in sweep files; write the values out", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _Refused(
                    f"duplicate key '{key}' (the second would silently replace the first)", key_node.start_mark
                )
            seen.add(key if isinstance(key, (str, int, float, bool)) else id(key_node))
        return super().construct_mapping(node, deep=deep)


def _read(path: Path) -> tuple[bytes, dict[str, Any]]:
    try:
        if not path.is_file():
            raise UserError(f"sweep file '{path}' is not a regular file")
        if path.stat().st_size > MAX_SWEEP_BYTES:
            raise UserError(
                f"sweep file '{path}' is larger than {MAX_SWEEP_BYTES // 1024} KiB; a sweep file lists values, not data"
            )
        raw = path.read_bytes()
        spec = yaml.load(raw, Loader=_Loader)
    except OSError as exc:
        raise UserError(f"sweep file '{path}': cannot read it ({exc.strerror})") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise UserError(
            f"{path}: not valid YAML ({str(exc).splitlines()[0] if str(exc) else 'too deeply nested'})"
        ) from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a W&B sweep mapping (method, metric, parameters, command)")
    if "dia" in spec:
        raise UserError(
            f"{path}: the 'dia' section is gone (W&B rejects it); put each block in its own file of one folder "
            "and give dia.grid the folder (see docs/cluster.md)"
        )
    unknown = sorted(set(map(str, spec)) - SWEEP_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown top-level key '{unknown[0]}'; valid: {', '.join(sorted(SWEEP_KEYS))}")
    if spec.get("method", "grid") != "grid":
        raise UserError(f"{path}: method '{spec.get('method')}' is not supported by dia.grid; use method: grid")
    _check_command(path, spec.get("command"))
    return raw, spec


def _name(path: Path, text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", text):
        raise UserError(f"{path}: name '{text}' must be letters, digits, '.', '_' or '-' (it names the results folder)")
    return text


def agent_folder(spec: dict[str, Any]) -> str | None:
    """The `run.output_dir=` a sweep file's command gives W&B agents (None: it sets none)."""
    for extra in (spec.get("command") or [])[len(WANDB_COMMAND) :]:
        key, _, value = str(extra).partition("=")
        if key == "run.output_dir":
            return value
    return None


def command_overrides(args: Sequence[str]) -> dict[str, Any]:
    """`key=value` arguments as a grid's overrides (values parsed as dia.train and a sweep file's YAML read them)."""
    out: dict[str, Any] = {}
    for arg in args:
        key, eq, text = str(arg).partition("=")
        if not eq or not key or key.startswith("-"):
            raise UserError(f"argument '{arg}' is not key=value (an override for every cell, as dia.train takes it)")
        if key in RESERVED:
            raise UserError(f"{key}: set by dia.grid for every cell; it cannot be overridden")
        out[key] = parse_value(text)
    return out


def load(path: str | Path, overrides: Sequence[str] = ()) -> Grid:
    """A grid from a sweep file or a folder of them, named where its agents write (see the module docstring):
    a folder after itself, a file after its command's `run.output_dir`, else its `name:`, else its stem.
    `overrides` (`key=value`, as dia.train takes them) apply to every cell."""
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
        target = agent_folder(spec)
        if not name:
            name = _name(f, Path(target).name if target else str(spec.get("name") or f.stem))
        if target is not None and (Path(target).name != name or Path(target).parent != Path("results")):
            raise UserError(
                f"{f}: its command writes W&B agents' runs to run.output_dir={target}, but dia.grid writes this grid "
                f"to results/{name} (results/<grid>: the folder's name, or the file's); make them agree"
            )
        blocks.append(Block(f, spec, _parameters(f"{f}: parameters", spec.get("parameters"), name)))
    extra = command_overrides(overrides)
    if extra:
        digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    grid = Grid(name, path, digest.hexdigest(), blocks, extra)
    varied = [k for k in extra if k in grid.varying and any(len(b.params.get(k, [])) > 1 for b in grid.blocks)]
    if varied:
        raise UserError(
            f"{varied[0]}={format_value(extra[varied[0]])}: the grid varies {varied[0]}; an override would make its "
            "cells one (edit the sweep file, or give another key)"
        )
    return grid


def wandb_sweeps(grid: Grid) -> list[dict[str, Any]]:
    """The grid's files as W&B sweeps for agents: logging online (offline runs cannot report to a sweep) in group
    <grid>."""
    out = []
    for b in grid.blocks:
        spec = dict(b.spec)
        stem = b.path.stem if len(grid.blocks) > 1 else ""
        spec["name"] = f"{grid.name}-{stem}" if stem else grid.name
        parameters = dict(spec["parameters"])
        parameters |= {k: {"value": v} for k, v in grid.extra.items()}  # the command line's overrides
        parameters["logger.wandb.mode"] = {"value": "online"}
        parameters["logger.wandb.group"] = {"value": grid.name}
        spec["parameters"] = parameters
        # agents name their runs by cell and write them where dia.grid does (so the copy is the same grid)
        extra = [a for a in (spec.get("command") or [])[len(WANDB_COMMAND) :] if not str(a).startswith(AGENT_ARGS)]
        spec["command"] = WANDB_COMMAND + extra + [f"run.name={AUTO_CELL}", f"run.output_dir=results/{grid.name}"]
        out.append(spec)
    return out
