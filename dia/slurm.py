"""`python -m dia.slurm submit SWEEP ...`: the grid as a SLURM array job (slurm/grid.sbatch), sized from the grid.

    python -m dia.slurm submit sweeps/paper.yaml --partition gpu --time 12:00:00 --max-parallel 32
    python -m dia.slurm submit sweeps/paper.yaml --partition gpu --time 12:00:00 --cells-per-task 4   # 4-GPU nodes
    python -m dia.slurm submit sweeps/smoke.yaml --partition debug --time 10 --gpus-per-task 0 --dry-run
    python -m dia.slurm agents ENTITY/PROJECT/SWEEP_ID --agents 8 --count 20 --partition gpu --time 24:00:00

`submit` validates every cell (as dia.grid does), writes `<results>/<grid>/grid.json`, renders
slurm/grid.sbatch with the options given (array size, partition, time, GPUs, log files under
`<results>/<grid>/logs/`) into `<results>/<grid>/slurm/`, submits it with `sbatch --parsable` and prints the
job id. `--dry-run` prints the rendered script and the sbatch command instead (nothing is written).
Exit codes: 0 ok, 2 bad input (one line), 1 sbatch refused the job (its message).
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
from dia.errors import UserError

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"


def template(name: str) -> str:
    path = Path(os.environ.get("DIA_SLURM_DIR", SLURM_DIR)) / name
    if not path.is_file():
        raise UserError(f"no {name} at '{path}'; run from a dia source checkout or set DIA_SLURM_DIR to its slurm/ folder")
    return path.read_text()


def _option(line: str) -> str | None:
    m = re.match(r"#SBATCH\s+(--?[A-Za-z-]+)", line)
    return m.group(1) if m else None


def render(text: str, options: list[str], exports: dict[str, str] | None = None) -> str:
    """The script with its `#SBATCH` options replaced by `options` (e.g. '--time=10'); new ones are appended.

    An option given as '--gres=' (empty) removes the template's line. `exports` become `export K=V` lines.
    """
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
        return 0
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
        return 1
    job = done.stdout.strip().split(";")[0]
    print(job)
    print(f"[dia.slurm] submitted {path} as job {job}", file=sys.stderr)
    return 0


def submit(a: argparse.Namespace) -> int:
    grid = G.load(a.sweep)
    folder = G.grid_dir(grid, Path(a.results_root).resolve())
    if a.dry_run:
        G.check_results_dir(grid, folder)
        G.validate(grid)
    else:
        G.prepare(grid, folder.parent)
    per = a.cells_per_task
    tasks = math.ceil(len(grid.cells) / per)
    array = f"0-{tasks - 1}" + (f"%{a.max_parallel}" if a.max_parallel else "")
    gpus = a.gpus_per_task * per
    options = [f"--array={array}", f"--job-name=dia-{grid.name}", f"--time={a.time}",
               f"--output={folder / 'logs' / 'slurm-%A_%a.out'}", f"--gres=gpu:{gpus}" if gpus else "--gres="]
    if a.partition:
        options.append(f"--partition={a.partition}")
    if per > 1:
        options.append(f"--cpus-per-task={per}")
    options += a.extra_sbatch or []
    exports = {"DIA_PYTHON": os.environ.get("DIA_PYTHON", sys.executable), "DIA_CELLS_PER_TASK": str(per)}
    script = render(template("grid.sbatch"), options, exports)
    args = [str(Path(a.sweep).resolve()), "--results-root", str(folder.parent)] + (["--force"] if a.force else [])
    if not a.dry_run:
        (folder / "logs").mkdir(parents=True, exist_ok=True)
    print(f"[dia.slurm] grid '{grid.name}': {len(grid.cells)} cells, {tasks} array tasks ({per} cell(s) and {gpus} GPU(s) each)",
          file=sys.stderr)
    return _sbatch(script, args, folder / "slurm", "grid", a.dry_run)


def agents(a: argparse.Namespace) -> int:
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+){0,2}", a.sweep_id):
        raise UserError(f"sweep id '{a.sweep_id}' is not ENTITY/PROJECT/ID (as `wandb sweep` prints it)")
    logs = Path(a.logs).resolve()
    options = [f"--array=0-{a.agents - 1}", f"--time={a.time}", f"--output={logs / 'slurm-%A_%a.out'}",
               f"--gres=gpu:{a.gpus_per_task}" if a.gpus_per_task else "--gres="]
    if a.partition:
        options.append(f"--partition={a.partition}")
    options += a.extra_sbatch or []
    script = render(template("agents.sbatch"), options)
    if not a.dry_run:
        logs.mkdir(parents=True, exist_ok=True)
    return _sbatch(script, [a.sweep_id, str(a.count)], logs, "agents", a.dry_run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dia.slurm", description="Submit dia grids and W&B agents as SLURM arrays.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--partition", "-p", default=None, help="SLURM partition (default: the cluster's default)")
        s.add_argument("--time", "-t", required=True, help="time limit per task, e.g. 12:00:00 or 30 (minutes)")
        s.add_argument("--gpus-per-task", type=int, default=1, help="GPUs per cell (0: CPU only, no --gres); default 1")
        s.add_argument("--extra-sbatch", action="append", metavar="OPT",
                       help="another sbatch option, e.g. --extra-sbatch=--account=abc (repeatable)")
        s.add_argument("--dry-run", action="store_true", help="print the rendered script and the sbatch command; submit nothing")

    s = sub.add_parser("submit", help="the grid of a sweep file as an array job (slurm/grid.sbatch)")
    s.add_argument("sweep")
    common(s)
    s.add_argument("--max-parallel", type=int, default=None, metavar="N", help="at most N array tasks at once (sbatch --array=...%%N)")
    s.add_argument("--cells-per-task", type=int, default=1, metavar="G",
                   help="cells per array task, run at once with one GPU each (multi-GPU nodes); default 1")
    s.add_argument("--results-root", default=os.environ.get("DIA_RESULTS_ROOT", "results"))
    s.add_argument("--force", action="store_true", help="recompute finished cells")
    s = sub.add_parser("agents", help="W&B sweep agents as an array job (slurm/agents.sbatch)")
    s.add_argument("sweep_id", help="ENTITY/PROJECT/SWEEP_ID as `wandb sweep` prints it")
    common(s)
    s.add_argument("--agents", type=int, default=1, help="array tasks, one agent each")
    s.add_argument("--count", type=int, default=1, help="runs per agent")
    s.add_argument("--logs", default="slurm-logs", help="folder for the tasks' logs")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"{message}; see `python -m dia.slurm --help`"))  # type: ignore[method-assign]
    try:
        a = parser.parse_args(argv)
        for name in ("gpus_per_task", "max_parallel", "cells_per_task", "agents", "count"):
            v = getattr(a, name, None)
            if v is not None and (v < 0 or (v == 0 and name != "gpus_per_task")):
                raise UserError(f"--{name.replace('_', '-')}: must be a positive integer")
        if not re.fullmatch(r"[0-9:-]+|UNLIMITED|INFINITE", a.time):
            raise UserError(f"--time '{a.time}': use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
        return submit(a) if a.command == "submit" else agents(a)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
