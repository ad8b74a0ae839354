"""`python -m dia.slurm submit SWEEP ...`: the grid as a SLURM array job (slurm/grid.sbatch), sized from the grid.

    python -m dia.slurm submit sweeps/paper --partition gpu --time 12:00:00 --max-parallel 32
    python -m dia.slurm submit sweeps/paper --partition gpu --time 12:00:00 --cells-per-task 4   # 4-GPU nodes
    python -m dia.slurm submit sweeps/paper --partition gpu --time 12:00:00 --only-unfinished   # fill the gaps
    python -m dia.slurm submit sweeps/smoke.yaml --partition debug --time 10 --gpus-per-task 0 --dry-run
    python -m dia.slurm cancel JOBID                      # stop for good: no requeue, progress kept
    python -m dia.slurm agents ENTITY/PROJECT/SWEEP_ID --agents 8 --count 20 --partition gpu --time 24:00:00

`submit` validates every cell (as dia.grid does), writes `<results>/<grid>/grid.json`, renders
slurm/grid.sbatch with the options given (array indices, throttle, partition, time, GPUs, CPUs and memory
per cell, log files under `<results>/<grid>/logs/`) into `<results>/<grid>/slurm/`, submits it with
`sbatch --parsable` and prints the job id. `--dry-run` prints the rendered script and the sbatch command
instead (nothing is written). Exit codes (`dia.errors.ExitCode`): 0 ok, 2 bad input (one line), 1 sbatch
or scancel refused (its message).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dia import grid as G
from dia.errors import ExitCode, UserError

_HERE = Path(__file__).resolve().parent
SLURM_DIR = _HERE / "templates" if (_HERE / "templates").is_dir() else _HERE.parent.parent / "slurm"  # wheel, else checkout


def template(name: str) -> str:
    path = Path(os.environ.get("DIA_SLURM_DIR", SLURM_DIR)) / name
    if not path.is_file():
        raise UserError(f"no {name} at '{path}'; set DIA_SLURM_DIR to a dia slurm/ folder")
    return path.read_text()


def _option(line: str) -> str | None:
    m = re.match(r"#SBATCH\s+(--?[A-Za-z-]+)", line)
    return m.group(1) if m else None


def render(text: str, options: list[str], exports: dict[str, str] | None = None) -> str:
    """The script with its `#SBATCH` options replaced by `options` (e.g. '--time=10'); new ones are appended.

    An option given as '--gres=' (empty) removes the template's line. `exports` become `export K=V` lines.
    """
    for value in [*options, *(exports or {}).values()]:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise UserError(f"sbatch option {value!r}: control characters (a newline) would become lines of the job script")
    wanted: dict[str, str] = {}
    for opt in options:
        key = opt.split("=", 1)[0]
        wanted[key] = opt
    lines = text.splitlines()
    out: list[str] = []
    last = 0
    for line in lines:
        key = _option(line)
        if key is not None:
            if key in wanted:
                value = wanted.pop(key)
                if value.endswith("="):
                    continue
                line = f"#SBATCH {value}"
            out.append(line)
            last = len(out)
        else:
            out.append(line)
    extra = [f"#SBATCH {v}" for v in wanted.values() if not v.endswith("=")]
    extra += [f"export {k}={shlex.quote(v)}" for k, v in (exports or {}).items()]
    return "\n".join(out[:last] + extra + out[last:]) + "\n"


def _sbatch(script: str, args: list[str], where: Path, stem: str, dry_run: bool) -> int:
    cmd = ["sbatch", "--parsable", str(where / f"{stem}-<time>.sbatch"), *args]
    if dry_run:
        print(script, end="")
        print(f"# submit with: {shlex.join(cmd)}")
        return ExitCode.OK
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: run this on a SLURM login node (or start slurm/local-cluster.sh)")
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    cmd[2] = str(path)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"error: sbatch refused the job: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}", file=sys.stderr)
        return ExitCode.FAILED
    job = done.stdout.strip().split(";")[0]
    print(job)
    print(f"[dia.slurm] submitted {path} as job {job}", file=sys.stderr)
    return ExitCode.OK


def array_spec(indices: list[int]) -> str:
    """Task indices as sbatch's --array list: runs of consecutive indices as ranges, e.g. '0-3,7,9-10'."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(f"{start}-{k}" if k > start else str(start))
            start = None
    return ",".join(parts)


def _memory(text: str) -> tuple[int, str]:
    m = re.fullmatch(r"(\d{1,7})([KMGT]?)", text.strip().upper())
    if not m or int(m.group(1)) == 0:
        raise UserError(f"--mem-per-cell '{text}': use a size such as 16G or 8000M")
    return int(m.group(1)), m.group(2) or "M"


def submit(a: argparse.Namespace) -> int:
    grid = G.load(a.sweep)
    folder = G.grid_dir(grid, Path(a.results_root).resolve())
    if a.dry_run:
        G.check_results_dir(grid, folder)
        G.validate(grid)
    else:
        G.prepare(grid, folder.parent)
    per = a.cells_per_task
    tasks = math.ceil(len(grid) / per)
    indices = list(range(tasks))
    if a.only_unfinished:
        indices = sorted({i // per for i in G.unfinished(grid, folder)})
        if not indices:
            print(f"[dia.slurm] grid '{grid.name}': every cell is finished; nothing to submit", file=sys.stderr)
            return ExitCode.OK
    array = array_spec(indices) + (f"%{a.max_parallel}" if a.max_parallel else "")
    gpus = a.gpus_per_task
    amount, unit = _memory(a.mem_per_cell)
    options = [f"--array={array}", f"--job-name=dia-{grid.name}", f"--time={a.time}",
               f"--output={folder / 'logs' / 'slurm-%A_%a.out'}", f"--gres=gpu:{gpus}" if gpus else "--gres=",
               f"--cpus-per-task={a.cpus_per_cell * per}", f"--mem={amount * per}{unit}"]
    if a.partition:
        options.append(f"--partition={a.partition}")
    options += a.extra_sbatch or []
    exports = {"DIA_PYTHON": os.environ.get("DIA_PYTHON", sys.executable), "DIA_CELLS_PER_TASK": str(per)}
    script = render(template("grid.sbatch"), options, exports)
    args = [str(Path(a.sweep).resolve()), "--results-root", str(folder.parent)] + (["--force"] if a.force else [])
    if not a.dry_run:
        (folder / "logs").mkdir(parents=True, exist_ok=True)
    print(f"[dia.slurm] grid '{grid.name}': {len(grid)} cells, {len(indices)} array tasks ({per} cell(s) and {gpus} GPU(s) each)",
          file=sys.stderr)
    return _sbatch(script, args, folder / "slurm", "grid", a.dry_run)


def agents(a: argparse.Namespace) -> int:
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+){0,2}", a.sweep_id):
        raise UserError(f"sweep id '{a.sweep_id}' is not ENTITY/PROJECT/ID (as `wandb sweep` prints it)")
    logs = Path(a.logs).resolve()
    amount, unit = _memory(a.mem_per_cell)
    options = [f"--array=0-{a.agents - 1}" + (f"%{a.max_parallel}" if a.max_parallel else ""), f"--time={a.time}",
               f"--output={logs / 'slurm-%A_%a.out'}", f"--gres=gpu:{a.gpus_per_task}" if a.gpus_per_task else "--gres=",
               f"--cpus-per-task={a.cpus_per_cell}", f"--mem={amount}{unit}"]
    if a.partition:
        options.append(f"--partition={a.partition}")
    options += a.extra_sbatch or []
    script = render(template("agents.sbatch"), options, {"DIA_PYTHON": os.environ.get("DIA_PYTHON", sys.executable)})
    if not a.dry_run:
        logs.mkdir(parents=True, exist_ok=True)
    return _sbatch(script, [a.sweep_id, str(a.count)], logs, "agents", a.dry_run)


def cancel(a: argparse.Namespace) -> int:
    """`scancel` the job: its tasks get SIGTERM, save their progress and end without requeueing (see grid.sbatch)."""
    if not re.fullmatch(r"\d+(_\d+)?", a.job):
        raise UserError(f"job id '{a.job}' is not JOBID or JOBID_TASK (as `dia.slurm submit` and squeue print it)")
    if shutil.which("scancel") is None:
        raise UserError("scancel not found: run this on a SLURM login node")
    done = subprocess.run(["scancel", a.job], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"error: scancel refused: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"[dia.slurm] cancelled job {a.job}: running cells save their progress and are not requeued; "
          "`dia.slurm submit ... --only-unfinished` resumes them", file=sys.stderr)
    return ExitCode.OK


SBATCH_OPTION = re.compile(r"--?[A-Za-z][A-Za-z-]*(=\S.*)?")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dia.slurm", description="Submit dia grids and W&B agents as SLURM arrays.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--partition", "-p", default=None, help="SLURM partition (default: the cluster's default)")
        s.add_argument("--time", "-t", required=True, help="time limit per task, e.g. 12:00:00 or 30 (minutes)")
        s.add_argument("--gpus-per-task", type=int, default=1, help="GPUs per cell (0: CPU only, no --gres); default 1")
        s.add_argument("--cpus-per-cell", type=int, default=4, help="CPU cores per cell (data loading, compilation); default 4")
        s.add_argument("--mem-per-cell", default="32G", help="host memory per cell (sbatch --mem, times the cells of a task); default 32G")
        s.add_argument("--max-parallel", type=int, default=16, metavar="N",
                       help="at most N array tasks at once (sbatch --array=...%%N); default 16, 0: no limit")
        s.add_argument("--extra-sbatch", action="append", metavar="OPT",
                       help="another sbatch option, e.g. --extra-sbatch=--account=abc (repeatable)")
        s.add_argument("--dry-run", action="store_true", help="print the rendered script and the sbatch command; submit nothing")

    s = sub.add_parser("submit", help="the grid of a sweep file (or folder) as an array job (slurm/grid.sbatch)")
    s.add_argument("sweep")
    common(s)
    s.add_argument("--cells-per-task", type=int, default=1, metavar="G",
                   help="cells per array task, packed into one program per GPU of the task (e.g. 18: one (data, model) "
                        "block of the paper grid, every rate and attack); default 1")
    s.add_argument("--only-unfinished", action="store_true", help="array tasks only for cells without results")
    s.add_argument("--results-root", default=os.environ.get("DIA_RESULTS_ROOT", "results"))
    s.add_argument("--force", action="store_true", help="recompute finished cells")
    s = sub.add_parser("agents", help="W&B sweep agents as an array job (slurm/agents.sbatch)")
    s.add_argument("sweep_id", help="ENTITY/PROJECT/SWEEP_ID as `wandb sweep` prints it")
    common(s)
    s.add_argument("--agents", type=int, default=1, help="array tasks, one agent each")
    s.add_argument("--count", type=int, default=1, help="runs per agent")
    s.add_argument("--logs", default="slurm-logs", help="folder for the tasks' logs")
    s = sub.add_parser("cancel", help="cancel a grid job for good (no requeue; progress is kept)")
    s.add_argument("job", help="JOBID (or JOBID_TASK)")
    return p


def _check(a: argparse.Namespace) -> None:
    """Every option that reaches the job script: integers in range, a time, no control characters, real options."""
    for name in ("gpus_per_task", "cpus_per_cell", "max_parallel", "cells_per_task", "agents", "count"):
        v = getattr(a, name, None)
        zero_ok = name in ("gpus_per_task", "max_parallel")
        if v is not None and not ((0 if zero_ok else 1) <= v <= 10**6):
            raise UserError(f"--{name.replace('_', '-')}={v}: must be a {'non-negative' if zero_ok else 'positive'} integer")
    if not re.fullmatch(r"[0-9:-]{1,16}|UNLIMITED|INFINITE", a.time):
        raise UserError(f"--time {a.time!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    if a.partition is not None and not re.fullmatch(r"[A-Za-z0-9_.,-]{1,128}", a.partition):
        raise UserError(f"--partition {a.partition!r}: a partition name (letters, digits, '_', '.', '-', or a comma-separated list)")
    for opt in a.extra_sbatch or []:
        if any(ord(c) < 32 or ord(c) == 127 for c in opt) or not SBATCH_OPTION.fullmatch(opt):
            raise UserError(f"--extra-sbatch {opt!r}: one sbatch option such as --account=lab (no newlines)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"{message}; see `python -m dia.slurm --help`"))  # type: ignore[method-assign]
    try:
        a = parser.parse_args(argv)
        if a.command == "cancel":
            return cancel(a)
        _check(a)
        return submit(a) if a.command == "submit" else agents(a)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).splitlines())}", file=sys.stderr)  # one line, whatever the input held
        return ExitCode.BAD_INPUT

