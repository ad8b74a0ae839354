"""`python -m dia.grid SWEEP.yaml ...`: the cells of a W&B grid sweep file, run one by one, resumable.

A sweep file is a W&B sweep (`method: grid`, `parameters` with `values`/`value`, the `command` that runs
`python -m dia.train`), plus an optional `dia:` section that W&B does not read:

    dia:
      blocks:       # the grid is the union of these sub-grids (each: the top-level parameters, updated by
        - parameters: {data: {values: [mnist, cifar10]}, model: {values: [mlp, vit, cnn]}}   # the block's)
        - parameters: {data: {value: imagenet}, model: {values: [mlp, vit_b16]}}
      exclude:      # cells matching every key of one rule are dropped (a list value: any of these)
        - {data: cifar10, model: cnn}

Cells are the cartesian products of the blocks, in file order (the first parameter varies slowest), minus
the excluded ones. A cell's id is a readable prefix of its coordinates plus a hash of all its overrides,
e.g. `mnist-mlp-p0.25-dia-v0-15-1a2b3c4d`, so ids do not change when the grid grows or is reordered.
Cell I of grid G runs `python -m dia.train <overrides> run.output_dir=<results>/<G> run.name=<id>
logger.wandb.group=<G> logger.wandb.tags=[...]` in a child process; a finished cell (its folder holds
metrics.json) is skipped, an interrupted one resumes from its checkpoint (dia.train's own mechanism).

Exit codes: 0 ok; 2 bad input (one line on stderr); 3 a cell's attack diverged; 75 stopped by
SIGUSR1/SIGTERM (progress saved: rerun the same command to resume); 1 a cell failed otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from dia.errors import ExitCode, UserError

WANDB_COMMAND = ["${env}", "${interpreter}", "-m", "dia.train", "${args_no_hyphens}"]
SWEEP_KEYS = {"name", "description", "program", "method", "metric", "parameters", "command", "project", "entity",
              "run_cap", "early_terminate", "dia"}
RESERVED = ("run.output_dir", "run.name", "logger.wandb.group", "logger.wandb.tags")  # set by the grid per cell
GROUP_KEYS = ("data", "model", "attack")


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


def _short(key: str, value: Any) -> str:
    """A readable, filesystem-safe piece of a cell id for one coordinate."""
    if key in GROUP_KEYS:
        text = str(value)
    elif key == "model.dropout":
        text = f"p{value:g}" if isinstance(value, (int, float)) else f"p{value}"
    elif key == "victims" and isinstance(value, list) and value:
        ints = all(isinstance(v, int) for v in value)
        if ints and value == list(range(value[0], value[0] + len(value))):
            text = f"v{value[0]}-{value[-1]}"
        else:
            text = f"v{len(value)}x" + hashlib.sha1(json.dumps(value).encode()).hexdigest()[:4]
    else:
        leaf = key.rsplit(".", 1)[-1]
        text = f"{leaf}{format_value(value)}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")[:40] or "x"


def cell_hash(overrides: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(overrides, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------- sweep

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
class Grid:
    name: str
    path: Path
    sha256: str
    spec: dict[str, Any]
    blocks: list[dict[str, list[Any]]]
    exclude: list[dict[str, Any]]
    cells: list[Cell] = field(default_factory=list)

    def cell(self, index: int) -> Cell:
        if not 0 <= index < len(self.cells):
            raise UserError(f"cell index {index} is outside the grid '{self.name}' ({len(self.cells)} cells: valid 0..{len(self.cells) - 1})")
        return self.cells[index]


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


def _matches(rule: dict[str, Any], overrides: dict[str, Any]) -> bool:
    for key, want in rule.items():
        if key not in overrides:
            return False
        have = overrides[key]
        if isinstance(want, list) and not isinstance(have, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def load(path: str | Path) -> Grid:
    """Parse and expand a sweep file (no dia.train validation yet: see `validate`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file '{path}' does not exist")
    raw = path.read_bytes()
    try:
        spec = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a W&B sweep mapping (method, metric, parameters, command)")
    unknown = sorted(set(map(str, spec)) - SWEEP_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown top-level key '{unknown[0]}'; valid: {', '.join(sorted(SWEEP_KEYS))}")
    if spec.get("method", "grid") != "grid":
        raise UserError(f"{path}: method '{spec.get('method')}' is not supported by dia.grid; use method: grid")
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"{path}: name '{name}' must be letters, digits, '.', '_' or '-' (it names the results folder)")
    top = _parameters(f"{path}: parameters", spec.get("parameters"))
    extra = spec.get("dia") or {}
    if not isinstance(extra, dict) or set(extra) - {"blocks", "exclude"}:
        raise UserError(f"{path}: the dia section takes 'blocks' and 'exclude' only")
    blocks = []
    for i, block in enumerate(extra.get("blocks") or [{}]):
        if not isinstance(block, dict) or set(block) - {"parameters"}:
            raise UserError(f"{path}: dia.blocks[{i}] takes 'parameters' only")
        params = dict(top)
        if block.get("parameters"):
            params.update(_parameters(f"{path}: dia.blocks[{i}].parameters", block["parameters"]))
        blocks.append(params)
    exclude = extra.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(r, dict) and r for r in exclude):
        raise UserError(f"{path}: dia.exclude must be a list of mappings (key: value or [values])")
    grid = Grid(name, path, hashlib.sha256(raw).hexdigest(), spec, blocks, exclude)
    combos: list[dict[str, Any]] = []
    for params in blocks:
        keys = list(params)
        for values in itertools.product(*(params[k] for k in keys)):
            overrides = dict(zip(keys, values))
            if not any(_matches(rule, overrides) for rule in exclude):
                combos.append(overrides)
    if not combos:
        raise UserError(f"{path}: the grid is empty (every cell is excluded)")
    seen_values: dict[str, list[str]] = {}
    for c in combos:
        for k, v in c.items():
            s = json.dumps(v, sort_keys=True)
            if s not in seen_values.setdefault(k, []):
                seen_values[k].append(s)
    varying = [k for k in seen_values if len(seen_values[k]) > 1]
    ids: dict[str, int] = {}
    for i, c in enumerate(combos):
        coords = {k: c[k] for k in varying if k in c}
        prefix = "-".join(_short(k, v) for k, v in coords.items())
        cid = f"{prefix}-{cell_hash(c)}" if prefix else cell_hash(c)
        if cid in ids:
            raise UserError(f"{path}: cells {ids[cid]} and {i} are the same cell ({cid}); remove the duplicate")
        ids[cid] = i
        grid.cells.append(Cell(i, cid, c, coords))
    return grid


def _check_victims(cfg: Any, memo: dict[str, int]) -> None:
    """Cheap check of victim indices against an embedded set (the loader would only fail at run time)."""
    if cfg.data.source != "embedded":
        return
    try:
        from importlib import resources

        import numpy as np

        from dia.data import select_indices

        if cfg.data.embedded not in memo:
            with resources.as_file(resources.files("dia.assets").joinpath(cfg.data.embedded)) as p, np.load(p) as npz:
                memo[cfg.data.embedded] = len(npz["labels"])
    except (ImportError, FileNotFoundError, KeyError):
        return  # the run itself will report it
    select_indices(memo[cfg.data.embedded], f"data={cfg.data.name} (embedded {cfg.data.embedded})",
            None if cfg.victims is None else list(cfg.victims), cfg.num_victims, cfg.victim_seed)


def validate(grid: Grid, cells: Iterable[Cell] | None = None) -> None:
    """Compose every cell's config as dia.train would: the first bad cell raises one UserError line."""
    from dia.config import compose

    memo: dict[str, int] = {}
    for cell in grid.cells if cells is None else cells:
        try:
            cfg = compose(cell.args())
            _check_victims(cfg, memo)
        except UserError as exc:
            raise UserError(f"{grid.path}: cell {cell.index} ({cell.id}): {exc}") from None


# ----------------------------------------------------------------------------------------------- results

def grid_dir(grid: Grid, results_root: str | Path) -> Path:
    return Path(results_root) / grid.name


def describe(grid: Grid) -> dict[str, Any]:
    return {"name": grid.name, "sweep": str(grid.path), "sha256": grid.sha256, "num_cells": len(grid.cells),
            "cells": [{"index": c.index, "id": c.id, "overrides": c.overrides} for c in grid.cells]}


def check_results_dir(grid: Grid, folder: Path) -> dict[str, Any] | None:
    """The saved grid.json of `folder` (None if none); a UserError if it describes another grid."""
    saved_file = folder / "grid.json"
    if not saved_file.is_file():
        return None
    try:
        saved = json.loads(saved_file.read_text())
        ids = [c["id"] for c in saved["cells"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{saved_file}: not a dia grid description; use another --results-root") from None
    if saved.get("name") != grid.name or ids != [c.id for c in grid.cells]:
        raise UserError(f"results dir '{folder}' holds another grid ('{saved.get('name')}' from {saved.get('sweep')}, "
                        f"{len(ids)} cells, sha256 {str(saved.get('sha256'))[:12]}) than {grid.path} ({len(grid.cells)} cells); "
                        "use another --results-root or name:")
    return saved


def write_grid_json(grid: Grid, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(describe(grid) | {"validated": True}, indent=1) + "\n"
    tmp = folder / f".grid.json.{uuid.uuid4().hex}"
    tmp.write_text(text)
    os.replace(tmp, folder / "grid.json")


def prepare(grid: Grid, results_root: str | Path, cells: list[Cell] | None = None) -> Path:
    """Check the results dir belongs to this grid and validate (all cells, unless grid.json already says so)."""
    folder = grid_dir(grid, results_root)
    saved = check_results_dir(grid, folder)
    if saved and saved.get("validated") and saved.get("sha256") == grid.sha256 and cells is not None:
        validate(grid, cells)  # the whole grid was validated when grid.json was written
    else:
        validate(grid)
        write_grid_json(grid, folder)
    return folder


def status(grid: Grid, folder: Path, cell: Cell) -> str:
    """done / partial / pending, as the run contract defines them (dia.run.folder)."""
    from dia.run.folder import RunFolder

    return RunFolder(folder, cell.id).state


def train_args(grid: Grid, folder: Path, cell: Cell) -> list[str]:
    return cell.args() + [f"run.output_dir={folder}", f"run.name={cell.id}", f"logger.wandb.group={grid.name}",
                          f"logger.wandb.tags={format_value(cell.tags(grid.name))}"]


# ----------------------------------------------------------------------------------------------- running

def note(msg: str) -> None:
    print(f"[dia.grid] {msg}", file=sys.stderr, flush=True)


def _devices(parallel: int) -> list[str]:
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    visible = visible or [str(i) for i in range(parallel)]
    return [visible[i % len(visible)] for i in range(parallel)]


WORST = [ExitCode.PREEMPTED, ExitCode.INTERRUPTED, ExitCode.BAD_INPUT, ExitCode.FAILED, ExitCode.DIVERGED, ExitCode.OK]


def worst(codes: Iterable[int]) -> int:
    """The exit code that matters most: a stop, then bad input, then a failure, then a divergence."""
    codes = list(codes)
    return min(codes, key=lambda c: WORST.index(c) if c in WORST else WORST.index(ExitCode.FAILED), default=ExitCode.OK)


def run_cells(grid: Grid, folder: Path, cells: list[Cell], *, force: bool = False, parallel: int = 1,
              python: str = sys.executable, results_root: str | Path | None = None) -> int:
    """Run the unfinished `cells`, packed into as few programs as their configs allow (dia.run.pack).

    With `parallel` > 1 the cells are shared out (whole packs at a time) between that many child
    processes, one GPU each. Returns the worst exit code (see `worst`).
    """
    from dia.config import compose
    from dia.console import quiet_libraries
    from dia.run import execute, signals

    quiet_libraries()
    todo: list[Cell] = []
    for cell in cells:
        st = status(grid, folder, cell)
        if st == "done" and not force:
            note(f"cell {cell.index} ({cell.id}) is finished: skipped (--force recomputes it)")
            continue
        if force:
            for p in (folder / cell.id, folder / f".{cell.id}.partial"):
                if p.exists():
                    note(f"--force: removing {p}")
                    shutil.rmtree(p)
        todo.append(cell)
    if not todo:
        return ExitCode.OK
    configs = [compose(train_args(grid, folder, c)) for c in todo]
    if parallel > 1:
        return _run_children(grid, todo, configs, parallel, python, results_root)
    signals.install()
    try:
        outcomes = execute(configs, keep_going=True, note=note)
    except signals.Stopped as exc:
        left = sum(status(grid, folder, c) != "done" for c in todo)
        note(f"{exc}; {left} cell(s) unfinished: rerun the same command to resume")
        return exc.exit_code
    except KeyboardInterrupt:
        note("interrupted: the last saved checkpoints are kept; rerun the same command to resume")
        return ExitCode.INTERRUPTED
    failed = [(c, o) for c, o in zip(todo, outcomes) if o.code not in (ExitCode.OK, ExitCode.DIVERGED)]
    for cell, outcome in failed:
        note(f"cell {cell.index} ({cell.id}): exit {int(outcome.code)}: {outcome.message}")
    note(f"{len(todo) - len(failed)} of {len(todo)} cell(s) finished" + (f", {len(failed)} failed" if failed else ""))
    return worst(o.code for o in outcomes)


def _run_children(grid: Grid, todo: list[Cell], configs: list[Any], parallel: int, python: str,
                  results_root: str | Path | None) -> int:
    """Share `todo` between `parallel` child processes (`dia.grid --run`), keeping packable cells together."""
    from dia.run.pack import pack_key_of

    groups: dict[str, list[Cell]] = {}
    for cell, cfg in zip(todo, configs):
        groups.setdefault(pack_key_of(cfg), []).append(cell)
    shares: list[list[Cell]] = [[] for _ in range(parallel)]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(shares, key=len).extend(group)
    procs: list[subprocess.Popen] = []
    for device, share in zip(_devices(parallel), shares):
        if not share:
            continue
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=device)
        args = [python, "-m", "dia.grid", str(grid.path), "--run", ",".join(str(c.index) for c in share)]
        if results_root is not None:
            args += ["--results-root", str(results_root)]
        note(f"{len(share)} cell(s) on GPU {device}")
        procs.append(subprocess.Popen(args, env=env))

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return worst(codes)


def parse_indices(text: str, n: int) -> list[int]:
    """'3', '0,2,5', '4-7' (inclusive), or a mix."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"--run: '{text}' is not a cell index, list (0,2) or range (4-7)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        out += list(range(lo, hi + 1))
    for i in out:
        if not 0 <= i < n:
            raise UserError(f"cell index {i} is outside the grid ({n} cells: valid 0..{n - 1})")
    return out


# ----------------------------------------------------------------------------------------------- W&B export

def wandb_sweeps(grid: Grid) -> list[dict[str, Any]]:
    """Plain W&B grid sweeps (no `dia:` section) whose union is exactly this grid's cells.

    One per block; a block that an exclude rule cuts into is split on the rule keys' values.
    Each sets logger.wandb.mode=online and group=<grid name> (offline runs cannot join a sweep).
    """
    out = []
    base = {k: v for k, v in grid.spec.items() if k not in ("dia", "parameters")}
    for b, params in enumerate(grid.blocks):
        keys = [k for k in params if any(k in r for r in grid.exclude)]
        splits = [dict(zip(keys, vals)) for vals in itertools.product(*(params[k] for k in keys))] if keys else [{}]
        for fixed in splits:
            sub = {k: ([fixed[k]] if k in fixed else v) for k, v in params.items()}
            if any(_matches(r, fixed) for r in grid.exclude):  # every rule key is split on: all or nothing
                continue
            parameters = {k: ({"values": v} if len(v) > 1 else {"value": v[0]}) for k, v in sub.items()}
            parameters["logger.wandb.mode"] = {"value": "online"}
            parameters["logger.wandb.group"] = {"value": grid.name}
            suffix = "-".join(_short(k, v) for k, v in fixed.items())
            name = f"{grid.name}-{b}" + (f"-{suffix}" if suffix else "") if len(grid.blocks) > 1 or suffix else grid.name
            out.append(base | {"name": name, "parameters": parameters, "command": WANDB_COMMAND})
    return out


# ----------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dia.grid", description="Run the cells of a W&B grid sweep file with dia.train.")
    p.add_argument("sweep", help="a sweep file, e.g. sweeps/paper.yaml")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--count", action="store_true", help="print the number of cells")
    what.add_argument("--list", action="store_true", help="one line per cell: index, id, status, overrides")
    what.add_argument("--show", type=int, metavar="I", help="cell I as JSON (id, folder, status, dia.train command)")
    what.add_argument("--run", metavar="I", help="run cell I (or a list 0,2 or a range 4-7)")
    what.add_argument("--task", type=int, metavar="T", help="run cells T*P .. T*P+P-1 where P is --per-task (an array task)")
    what.add_argument("--run-all", action="store_true", help="run every unfinished cell")
    what.add_argument("--validate", action="store_true", help="compose every cell's config, write grid.json, print the count")
    what.add_argument("--wandb-sweeps", metavar="DIR", help="write plain W&B sweep files (one per block) whose union is the grid")
    p.add_argument("--per-task", type=int, default=1, metavar="P", help="cells per --task (default 1)")
    p.add_argument("--parallel", type=int, default=None, metavar="G",
                   help="cells at once, one GPU each (CUDA_VISIBLE_DEVICES per child); default 1 (--task: --per-task)")
    p.add_argument("--force", action="store_true", help="recompute finished cells (their folders are removed first)")
    p.add_argument("--results-root", default=os.environ.get("DIA_RESULTS_ROOT", "results"),
                   help="results go to <results-root>/<grid name>/<cell id>/ (default: $DIA_RESULTS_ROOT or results)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"{message}; see `python -m dia.grid --help`"))  # type: ignore[method-assign]
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--list | head` ends quietly
    try:
        a = parser.parse_args(argv)
        grid = load(a.sweep)
        folder = grid_dir(grid, a.results_root)
        if a.count:
            print(len(grid.cells))
            return 0
        if a.list:
            for c in grid.cells:
                print(f"{c.index:>4}  {c.id:<40} {status(grid, folder, c):<8} {' '.join(c.args())}")
            return 0
        if a.show is not None:
            c = grid.cell(a.show)
            args = train_args(grid, folder, c)
            print(json.dumps({"index": c.index, "id": c.id, "grid": grid.name, "folder": str(folder / c.id),
                              "status": status(grid, folder, c), "coords": c.coords, "overrides": c.overrides,
                              "command": ["python", "-m", "dia.train", *args]}, indent=1))
            return 0
        if a.wandb_sweeps:
            out = Path(a.wandb_sweeps)
            out.mkdir(parents=True, exist_ok=True)
            for sweep in wandb_sweeps(grid):
                path = out / f"{sweep['name']}.yaml"
                path.write_text(yaml.safe_dump(sweep, sort_keys=False, width=200))
                print(path)
            return 0
        if a.validate:
            prepare(grid, a.results_root)
            print(len(grid.cells))
            return 0
        if a.parallel is not None and a.parallel < 1 or a.per_task < 1:
            raise UserError("--parallel and --per-task must be positive integers")
        if a.run is not None:
            cells = [grid.cells[i] for i in parse_indices(a.run, len(grid.cells))]
        elif a.task is not None:
            first = a.task * a.per_task
            grid.cell(first)
            cells = grid.cells[first : first + a.per_task]
        else:
            cells = list(grid.cells)
        folder = prepare(grid, a.results_root, None if a.run_all else cells)
        parallel = a.parallel or (a.per_task if a.task is not None else 1)
        return run_cells(grid, folder, cells, force=a.force, parallel=parallel, results_root=a.results_root)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
