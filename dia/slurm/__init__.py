"""`python -m dia.slurm submit SWEEP ...`: the grid as a SLURM array job (slurm/grid.sbatch), sized from the grid.

    python -m dia.slurm submit sweeps/paper --partition gpu --time 12:00:00 --max-parallel 32
    python -m dia.slurm submit sweeps/paper --partition gpu --time 12:00:00 --cells-per-task 18  # one pack per task
    python -m dia.slurm submit sweeps/paper -p gpu -t 12:00:00 --cells-per-task 72 --gpus-per-task 4  # 4-GPU nodes
    python -m dia.slurm submit sweeps/paper --partition gpu --time 12:00:00 --only-unfinished   # fill the gaps
    python -m dia.slurm submit sweeps/smoke.yaml --partition debug --time 10 --gpus-per-task 0 --dry-run
    python -m dia.slurm submit sweeps/paper attack.max_iterations=2000 -p gpu -t 2:00:00   # overrides for every cell
    python -m dia.slurm cancel JOBID                      # stop for good: no requeue, progress kept
    python -m dia.slurm agents ENTITY/PROJECT/SWEEP_ID --agents 8 --count 20 --partition gpu --time 24:00:00

`submit` validates every cell (as dia.grid does), renders slurm/grid.sbatch with the options given (array
indices, throttle, partition, time, GPUs, and CPUs and memory per *program*: a task runs one packed
program per GPU, whatever its number of cells; log files under `<results>/<grid>/logs/`), checks the
request against the partition's nodes (`sinfo`, when it can tell) and submits it held (`sbatch --parsable
--hold`). Only once sbatch has accepted it are `<results>/<grid>/grid.json`, the logs folder and a copy
of the script in `<results>/<grid>/slurm/` written, then the job is released; it prints the job id.
`--dry-run` prints the rendered script and the sbatch command instead (nothing is written). Every value in
the script is quoted for sbatch (`#SBATCH --output="..."`, `%` doubled) and the shell (`export K='...'`),
so results folders with spaces, quotes or `%` work. Exit codes (`dia.errors.ExitCode`): 0 ok, 2 bad input
(one line), 1 sbatch or scancel refused (its message).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dia import grid as G
from dia.errors import ExitCode, UserError

_HERE = Path(__file__).resolve().parent
SLURM_DIR = (
    _HERE / "templates" if (_HERE / "templates").is_dir() else _HERE.parent.parent / "slurm"
)  # wheel, else checkout


def template(name: str) -> str:
    path = Path(os.environ.get("DIA_SLURM_DIR", SLURM_DIR)) / name
    if not path.is_file():
        raise UserError(f"no {name} at '{path}'; set DIA_SLURM_DIR to a dia slurm/ folder")
    return path.read_text()


def _option(line: str) -> str | None:
    m = re.match(r"#SBATCH\s+(--?[A-Za-z-]+)", line)
    return m.group(1) if m else None


SAFE = re.compile(r"[A-Za-z0-9_.,:/@%+=-]*")  # values sbatch reads the same quoted or not


def sbatch_line(option: str) -> str:
    """`#SBATCH --key=value` with the value quoted for sbatch's own parser when it needs it (spaces, quotes,
    '#', which would start a comment, backslashes): `--output="/my results/x"`."""
    key, eq, value = option.partition("=")
    if not eq or SAFE.fullmatch(value):
        return f"#SBATCH {option}"
    return f'#SBATCH {key}="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def filename_pattern(path: Path) -> str:
    """A literal path as sbatch's --output pattern: '%' doubled (else '%j' in a folder name is a job id)."""
    return str(path).replace("%", "%%")


def render(text: str, options: list[str], exports: dict[str, str] | None = None) -> str:
    """The script with its `#SBATCH` options replaced by `options` (e.g. '--time=10'); new ones are appended.

    An option given as '--gres=' (empty) removes the template's line. Values are quoted (`sbatch_line`);
    `exports` become `export K='V'` lines (shell-quoted).
    """
    for value in [*options, *(exports or {}).values()]:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise UserError(
                f"sbatch option {value!r}: control characters (a newline) would become lines of the job script"
            )
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
                line = sbatch_line(value)
            out.append(line)
            last = len(out)
        else:
            out.append(line)
    extra = [sbatch_line(v) for v in wanted.values() if not v.endswith("=")]
    extra += [f"export {k}={shlex.quote(v)}" for k, v in (exports or {}).items()]
    return "\n".join(out[:last] + extra + out[last:]) + "\n"


def _sbatch(
    script: str, args: list[str], where: Path, stem: str, dry_run: bool, after: Callable[[], None] = lambda: None
) -> int:
    """Submit `script` held; once sbatch accepted it, run `after` (write what the job needs), keep a copy of
    the script in `where` and release the job. Nothing is written before sbatch says yes; if writing fails
    the job is cancelled."""
    cmd = ["sbatch", "--parsable", "--hold", str(where / f"{stem}-<time>.sbatch"), *args]
    if dry_run:
        print(script, end="")
        print(f"# submit with: {shlex.join([c for c in cmd if c != '--hold'])}")
        return ExitCode.OK
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: run this on a SLURM login node (or start slurm/local-cluster.sh)")
    with tempfile.NamedTemporaryFile("w", prefix=f"dia-{stem}-", suffix=".sbatch", delete=False) as f:
        f.write(script)
    tmp = Path(f.name)
    try:
        cmd[3] = str(tmp)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(
                f"error: sbatch refused the job (nothing was written): "
                f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}",
                file=sys.stderr,
            )
            return ExitCode.FAILED
        job = done.stdout.strip().split(";")[0]
        path = where / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{job}.sbatch"
        try:
            after()
            where.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp, path)
        except BaseException:
            subprocess.run(["scancel", job], capture_output=True)
            raise
    finally:
        tmp.unlink(missing_ok=True)
    released = subprocess.run(["scontrol", "release", job], capture_output=True, text=True)
    if released.returncode != 0:
        print(
            f"error: job {job} was submitted held and could not be released ({released.stderr.strip()}); "
            f"release it with `scontrol release {job}`",
            file=sys.stderr,
        )
        return ExitCode.FAILED
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


UNITS = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def _memory(text: str, option: str) -> tuple[int, str]:
    m = re.fullmatch(r"(\d{1,7})([KMGT]?)", text.strip().upper())
    if not m or int(m.group(1)) == 0:
        raise UserError(f"{option} '{text}': use a size such as 16G or 8000M")
    return int(m.group(1)), m.group(2) or "M"


def seconds(limit: str) -> int | None:
    """Slurm's --time (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None for no limit."""
    if limit in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = limit.rpartition("-") if "-" in limit else ("", "", limit)
    parts = [int(p) for p in rest.split(":")] if rest and all(p.isdigit() for p in rest.split(":")) else None
    if parts is None or (days and not days.isdigit()) or len(parts) > 3:
        raise UserError(f"--time {limit!r}: use minutes, MM:SS, HH:MM:SS, D-HH or D-HH:MM:SS")
    if days:
        h, m, s_ = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s_
    return {
        1: lambda: parts[0] * 60,
        2: lambda: parts[0] * 60 + parts[1],
        3: lambda: (parts[0] * 60 + parts[1]) * 60 + parts[2],
    }[len(parts)]()


def warning_seconds(template_text: str) -> int:
    """How long before the time limit the template asks Slurm for its signal (`--signal=B:USR1@120`)."""
    m = re.search(r"^#SBATCH\s+--signal=\S*@(\d+)", template_text, re.M)
    return int(m.group(1)) if m else 0


def check_time(limit: str, warning: int) -> None:
    """A time limit must leave room after the warning signal: at or under it, the signal would come at once
    (before any cell started), the task would be requeued with nothing done, again and again."""
    total = seconds(limit)
    if total is not None and total <= warning:
        raise UserError(
            f"--time {limit}: {total} s is not more than the {warning} s before the end at which Slurm signals "
            f"the task to save and requeue (#SBATCH --signal=...@{warning}); give more than {warning // 60} minutes"
        )


def partition_nodes(partition: str | None) -> list[tuple[str, int, int, int]] | None:
    """(node, CPUs, memory MB, GPUs) of every node of `partition` (the default one when None), from `sinfo`;
    None when sinfo is missing or cannot say (then nothing is checked)."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G"] + (["-p", partition] if partition else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    nodes = []
    try:
        for line in done.stdout.splitlines():
            node, part, cpus, mem, gres = line.strip().split("|")
            if partition is None and not part.endswith("*"):
                continue
            gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
            nodes.append((node, int(cpus.rstrip("+")), int(mem.rstrip("+")), gpus))
    except ValueError:
        return None
    return nodes or None


def check_fits(partition: str | None, cpus: int, mem_mb: float, gpus: int, what: str) -> None:
    """A one-line UserError when no node of the partition has `cpus` CPUs, `mem_mb` MB and `gpus` GPUs."""
    nodes = partition_nodes(partition)
    if nodes is None or any(c >= cpus and m >= mem_mb and g >= gpus for _, c, m, g in nodes):
        return
    big = max(nodes, key=lambda n: (n[3], n[1], n[2]))
    raise UserError(
        f"{what} fits no node of partition {partition or '(default)'}: the largest has {big[1]} CPUs, "
        f"{big[2]}M memory, {big[3]} GPU(s); lower --cpus-per-program/--mem-per-program or --gpus-per-task"
    )


def resources(a: argparse.Namespace, programs: int) -> list[str]:
    """--gres, --cpus-per-task and --mem of a task that runs `programs` programs at once (one per GPU), checked
    against the partition."""
    gpus = a.gpus_per_task
    amount, unit = _memory(a.mem_per_program, "--mem-per-program")
    cpus, mem = a.cpus_per_program * programs, amount * programs
    what = f"the request of each task ({programs} program(s): --cpus-per-task={cpus}, --mem={mem}{unit}" + (
        f", --gres=gpu:{gpus})" if gpus else ")"
    )
    check_fits(a.partition, cpus, mem * UNITS[unit], gpus, what)
    return [f"--gres=gpu:{gpus}" if gpus else "--gres=", f"--cpus-per-task={cpus}", f"--mem={mem}{unit}"]


def submit(a: argparse.Namespace) -> int:
    grid = G.load(a.sweep, a.overrides)  # key=value overrides for every cell, as dia.grid takes them
    text = template("grid.sbatch")
    check_time(a.time, warning_seconds(text))
    grid.check_size("submit")
    folder, saved, write = G.check(grid, Path(a.results_root).resolve())
    per = a.cells_per_task
    indices = list(range(grid.tasks(per)))
    if a.only_unfinished:
        indices = sorted({grid.task_of(i, per) for i in G.unfinished(grid, folder)})
        if not indices:
            print(f"[dia.slurm] grid '{grid.name}': every cell is finished; nothing to submit", file=sys.stderr)
            return ExitCode.OK
    array = array_spec(indices) + (f"%{a.max_parallel}" if a.max_parallel else "")
    gpus = a.gpus_per_task
    programs = max(1, min(per, gpus))  # dia.grid --task: one packed program per GPU (a CPU-only task: one)
    options = [
        f"--array={array}",
        f"--job-name=dia-{grid.name}",
        f"--time={a.time}",
        f"--output={filename_pattern(folder / 'logs')}/slurm-%A_%a.out",
        *resources(a, programs),
    ]
    if a.partition:
        options.append(f"--partition={a.partition}")
    options += a.extra_sbatch or []
    exports = {"DIA_PYTHON": os.environ.get("DIA_PYTHON", sys.executable), "DIA_CELLS_PER_TASK": str(per)}
    script = render(text, options, exports)
    args = [str(Path(a.sweep).resolve()), *grid.extra_args, "--results-root", str(folder.parent)]
    args += ["--force"] if a.force else []
    print(
        f"[dia.slurm] grid '{grid.name}': {len(grid)} cells, {len(indices)} array tasks ({per} cell(s), {gpus} GPU(s) "
        f"and {programs} program(s) each)",
        file=sys.stderr,
    )

    def record() -> None:  # only once sbatch has accepted the job (held until this is done)
        if write:
            G.write_grid_json(grid, folder, saved)
        (folder / "logs").mkdir(parents=True, exist_ok=True)

    return _sbatch(script, args, folder / "slurm", "grid", a.dry_run, after=record)


def agents(a: argparse.Namespace) -> int:
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+){0,2}", a.sweep_id):
        raise UserError(f"sweep id '{a.sweep_id}' is not ENTITY/PROJECT/ID (as `wandb sweep` prints it)")
    text = template("agents.sbatch")
    check_time(a.time, warning_seconds(text))
    logs = Path(a.logs).resolve()
    options = [
        f"--array=0-{a.agents - 1}" + (f"%{a.max_parallel}" if a.max_parallel else ""),
        f"--time={a.time}",
        f"--output={filename_pattern(logs)}/slurm-%A_%a.out",
        *resources(a, 1),
    ]  # an agent runs one run at a time
    if a.partition:
        options.append(f"--partition={a.partition}")
    options += a.extra_sbatch or []
    script = render(text, options, {"DIA_PYTHON": os.environ.get("DIA_PYTHON", sys.executable)})
    return _sbatch(
        script,
        [a.sweep_id, str(a.count)],
        logs,
        "agents",
        a.dry_run,
        after=lambda: logs.mkdir(parents=True, exist_ok=True),
    )


def cancel(a: argparse.Namespace) -> int:
    """`scancel` the job: its tasks get SIGTERM, save their progress and end without requeueing (see grid.sbatch)."""
    if not re.fullmatch(r"\d+(_\d+)?", a.job):
        raise UserError(f"job id '{a.job}' is not JOBID or JOBID_TASK (as `dia.slurm submit` and squeue print it)")
    if shutil.which("scancel") is None:
        raise UserError("scancel not found: run this on a SLURM login node")
    done = subprocess.run(["scancel", a.job], capture_output=True, text=True)
    if done.returncode != 0:
        print(
            "error: scancel refused: "
            f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}",
            file=sys.stderr,
        )
        return ExitCode.FAILED
    print(
        f"[dia.slurm] cancelled job {a.job}: running cells save their progress and are not requeued; "
        "`dia.slurm submit ... --only-unfinished` resumes them",
        file=sys.stderr,
    )
    return ExitCode.OK


SBATCH_OPTION = re.compile(r"--?[A-Za-z][A-Za-z-]*(=\S.*)?")
RENAMED = {"--cpus-per-cell": "--cpus-per-program", "--mem-per-cell": "--mem-per-program"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dia.slurm", description="Submit dia grids and W&B agents as SLURM arrays."
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--partition", "-p", default=None, help="SLURM partition (default: the cluster's default)")
        s.add_argument("--time", "-t", required=True, help="time limit per task, e.g. 12:00:00 or 30 (minutes)")
        s.add_argument(
            "--gpus-per-task",
            type=int,
            default=1,
            help="GPUs per array task (sbatch --gres=gpu:G); a task runs one packed program per GPU (0: CPU only, "
            "one program, no --gres); default 1",
        )
        s.add_argument(
            "--cpus-per-program",
            type=int,
            default=4,
            help="CPU cores for each program of a task (one per GPU, or one on a CPU-only task), however many "
            "cells are packed into it: sbatch --cpus-per-task is this times the programs; default 4",
        )
        s.add_argument(
            "--mem-per-program",
            default="32G",
            help="host memory for each program of a task (as --cpus-per-program): sbatch --mem is this times "
            "the programs; default 32G",
        )
        for old in RENAMED:
            s.add_argument(old, dest=f"renamed_{old[2:].replace('-', '_')}", help=argparse.SUPPRESS)
        s.add_argument(
            "--max-parallel",
            type=int,
            default=16,
            metavar="N",
            help="at most N array tasks at once (sbatch --array=...%%N); default 16, 0: no limit",
        )
        s.add_argument(
            "--extra-sbatch",
            action="append",
            metavar="OPT",
            help="another sbatch option, e.g. --extra-sbatch=--account=abc (repeatable)",
        )
        s.add_argument(
            "--dry-run", action="store_true", help="print the rendered script and the sbatch command; submit nothing"
        )

    s = sub.add_parser(
        "submit",
        help="the grid of a sweep file (or folder) as an array job (slurm/grid.sbatch); key=value arguments after "
        "SWEEP override every cell, as for dia.grid",
    )
    s.add_argument("sweep")
    common(s)
    s.add_argument(
        "--cells-per-task",
        type=int,
        default=1,
        metavar="G",
        help="cells per array task, packed into one program per GPU of the task (e.g. 18: one (data, model) "
        "block of the paper grid, every rate and attack); default 1",
    )
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
    for old, new in RENAMED.items():
        if getattr(a, f"renamed_{old[2:].replace('-', '_')}", None) is not None:
            raise UserError(
                f"{old} is now {new}: resources are per packed program (one per GPU of a task), not per cell"
            )
    for name in ("gpus_per_task", "cpus_per_program", "max_parallel", "cells_per_task", "agents", "count"):
        v = getattr(a, name, None)
        zero_ok = name in ("gpus_per_task", "max_parallel")
        if v is not None and not ((0 if zero_ok else 1) <= v <= 10**6):
            raise UserError(
                f"--{name.replace('_', '-')}={v}: must be a {'non-negative' if zero_ok else 'positive'} integer"
            )
    if not re.fullmatch(r"[0-9:-]{1,16}|UNLIMITED|INFINITE", a.time):
        raise UserError(f"--time {a.time!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    if a.partition is not None and not re.fullmatch(r"[A-Za-z0-9_.,-]{1,128}", a.partition):
        raise UserError(
            f"--partition {a.partition!r}: a partition name (letters, digits, '_', '.', '-', or a comma-separated list)"
        )
    for opt in a.extra_sbatch or []:
        if any(ord(c) < 32 or ord(c) == 127 for c in opt) or not SBATCH_OPTION.fullmatch(opt) or re.search(r"\s-", opt):
            raise UserError(
                f"--extra-sbatch {opt!r}: one sbatch option such as --account=lab (no newlines; repeat "
                "--extra-sbatch for another option)"
            )
        if opt.split("=", 1)[0] in ("--hold", "-H", "--output", "-o", "--array", "-a", "--wrap"):
            raise UserError(f"--extra-sbatch {opt!r}: dia.slurm sets {opt.split('=', 1)[0]} itself")
    seconds(a.time)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"{message}; see `python -m dia.slurm --help`"))  # type: ignore[method-assign]
    try:
        a, rest = parser.parse_known_args(argv)
        # `submit SWEEP key=value ...`: overrides for every cell, forwarded to dia.grid in every array task
        a.overrides = [r for r in rest if "=" in r and not r.startswith("-")] if a.command == "submit" else []
        unknown = [r for r in rest if r not in a.overrides]
        if unknown:
            raise UserError(f"unrecognized arguments: {' '.join(unknown)}; see `python -m dia.slurm --help`")
        if a.command == "cancel":
            return cancel(a)
        _check(a)
        return submit(a) if a.command == "submit" else agents(a)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).splitlines())}", file=sys.stderr)  # one line, whatever the input held
        return ExitCode.BAD_INPUT
