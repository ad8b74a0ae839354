"""The smoke grid on a real one-node SLURM cluster (slurm/local-cluster.sh, Debian's slurmctld/slurmd/munge).

Never skipped: without the Slurm packages (and no way to install them) the test fails and says why.
The cluster advertises 2 fake GPUs, so slurm/grid.sbatch runs with its `#SBATCH --gres=gpu:1` unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dia import grid as G

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "sweeps" / "smoke.yaml"
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
GRID_SBATCH = ROOT / "slurm" / "grid.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm-state")
    # PYTHONPATH: jobs run in other folders and must import this checkout's dia (not another installed one)
    env = dict(
        os.environ,
        SLURM_CONF=str(state / "slurm.conf"),
        DIA_PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    up = subprocess.run(
        ["bash", str(CLUSTER), "start", str(state), "--gpus", "2"], capture_output=True, text=True, timeout=600
    )
    if up.returncode != 0:
        pytest.fail(
            f"could not bring up the one-node SLURM cluster (slurm/local-cluster.sh, needs root and the Debian "
            f"packages slurmctld slurmd slurm-client munge): {up.stderr.strip()[-800:]}",
            pytrace=False,
        )
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, text=True, timeout=120)


TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _tasks(env: dict, job: str) -> list[dict[str, str]]:
    """JobState and Restarts of each task of `job` (`scontrol show job`, no accounting database needed)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env).stdout
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]


def _wait(env: dict, job: str, timeout: float = 600, restarts: int = 0) -> None:
    """Until every task of `job` has ended (after at least `restarts` requeues); a requeued task is released at once."""
    deadline = time.time() + timeout
    tasks: list[dict[str, str]] = []
    pending_since: dict[str, float] = {}
    while time.time() < deadline:
        tasks = _tasks(env, job)
        if tasks and all(t.get("JobState") in TERMINAL and int(t.get("Restarts", 0)) >= restarts for t in tasks):
            return
        for t in tasks:  # Slurm holds a requeued job back ~2 minutes (BeginTime): not in a test
            if t.get("JobState") == "PENDING" and int(t.get("Restarts", 0)) > 0:
                # but not at once: slurmd refuses to launch a job whose previous run it is still cleaning up
                # ("Job credential revoked"), and the task would end FAILED
                if time.time() - pending_since.setdefault(t["JobId"], time.time()) > 5:
                    subprocess.run(
                        ["scontrol", "update", f"JobId={t['JobId']}", "StartTime=now"], capture_output=True, env=env
                    )
        time.sleep(0.5)
    raise AssertionError(
        f"job {job} has not ended after {timeout} s: {[(t.get('JobId'), t.get('JobState')) for t in tasks]}"
    )


SMALL = ["--cpus-per-program", "1", "--mem-per-program", "1G"]  # the test cluster has 2 CPUs (the defaults: 4 and 32G)


def _sbatch(env: dict, cwd: Path, *args: str) -> str:
    """sbatch the script directly (its #SBATCH lines, with 1 CPU and 1G: the command line beats #SBATCH)."""
    done = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=1", "--mem=1G", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _wait_for_file(path: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path.name} did not appear"
        time.sleep(0.2)


def _same(a: dict, b: dict) -> None:
    """The same run: equal up to float reassociation (a cell alone in a task vs packed with others locally)."""
    exact, close = ("iterations", "status"), ("mse", "psnr", "ssim", "mask_bal_acc", "loss")
    assert [{k: v[k] for k in exact} for v in a["victims"]] == [{k: v[k] for k in exact} for v in b["victims"]]
    for u, v in zip(a["victims"], b["victims"]):
        for k in close:
            assert (u[k] is None and v[k] is None) or u[k] == pytest.approx(v[k], rel=1e-4, abs=1e-6), (k, u[k], v[k])


def test_grid_array_runs_skips_finished_cells_and_requeues_a_preempted_task(cluster, tmp_path):
    env = cluster
    res = tmp_path / "slurm-results"
    grid = G.load(SMOKE)
    # the preemption case: one longer cell, checkpointing every 5 iterations
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = "preempt"
    spec.pop("command")  # (its run.output_dir=results/smoke would name the grid 'smoke')
    spec["parameters"].update(
        {"attack": {"value": "dia"}, "model.dropout": {"value": 0.5}, "attack.max_iterations": {"value": 60}}
    )
    preempt = tmp_path / "preempt.yaml"
    preempt.write_text(yaml.safe_dump(spec, sort_keys=False))
    pcell = G.load(preempt).cells[0]

    # the same cells locally, meanwhile (the reference for identical results)
    local = subprocess.Popen(
        f"{sys.executable} -m dia.grid {SMOKE} --run-all --results-root {tmp_path / 'local'} && "
        f"{sys.executable} -m dia.grid {preempt} --run-all --results-root {tmp_path / 'local'}",
        shell=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    # 1. submit through dia.slurm: array sized from the grid, one fake GPU per task
    sub = subprocess.run(
        [
            sys.executable,
            "-m",
            "dia.slurm",
            "submit",
            str(SMOKE),
            "--partition",
            "debug",
            "--time",
            "10",
            *SMALL,
            "--results-root",
            str(res),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    assert "4 cells, 4 array tasks" in sub.stderr
    _wait(env, job)
    assert {t["JobState"] for t in _tasks(env, job)} == {"COMPLETED"}
    logs = res / "smoke" / "logs"
    for cell in grid.cells:
        m = _metrics(res / "smoke" / cell.id)
        assert (
            m["status"] == "completed"
            and m["attack"] == cell.overrides["attack"]
            and m["dropout"] == cell.overrides["model.dropout"]
        )
    text = "".join(p.read_text() for p in sorted(logs.glob("slurm-*.out")))
    assert text.count("dia.grid exited with code 0") == 4, text[-3000:]
    assert "CUDA_VISIBLE_DEVICES=0" in text or "CUDA_VISIBLE_DEVICES=1" in text  # Slurm gave each task a (fake) GPU

    # 2. resubmitting skips the finished cells (here as 2 tasks of 2 cells, the multi-GPU layout)
    stamps = {c.id: (res / "smoke" / c.id / "metrics.json").stat().st_mtime_ns for c in grid.cells}
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "dia.slurm",
            "submit",
            str(SMOKE),
            "--partition",
            "debug",
            "--time",
            "10",
            "--cells-per-task",
            "2",
            *SMALL,
            "--results-root",
            str(res),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    _wait(env, again.stdout.strip())
    text = "".join(p.read_text() for p in sorted(logs.glob(f"slurm-{again.stdout.strip()}_*.out")))
    assert text.count("is finished: skipped") == 4, text
    assert stamps == {c.id: (res / "smoke" / c.id / "metrics.json").stat().st_mtime_ns for c in grid.cells}

    # 3. a task signalled mid-run (as Slurm does before the time limit) checkpoints, requeues itself and resumes
    job = _sbatch(env, tmp_path, "--array=0", str(GRID_SBATCH), str(preempt), "--results-root", str(res))
    ckpt = res / "preempt" / f".{pcell.id}.partial" / "checkpoint.pt"
    _wait_for_file(ckpt)
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"], check=True, env=env)
    _wait(env, job, restarts=1)
    assert [t["JobState"] for t in _tasks(env, job)] == ["COMPLETED"]
    log = (tmp_path / f"slurm-{job}_0.out").read_text()
    assert "got SIGUSR1" in log and "exited with code 75" in log and "requeueing job" in log, log
    assert (
        "restart 1" in log
        and "resuming " in log
        and " at iteration " in log
        and log.rstrip().endswith("exited with code 0")
    ), log
    assert not ckpt.exists()

    # 4. the local grid run gives the same results, the preempted cell included
    _, err = local.communicate(timeout=900)
    assert local.returncode == 0, err[-2000:]
    for cell in grid.cells:
        _same(_metrics(res / "smoke" / cell.id), _metrics(tmp_path / "local" / "smoke" / cell.id))
    _same(_metrics(res / "preempt" / pcell.id), _metrics(tmp_path / "local" / "preempt" / pcell.id))


def test_scancel_cancels_for_good_and_keeps_the_progress(cluster, tmp_path):
    """`dia.slurm cancel` (scancel: SIGTERM) stops a task without requeueing it."""
    env = cluster
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = "cancel"
    spec.pop("command")
    spec["parameters"].update(
        {
            "attack": {"value": "dia"},
            "model.dropout": {"value": 0.5},
            "attack.max_iterations": {"value": 100000},
            "attack.early_stop_patience": {"value": 100000},
            "attack.loss_threshold": {"value": 0.0},
        }
    )
    path = tmp_path / "cancel.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cell = G.load(path).cells[0]
    res = tmp_path / "res"
    job = _sbatch(env, tmp_path, "--array=0", str(GRID_SBATCH), str(path), "--results-root", str(res))
    ckpt = res / "cancel" / f".{cell.id}.partial" / "checkpoint.pt"
    _wait_for_file(ckpt)
    done = subprocess.run([sys.executable, "-m", "dia.slurm", "cancel", job], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    _wait(env, job)
    time.sleep(3)  # a requeue would show up as PENDING with Restarts=1 by now
    tasks = _tasks(env, job)
    assert [(t["JobState"], t.get("Restarts")) for t in tasks] == [("CANCELLED", "0")], tasks
    log = (tmp_path / f"slurm-{job}_0.out").read_text()
    assert "got SIGTERM" in log and "not requeueing" in log and "requeueing job" not in log, log
    assert not (res / "cancel" / cell.id).exists()  # not finished: a resubmission (--only-unfinished) picks it up
    assert ckpt.exists()  # and its progress is kept


def test_a_results_root_with_space_quote_and_percent_works_and_a_refused_job_writes_nothing(cluster, tmp_path):
    """The root is quoted and '%' escaped in `#SBATCH --output`; nothing is written before sbatch accepts the job;
    a request no node has is refused by dia.slurm itself (the cluster's sinfo: 2 CPUs)."""
    env = cluster
    spec = yaml.safe_load(SMOKE.read_text())
    spec["parameters"].update({"attack": {"value": "ig"}, "model.dropout": {"value": 0.25}})  # one cell
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cell = G.load(path).cells[0]
    res = tmp_path / 'res dir %j #1 "q"'
    base = [sys.executable, "-m", "dia.slurm", "submit", str(path), "--time", "10", "--results-root", str(res)]
    refused = subprocess.run(
        base + [*SMALL, "--partition", "nosuch"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert refused.returncode == 1 and "sbatch refused the job (nothing was written)" in refused.stderr, refused.stderr
    assert not res.exists()
    big = subprocess.run(
        base + ["--cpus-per-program", "3", "--mem-per-program", "1G"], capture_output=True, text=True, env=env
    )
    assert big.returncode == 2 and "fits no node of partition (default): the largest has 2 CPUs" in big.stderr, (
        big.stderr
    )
    assert big.stderr.count("\n") == 1 and not res.exists()
    sub = subprocess.run(base + SMALL, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    _wait(env, job)
    assert [t["JobState"] for t in _tasks(env, job)] == ["COMPLETED"]
    log = (res / "smoke" / "logs" / f"slurm-{job}_0.out").read_text()  # the literal folder: '%j' is not the job id
    assert "dia.grid exited with code 0" in log, log
    assert _metrics(res / "smoke" / cell.id)["status"] == "completed"
    assert len(list((res / "smoke" / "slurm").glob(f"grid-*-{job}.sbatch"))) == 1


def test_grid_sbatch_outside_slurm_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(GRID_SBATCH), str(SMOKE)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "SLURM array job" in done.stderr


def test_submit_dry_run_renders_the_array(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dia.slurm",
            "submit",
            str(SMOKE),
            "--partition",
            "gpu",
            "--time",
            "1:00:00",
            "--max-parallel",
            "2",
            "--gpus-per-task",
            "1",
            "--cells-per-task",
            "2",
            "--dry-run",
            "--extra-sbatch=--account=lab",
            "--results-root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    script = done.stdout
    for line in (
        "#SBATCH --array=0-1%2",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1:00:00",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=32G",
        "#SBATCH --account=lab",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "export DIA_CELLS_PER_TASK=2",
        f"export DIA_PYTHON={sys.executable}",
    ):
        assert line in script, line
    assert (
        script.count("#SBATCH --gres") == 1
        and script.count("#SBATCH --cpus-per-task") == 1
        and "scontrol requeue" in script
    )
    assert not (tmp_path / "smoke").exists()  # a dry run writes nothing
    default = subprocess.run(
        [
            sys.executable,
            "-m",
            "dia.slurm",
            "submit",
            str(SMOKE),
            "--time",
            "10",
            "--dry-run",
            "--cpus-per-program",
            "2",
            "--mem-per-program",
            "8000M",
            "--results-root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    for line in ("#SBATCH --array=0-3%16", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=8000M"):  # a default throttle
        assert line in default.stdout, line


def _dry(capsys, *argv: str) -> str:
    from dia import slurm

    code = slurm.main(["submit", *argv, "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.mark.parametrize(
    "argv, cpus, mem",
    [
        (
            ["sweeps/paper", "--cells-per-task", "18"],
            4,
            "32G",
        ),  # one pack of 18 cells: one program, one GPU (was 72 CPUs, 576G)
        (
            ["sweeps/paper", "--cells-per-task", "72", "--gpus-per-task", "4"],
            16,
            "128G",
        ),  # 4 programs (was 288 CPUs, 2304G)
        (
            ["sweeps/paper", "--cells-per-task", "2", "--gpus-per-task", "4"],
            8,
            "64G",
        ),  # 2 cells: 2 programs, 2 GPUs idle
        (
            ["sweeps/smoke.yaml", "--cells-per-task", "4", "--gpus-per-task", "0", "--mem-per-program", "2G"],
            4,
            "2G",
        ),  # CPU: 1
    ],
)
def test_resources_are_per_program_not_per_cell(argv, cpus, mem, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo here: nothing to check against
    monkeypatch.chdir(ROOT)
    script = _dry(capsys, *argv, "--time", "60", "--results-root", str(tmp_path))
    assert f"#SBATCH --cpus-per-task={cpus}\n" in script and f"#SBATCH --mem={mem}\n" in script, script


@pytest.mark.parametrize(
    "old, new", [("--cpus-per-cell", "--cpus-per-program"), ("--mem-per-cell", "--mem-per-program")]
)
def test_per_cell_options_are_renamed_in_one_line(old, new, capsys, tmp_path):
    from dia import slurm

    assert (
        slurm.main(["submit", str(SMOKE), "--time", "10", old, "1", "--dry-run", "--results-root", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{old} is now {new}" in err, err


SINFO = """#!/bin/sh
# sinfo -h -N -o '%N|%P|%c|%m|%G' [-p P]: a partition 'debug' of one node with 2 CPUs, 24 GB and 2 GPUs
echo 'localhost|debug*|2|24105|gpu:2'
"""


@pytest.mark.parametrize(
    "argv, fits",
    [
        ([], False),  # the defaults: 4 CPUs
        (["--cpus-per-program", "2", "--mem-per-program", "30G"], False),
        (["--cpus-per-program", "2", "--mem-per-program", "20G", "--gpus-per-task", "3"], False),
        (
            ["--cpus-per-program", "1", "--mem-per-program", "11G", "--gpus-per-task", "2", "--cells-per-task", "2"],
            True,
        ),
    ],
)
def test_a_request_no_node_has_is_one_line(argv, fits, capsys, tmp_path, monkeypatch):
    from dia import slurm

    (tmp_path / "sinfo").write_text(SINFO)
    (tmp_path / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    code = slurm.main(["submit", str(SMOKE), "--time", "10", "--dry-run", "--results-root", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    if fits:
        assert code == 0, err
    else:
        assert (
            code == 2 and err.count("\n") == 1 and "fits no node of partition (default): the largest has 2 CPUs" in err
        ), err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "limit, ok",
    [
        ("2", False),
        ("0:120", False),
        ("1:59", False),
        ("0", False),
        ("3", True),
        ("0:02:01", True),
        ("1-0", True),
        ("UNLIMITED", True),
    ],
)
def test_a_time_limit_at_or_under_the_warning_is_refused(limit, ok, capsys, tmp_path):
    """With --time 2 the USR1 (120 s before the end) came before any cell ran: no progress, requeued for nothing."""
    from dia import slurm

    for command in (["submit", str(SMOKE)], ["agents", "me/dia/abc"]):
        code = slurm.main(
            [
                *command,
                "--time",
                limit,
                "--dry-run",
                "--results-root" if command[0] == "submit" else "--logs",
                str(tmp_path),
            ]
        )
        err = capsys.readouterr().err
        assert code == (0 if ok else 2), err
        if not ok:
            assert err.count("\n") == 1 and "120 s" in err, err


def test_only_unfinished_submits_the_unfinished_cells(tmp_path, capsys):
    from dia import slurm

    grid = G.load(SMOKE)
    folder = G.prepare(grid, tmp_path)
    done = [grid.cells[0], grid.cells[2]]  # (0.25, ig) and (0.25, dia): positions 0 and 2 in task order
    for cell in done:
        (folder / cell.id).mkdir()
        (folder / cell.id / "metrics.json").write_text("{}")
    base = ["submit", str(SMOKE), "--time", "10", "--dry-run", "--results-root", str(tmp_path), "--only-unfinished"]
    assert slurm.main(base) == 0
    assert "#SBATCH --array=1,3%16" in capsys.readouterr().out
    assert slurm.main(base + ["--cells-per-task", "2", "--max-parallel", "0"]) == 0
    assert "#SBATCH --array=0-1\n" in capsys.readouterr().out  # tasks holding an unfinished cell: both, no throttle
    (folder / grid.cells[1].id).mkdir()
    (folder / grid.cells[1].id / "metrics.json").write_text("{}")
    assert slurm.main(base + ["--cells-per-task", "2"]) == 0
    assert "#SBATCH --array=1%16" in capsys.readouterr().out  # task 0 = positions 0, 1 = cells 0 and 2: both done
    (folder / grid.cells[3].id).mkdir()  # an empty folder with the cell's name is not a finished cell
    assert slurm.main(base) == 0
    assert "#SBATCH --array=3%16" in capsys.readouterr().out
    (folder / grid.cells[3].id / "metrics.json").write_text("{}")
    assert slurm.main(base) == 0
    out = capsys.readouterr()
    assert out.out == "" and "nothing to submit" in out.err
    assert slurm.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_agents_use_an_explicit_python_and_python_m_wandb(tmp_path, capsys):
    from dia import slurm

    assert (
        slurm.main(["agents", "me/dia/abc123", "--time", "60", "--agents", "4", "--dry-run", "--logs", str(tmp_path)])
        == 0
    )
    script = capsys.readouterr().out
    assert f"export DIA_PYTHON={sys.executable}" in script and '"$python" -m wandb agent' in script
    assert "#SBATCH --array=0-3%16" in script and "#SBATCH --mem=32G" in script
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


AGENT = """
# `python -m wandb agent --count N SWEEP_ID` without a W&B server: W&B's own Agent builds and starts the run of one
# cell, exactly as it does for a run the server hands out (`/usr/bin/env python -m dia.train ...`)
import sys, yaml
from wandb.wandb_agent import Agent

spec = yaml.safe_load(open(sys.argv[1]))
agent = Agent(api=None, queue=None, sweep_id="abc", count=1)
agent._sweep_command = spec["command"]
args = {k: {"value": v} for k, v in yaml.safe_load(sys.argv[2]).items()}
agent._command_run({"run_id": "r1", "program": None, "args": args})
sys.exit(agent._run_processes["r1"]._popen.wait())
"""


def test_an_agent_runs_dia_python_whatever_python_is_on_path(tmp_path):
    """agents.sbatch (outside Slurm's scheduler, with its environment) under a PATH whose first `python` has no dia."""
    bad = tmp_path / "bad-bin"
    bad.mkdir()
    for name in ("python", "python3"):
        (bad / name).write_text("#!/bin/sh\necho \"No module named 'dia'\" >&2\nexit 1\n")
        (bad / name).chmod(0o755)
    (tmp_path / "agent.py").write_text(AGENT)
    cell = G.load(SMOKE).cells[0]
    # the environment's python, but `-m wandb agent` is W&B's Agent class driven locally (see AGENT)
    dia_python = tmp_path / "dia-python"
    dia_python.write_text(
        f'#!/bin/sh\nif [ "$1 $2 $3" = "-m wandb agent" ]; then\n'
        f"  exec {sys.executable} {tmp_path / 'agent.py'} {SMOKE} '{json.dumps(cell.overrides)}'\nfi\n"
        f'exec {sys.executable} "$@"\n'
    )
    dia_python.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "tmp").mkdir()
    env = {
        "TMPDIR": str(tmp_path / "tmp"),
        "PATH": f"{bad}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SLURM_JOB_ID": "1",
        "SLURM_ARRAY_JOB_ID": "1",
        "SLURM_ARRAY_TASK_ID": "0",
        "DIA_PYTHON": str(dia_python),
        "PYTHONPATH": str(ROOT),
        "WANDB_MODE": "disabled",
        "WANDB_SILENT": "true",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "slurm" / "agents.sbatch"), "me/dia/abc", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "No module named 'dia'" not in done.stderr
    metrics = json.loads((work / "results" / "smoke" / cell.id / "metrics.json").read_text())  # the cell's folder
    assert metrics["status"] == "completed" and metrics["attack"] == cell.overrides["attack"]
    assert not list((tmp_path / "tmp").glob("dia-agent-python.*"))  # the python shim is removed on exit
    assert "agent exited with code 0" in done.stdout


def test_submit_forwards_overrides_to_every_task(tmp_path, capsys):
    """`dia.slurm submit SWEEP key=value`: validated as dia.grid does and passed to dia.grid in every array task."""
    from dia import slurm

    argv = ["submit", str(SMOKE), "attack.max_iterations=5", "--time", "10", "--gpus-per-task", "0"]
    assert slurm.main([*argv, "--dry-run", "--results-root", str(tmp_path)]) == 0
    submit_line = capsys.readouterr().out.splitlines()[-1]
    assert (
        submit_line.startswith("# submit with: sbatch") and f"{SMOKE} attack.max_iterations=5 --results" in submit_line
    )
    assert slurm.main([*argv, "model.dropout=0.3", "--dry-run", "--results-root", str(tmp_path)]) == 2
    assert "the grid varies model.dropout" in capsys.readouterr().err
    assert slurm.main(["submit", str(SMOKE), "--time", "10", "stray", "--dry-run"]) == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err
