"""`python -m dia.grid SWEEP [key=value ...] ...`: the cells of a W&B grid sweep file (or a folder of them), packed and
resumable; `key=value` overrides (as dia.train takes them) apply to every cell and are part of its id.

The sweep-file model (files -> cells with stable ids, enumerated lazily) is `dia.grid.sweep`; this module is the
command line and the running. Cell I of grid G is the run of `python -m dia.train <overrides>
run.output_dir=<results>/<G> run.name=<id> logger.wandb.group=<G> logger.wandb.tags=[...]`, run in-process
through the run contract (`dia.run.execute`); a finished cell (its folder holds metrics.json) is skipped, an
interrupted one resumes from its checkpoint.

`<results>/<G>/grid.json` records the cells of every sweep file that wrote there (a folder's files may be run
one by one into the same results folder); a file whose recorded cells are gone is refused (another grid).

Exit codes (`dia.errors.ExitCode`): 0 ok; 2 bad input (one line on stderr); 3 a cell's attack diverged;
75 stopped by SIGUSR1/SIGTERM (progress saved: rerun the same command to resume); 1 a cell failed otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from dia.config import compose
from dia.console import quiet_libraries
from dia.errors import ExitCode, UserError
from dia.grid.sweep import WANDB_COMMAND, Cell, Grid, format_value, load, wandb_sweeps  # noqa: F401 - the grid's model
from dia.memory import keep_freed_memory
from dia.run.folder import RunFolder
from dia.run.signals import STOP, Stopped, stop_point
from dia.run.signals import install as install_signals


def validate(grid: Grid, cells: Iterable[Cell] | None = None) -> int:
    """Compose every cell's config as dia.train would and run `dia.run.checks.check` on it (cached per data config).

    The first bad cell raises one UserError line; two cells with the same id (the same overrides in two
    files) too; a stop signal raises `Stopped` between cells. Returns the number of cells checked.
    """
    from dia.run.checks import check

    if cells is None:
        grid.check_size("validating every cell")
    memo: dict[str, Any] = {}
    seen: dict[str, int] = {}
    n = 0
    for cell in grid.cells if cells is None else cells:
        stop_point("running any cell (while checking the grid)")
        if cell.id in seen:
            raise UserError(
                f"{grid.path}: cells {seen[cell.id]} and {cell.index} are the same cell ({cell.id}); remove the "
                "duplicate"
            )
        seen[cell.id] = cell.index
        try:
            check(compose(cell.args()), memo=memo)
        except UserError as exc:
            raise UserError(f"{grid.path}: cell {cell.index} ({cell.id}): {exc}") from None
        n += 1
    return n


# ----------------------------------------------------------------------------------------------- results


def grid_dir(grid: Grid, results_root: str | Path) -> Path:
    """<results_root>/<grid name>; a UserError if the results root (or that folder) is not a directory."""
    root = Path(results_root)
    for p in (root, root / grid.name):
        if p.exists() and not p.is_dir():
            raise UserError(f"--results-root: '{p}' is a file, not a folder; give a folder for the results")
    return root / grid.name


def describe(grid: Grid, saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """grid.json: the grid's cells, each with its file, plus the recorded cells of other files of the same
    results folder (`saved`: a folder's files run one by one keep each other's cells)."""
    files = {b.path.name: hashlib.sha256(b.path.read_bytes()).hexdigest() for b in grid.blocks}
    extra = {"with": grid.extra_text} if grid.extra else {}  # the command line's overrides, when any
    cells = [{"index": c.index, "id": c.id, "file": c.file, "overrides": c.overrides} | extra for c in grid.cells]
    if saved:
        ours = {(name, grid.extra_text) for name in files}  # another file's cells, or other overrides', stay
        kept = [c for c in saved["cells"] if c.get("file") and (c["file"], c.get("with", "")) not in ours]
        cells += kept
        files = {k: v for k, v in (saved.get("files") or {}).items() if any(c["file"] == k for c in kept)} | files
    return {
        "name": grid.name,
        "sweep": str(grid.path),
        "sha256": grid.sha256,
        "files": files,
        "num_cells": len(cells),
        "cells": cells,
    }


def check_results_dir(grid: Grid, folder: Path) -> dict[str, Any] | None:
    """The saved grid.json of `folder` (None if none); a UserError if it describes another grid.

    Accepted: the same grid; a grid that grew (every recorded cell of its files is still in it: a rate or
    a value added); another file of the same grid folder (its cells are recorded beside the others'); the grid with
    other command-line overrides (a shortened grid beside the full one: their cells have other ids). A grid whose
    files lost recorded cells, or another grid's name, is refused.
    """
    saved_file = folder / "grid.json"
    if not saved_file.is_file():
        return None
    try:
        saved = json.loads(saved_file.read_text())
        ids = [(c["id"], c.get("file"), c.get("with", "")) for c in saved["cells"]]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise UserError(f"{saved_file}: not a dia grid description; use another --results-root") from None
    if saved.get("name") == grid.name and saved.get("sha256") == grid.sha256:
        return saved
    have = {c.id for c in grid.cells}
    mine = {b.path.name for b in grid.blocks}
    # an old grid.json (no files): all are ours; cells recorded with other overrides are theirs
    gone = [i for i, f, w in ids if i not in have and (not f or f in mine) and w == grid.extra_text]
    if saved.get("name") != grid.name or gone:
        why = f"cell {gone[0]} of it is not in {grid.path}" if gone else f"it is named '{saved.get('name')}'"
        raise UserError(
            f"results dir '{folder}' holds another grid ('{saved.get('name')}' from {saved.get('sweep')}, "
            f"{len(ids)} cells; {why}); use another --results-root or name:"
        )
    return saved


def write_grid_json(grid: Grid, folder: Path, saved: dict[str, Any] | None = None) -> None:
    """<folder>/grid.json (written to a temporary name, then renamed)."""
    text = json.dumps(describe(grid, saved) | {"validated": True}, indent=1) + "\n"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".grid.json.{uuid.uuid4().hex}"
        tmp.write_text(text)
        os.replace(tmp, folder / "grid.json")
    except OSError as exc:
        raise UserError(f"--results-root: cannot write '{folder}' ({exc.strerror})") from None


def check(
    grid: Grid, results_root: str | Path, cells: list[Cell] | None = None
) -> tuple[Path, dict[str, Any] | None, bool]:
    """Check the results dir belongs to this grid and validate (all cells, unless grid.json already says so);
    nothing is written. Returns (folder, saved grid.json, whether grid.json must be (re)written)."""
    folder = grid_dir(grid, results_root)
    saved = check_results_dir(grid, folder)
    if saved and saved.get("validated") and saved.get("sha256") == grid.sha256 and cells is not None:
        validate(grid, cells)  # the whole grid was validated when grid.json was written
        return folder, saved, False
    validate(grid)
    return folder, saved, True


def prepare(grid: Grid, results_root: str | Path, cells: list[Cell] | None = None) -> Path:
    """`check`, then write grid.json."""
    folder, saved, write = check(grid, results_root, cells)
    if write:
        write_grid_json(grid, folder, saved)
    return folder


def unfinished(grid: Grid, folder: Path) -> list[int]:
    """Indices of the cells without results (pending or partial)."""
    grid.check_size("listing unfinished cells")
    return [c.index for c in grid.cells if status(grid, folder, c) != "done"]


def status(grid: Grid, folder: Path, cell: Cell) -> str:
    """done / partial / pending, as the run contract defines them (dia.run.folder)."""

    return RunFolder(folder, cell.id).state


def train_args(grid: Grid, folder: Path, cell: Cell) -> list[str]:
    return cell.args() + [
        f"run.output_dir={folder}",
        f"run.name={cell.id}",
        f"logger.wandb.group={grid.name}",
        f"logger.wandb.tags={format_value(cell.tags(grid.name))}",
    ]


# ----------------------------------------------------------------------------------------------- running


def note(msg: str) -> None:
    print(f"[dia.grid] {msg}", file=sys.stderr, flush=True)


def _cpu_threads(configs: list[Any], parallel: int) -> int | None:
    """Torch threads for each of `parallel` CPU children: this process's cores shared out (at least one), so
    that G processes do not each start one thread per core and oversubscribe the CPU (docs/benchmarks.md). None
    when a child may use a GPU or the user set OMP_NUM_THREADS."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return None
    if any(str(cfg.run.device) != "cpu" for cfg in configs) and torch.cuda.is_available():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // parallel)


def _devices(parallel: int) -> list[str]:
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    visible = visible or [str(i) for i in range(parallel)]
    return [visible[i % len(visible)] for i in range(parallel)]


WORST = [ExitCode.PREEMPTED, ExitCode.INTERRUPTED, ExitCode.BAD_INPUT, ExitCode.FAILED, ExitCode.DIVERGED, ExitCode.OK]


def worst(codes: Iterable[int]) -> int:
    """The exit code that matters most: a stop, then bad input, then a failure, then a divergence."""
    codes = list(codes)
    return min(codes, key=lambda c: WORST.index(c) if c in WORST else WORST.index(ExitCode.FAILED), default=ExitCode.OK)


def run_cells(
    grid: Grid,
    folder: Path,
    cells: list[Cell],
    *,
    force: bool = False,
    parallel: int = 1,
    python: str = sys.executable,
    results_root: str | Path | None = None,
) -> int:
    """Run the unfinished `cells`, packed into as few programs as their configs allow (dia.run.pack).

    With `parallel` > 1 the cells are shared out (whole packs at a time) between that many child
    processes, one GPU each (on a CPU: the cores shared out, `_cpu_threads`). Returns the worst exit code (see `worst`).
    """
    from dia.run import execute

    quiet_libraries()
    todo: list[Cell] = []
    refused: list[int] = []
    for cell in cells:
        st = status(grid, folder, cell)
        if st == "done" and not force:
            note(f"cell {cell.index} ({cell.id}) is finished: skipped (--force recomputes it)")
            continue
        if force and not _remove(folder, cell):
            refused.append(ExitCode.BAD_INPUT)
            continue
        todo.append(cell)
    if not todo:
        return worst(refused)
    configs = [compose(train_args(grid, folder, c)) for c in todo]
    if parallel > 1:
        return worst([_run_children(grid, todo, configs, parallel, python, results_root), *refused])
    stop_point("running any cell")
    progress = all(cfg.run.progress for cfg in configs)  # run.progress=false: no bars (in Slurm logs, say)
    try:
        outcomes = execute(configs, keep_going=True, note=note, progress=progress)
    except Stopped as exc:
        left = sum(status(grid, folder, c) != "done" for c in todo)
        note(f"{exc}; {left} cell(s) unfinished: rerun the same command to resume")
        return exc.exit_code
    except (KeyboardInterrupt, SystemExit) as exc:  # a second Ctrl-C (inside Lightning: SystemExit(1))
        if isinstance(exc, SystemExit) and not STOP.aborted:
            raise
        note("interrupted: the last saved checkpoints are kept; rerun the same command to resume")
        return ExitCode.INTERRUPTED
    failed = [(c, o) for c, o in zip(todo, outcomes) if o.code not in (ExitCode.OK, ExitCode.DIVERGED)]
    for cell, outcome in failed:
        note(f"cell {cell.index} ({cell.id}): exit {int(outcome.code)}: {outcome.message}")
    note(f"{len(todo) - len(failed)} of {len(todo)} cell(s) finished" + (f", {len(failed)} failed" if failed else ""))
    return worst([*(o.code for o in outcomes), *refused])


def _remove(folder: Path, cell: Cell) -> bool:
    """--force: remove the cell's folders under its lock, like every other change to a run (False: it is
    being run by another process, nothing removed)."""

    run = RunFolder(folder, cell.id)
    if not run.acquire():
        note(
            f"cell {cell.index} ({cell.id}): --force: being run by another process (pid {run.holder()}, lock "
            f"'{run.lock_path}'); nothing removed"
        )
        return False
    try:
        for p in (run.final, run.partial):
            if p.exists() or p.is_symlink():
                note(f"--force: removing {p}")
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    finally:
        run.release()
    return True


def _run_children(
    grid: Grid, todo: list[Cell], configs: list[Any], parallel: int, python: str, results_root: str | Path | None
) -> int:
    """Share `todo` between `parallel` child processes (`dia.grid --run`), keeping packable cells together."""
    from dia.run.pack import pack_key_of

    groups: dict[str, list[Cell]] = {}
    for cell, cfg in zip(todo, configs):
        groups.setdefault(pack_key_of(cfg), []).append(cell)
    shares: list[list[Cell]] = [[] for _ in range(parallel)]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(shares, key=len).extend(group)
    threads = _cpu_threads(configs, parallel)
    procs: list[subprocess.Popen] = []
    for device, share in zip(_devices(parallel), shares):
        if not share:
            continue
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=device)
        if threads is not None:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        args = [
            python,
            "-m",
            "dia.grid",
            str(grid.path),
            *grid.extra_args,
            "--run",
            ",".join(str(c.index) for c in share),
        ]
        if results_root is not None:
            args += ["--results-root", str(results_root)]
        note(
            f"{len(share)} cell(s) on GPU {device}"
            if threads is None
            else f"{len(share)} cell(s) on {threads} CPU thread(s)"
        )
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
        m = re.fullmatch(r"\s*(\d{1,12})\s*(?:-\s*(\d{1,12})\s*)?", part)
        if not m:
            raise UserError(f"--run: '{text}' is not a cell index, list (0,2) or range (4-7)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 0 <= lo <= hi < n:
            bad = lo if not 0 <= lo < n else hi
            if lo > hi:
                raise UserError(f"--run: range '{part.strip()}' is empty (its start is after its end)")
            raise UserError(f"cell index {bad} is outside the grid ({n} cells: valid 0..{n - 1})")
        out += list(range(lo, hi + 1))
    return out


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dia.grid",
        description="Run the cells of a W&B grid sweep file (or a folder of them) with dia.train.",
    )
    p.add_argument("sweep", help="a sweep file (sweeps/smoke.yaml) or a folder of them, one grid (sweeps/paper)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides for every cell, as dia.train takes them (attack.max_iterations=100 num_victims=1): part of "
        "each cell's id, so a shortened grid's cells are its own; a key the grid varies cannot be overridden",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--count", action="store_true", help="print the number of cells")
    what.add_argument("--list", action="store_true", help="one line per cell: index, id, status, overrides")
    what.add_argument("--show", type=int, metavar="I", help="cell I as JSON (id, folder, status, dia.train command)")
    what.add_argument("--run", metavar="I", help="run cell I (or a list 0,2 or a range 4-7)")
    what.add_argument(
        "--task",
        type=int,
        metavar="T",
        help="run array task T: P cells where P is --per-task, positions T*P .. T*P+P-1 in task order "
        "(the keys that vary inside a pack fastest: whole packs where the grid allows)",
    )
    what.add_argument("--run-all", action="store_true", help="run every unfinished cell")
    what.add_argument(
        "--validate", action="store_true", help="check every cell (config and data), write grid.json, print the count"
    )
    what.add_argument(
        "--unfinished", action="store_true", help="print the indices of the cells without results, comma-separated"
    )
    what.add_argument(
        "--wandb-sweeps", metavar="DIR", help="write the grid's files as W&B sweeps for agents (online, group <grid>)"
    )
    p.add_argument("--per-task", type=int, default=1, metavar="P", help="cells per --task (default 1)")
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        metavar="G",
        help="processes at once, one GPU each (CUDA_VISIBLE_DEVICES per child; on a CPU the cores are shared "
        "out), each packing its share of the cells; "
        "default 1 (--task: one per visible GPU)",
    )
    p.add_argument("--force", action="store_true", help="recompute finished cells (their folders are removed first)")
    p.add_argument(
        "--results-root",
        default=os.environ.get("DIA_RESULTS_ROOT", "results"),
        help="results go to <results-root>/<grid name>/<cell id>/ (default: $DIA_RESULTS_ROOT or results)",
    )
    return p


def _write_wandb_sweeps(grid: Grid, out: Path) -> list[Path]:
    if out.exists() and not out.is_dir():
        raise UserError(f"--wandb-sweeps: '{out}' is a file, not a folder; give a folder for the sweep files")
    sweeps = wandb_sweeps(grid)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--wandb-sweeps: cannot create '{out}' ({exc.strerror})") from None
    written = []
    for sweep in sweeps:
        path = out / f"{sweep['name']}.yaml"
        tmp = out / f".{path.name}.{uuid.uuid4().hex}"
        tmp.write_text(yaml.safe_dump(sweep, sort_keys=False, width=200))
        os.replace(tmp, path)
        written.append(path)
    return written


def describe_cell(grid: Grid, folder: Path, c: Cell) -> dict[str, Any]:
    """What `--show I` prints: the cell, its folder and status, and the dia.train command that runs it."""
    return {
        "index": c.index,
        "id": c.id,
        "grid": grid.name,
        "folder": str(folder / c.id),
        "status": status(grid, folder, c),
        "coords": c.coords,
        "overrides": c.overrides,
        "command": ["python", "-m", "dia.train", *train_args(grid, folder, c)],
    }


def selected(grid: Grid, a: argparse.Namespace) -> list[Cell]:
    """The cells `--run I`, `--task T` or `--run-all` take."""
    if a.run is not None:
        return [grid.cell(i) for i in parse_indices(a.run, len(grid))]
    if a.task is not None:
        return grid.task(a.task, a.per_task)  # consecutive in task order: whole packs where the grid allows
    grid.check_size("--run-all")
    return list(grid.cells)


def main(argv: list[str] | None = None) -> int:
    install_signals()  # first, before anything slow: a signal during start-up or validation is a clean stop
    keep_freed_memory()  # before torch allocates: no page faults per attack iteration on a CPU (dia.memory)
    parser = build_parser()
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"{message}; see `python -m dia.grid --help`"))  # type: ignore[method-assign]
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--list | head` ends quietly
    try:
        a = parser.parse_intermixed_args(argv)  # overrides before, between or after the options
        if a.parallel is not None and a.parallel < 1 or a.per_task < 1:
            raise UserError("--parallel and --per-task must be positive integers")
        grid = load(a.sweep, a.overrides)
        if a.count:
            print(len(grid))
            return ExitCode.OK
        if a.wandb_sweeps:
            for path in _write_wandb_sweeps(grid, Path(a.wandb_sweeps)):
                print(path)
            return ExitCode.OK
        folder = grid_dir(grid, a.results_root)
        if a.list:
            grid.check_size("--list")
            for c in grid.cells:
                print(f"{c.index:>4}  {c.id:<40} {status(grid, folder, c):<8} {' '.join(c.args())}")
            return ExitCode.OK
        if a.show is not None:
            print(json.dumps(describe_cell(grid, folder, grid.cell(a.show)), indent=1))
            return ExitCode.OK
        if a.unfinished:
            check_results_dir(grid, folder)
            print(",".join(map(str, unfinished(grid, folder))))
            return ExitCode.OK
        if a.validate:
            prepare(grid, a.results_root)
            print(len(grid))
            return ExitCode.OK
        cells = selected(grid, a)
        folder = prepare(grid, a.results_root, None if a.run_all else cells)
        # an array task packs its cells on its GPUs: one process per visible GPU (Slurm sets CUDA_VISIBLE_DEVICES)
        gpus = len([d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()])
        parallel = a.parallel or (max(1, min(a.per_task, gpus)) if a.task is not None else 1)
        return run_cells(grid, folder, cells, force=a.force, parallel=parallel, results_root=a.results_root)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).splitlines())}", file=sys.stderr)  # one line, whatever the input held
        return ExitCode.BAD_INPUT
    except Stopped as exc:  # a signal while checking the grid: nothing ran, nothing half written
        note(
            f"{'interrupted' if exc.exit_code == ExitCode.INTERRUPTED else 'preempted'}: {exc}; rerun the same command"
        )
        return exc.exit_code
    except KeyboardInterrupt:
        note("interrupted before any cell ran; rerun the same command")
        return ExitCode.INTERRUPTED
