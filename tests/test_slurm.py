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
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"), DIA_PYTHON=sys.executable)
    up = subprocess.run(["bash", str(CLUSTER), "start", str(state), "--gpus", "2"], capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        pytest.fail(f"could not bring up the one-node SLURM cluster (slurm/local-cluster.sh, needs root and the Debian "
                    f"packages slurmctld slurmd slurm-client munge): {up.stderr.strip()[-800:]}", pytrace=False)
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, text=True, timeout=120)


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


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
                    subprocess.run(["scontrol", "update", f"JobId={t['JobId']}", "StartTime=now"], capture_output=True, env=env)
        time.sleep(0.5)
    raise AssertionError(f"job {job} has not ended after {timeout} s: {[(t.get('JobId'), t.get('JobState')) for t in tasks]}")


SMALL = ["--cpus-per-cell", "1", "--mem-per-cell", "1G"]  # the test cluster has 2 CPUs (the defaults: 4 and 32G per cell)


def _sbatch(env: dict, cwd: Path, *args: str) -> str:
    """sbatch the script directly (its #SBATCH lines, with 1 CPU and 1G: the command line beats #SBATCH)."""
    done = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--mem=1G", *args], capture_output=True, text=True, env=env, cwd=cwd)
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
    spec["parameters"].update({"attack": {"value": "dia"}, "model.dropout": {"value": 0.5}, "attack.max_iterations": {"value": 60}})
    preempt = tmp_path / "preempt.yaml"
    preempt.write_text(yaml.safe_dump(spec, sort_keys=False))
    pcell = G.load(preempt).cells[0]

    # the same cells locally, meanwhile (the reference for identical results)
    local = subprocess.Popen(f"{sys.executable} -m dia.grid {SMOKE} --run-all --results-root {tmp_path / 'local'} && "
                             f"{sys.executable} -m dia.grid {preempt} --run-all --results-root {tmp_path / 'local'}",
                             shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # 1. submit through dia.slurm: array sized from the grid, one fake GPU per task
    sub = subprocess.run([sys.executable, "-m", "dia.slurm", "submit", str(SMOKE), "--partition", "debug", "--time", "10",
                          *SMALL, "--results-root", str(res)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    assert "4 cells, 4 array tasks" in sub.stderr
    _wait(env, job)
    assert {t["JobState"] for t in _tasks(env, job)} == {"COMPLETED"}
    logs = res / "smoke" / "logs"
    for cell in grid.cells:
        m = _metrics(res / "smoke" / cell.id)
        assert m["status"] == "completed" and m["attack"] == cell.overrides["attack"] and m["dropout"] == cell.overrides["model.dropout"]
    text = "".join(p.read_text() for p in sorted(logs.glob("slurm-*.out")))
    assert text.count("dia.grid exited with code 0") == 4, text[-3000:]
    assert "CUDA_VISIBLE_DEVICES=0" in text or "CUDA_VISIBLE_DEVICES=1" in text  # Slurm gave each task a (fake) GPU

    # 2. resubmitting skips the finished cells (here as 2 tasks of 2 cells, the multi-GPU layout)
    stamps = {c.id: (res / "smoke" / c.id / "metrics.json").stat().st_mtime_ns for c in grid.cells}
    again = subprocess.run([sys.executable, "-m", "dia.slurm", "submit", str(SMOKE), "--partition", "debug", "--time", "10",
                            "--cells-per-task", "2", *SMALL, "--results-root", str(res)], capture_output=True, text=True, env=env, cwd=tmp_path)
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
    assert "restart 1" in log and "resuming " in log and " at iteration " in log and log.rstrip().endswith("exited with code 0"), log
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
    spec["parameters"].update({"attack": {"value": "dia"}, "model.dropout": {"value": 0.5}, "attack.max_iterations": {"value": 100000},
                               "attack.early_stop_patience": {"value": 100000}, "attack.loss_threshold": {"value": 0.0}})
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


def test_grid_sbatch_outside_slurm_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(GRID_SBATCH), str(SMOKE)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "SLURM array job" in done.stderr


def test_submit_dry_run_renders_the_array(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dia.slurm", "submit", str(SMOKE), "--partition", "gpu", "--time", "1:00:00",
                           "--max-parallel", "2", "--gpus-per-task", "1", "--cells-per-task", "2", "--dry-run",
                           "--extra-sbatch=--account=lab", "--results-root", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    script = done.stdout
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00", "#SBATCH --gres=gpu:1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64G", "#SBATCH --account=lab", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue", "export DIA_CELLS_PER_TASK=2", f"export DIA_PYTHON={sys.executable}"):
        assert line in script, line
    assert script.count("#SBATCH --gres") == 1 and script.count("#SBATCH --cpus-per-task") == 1 and "scontrol requeue" in script
    assert not (tmp_path / "smoke").exists()  # a dry run writes nothing
    default = subprocess.run([sys.executable, "-m", "dia.slurm", "submit", str(SMOKE), "--time", "10", "--dry-run",
                              "--cpus-per-cell", "2", "--mem-per-cell", "8000M", "--results-root", str(tmp_path)],
                             capture_output=True, text=True)
    for line in ("#SBATCH --array=0-3%16", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=8000M"):  # a default throttle
        assert line in default.stdout, line


def test_only_unfinished_submits_the_unfinished_cells(tmp_path, capsys):
    from dia import slurm

    grid = G.load(SMOKE)
    folder = G.prepare(grid, tmp_path)
    for cell in (grid.cells[0], grid.cells[2]):  # two finished cells
        (folder / cell.id).mkdir()
        (folder / cell.id / "metrics.json").write_text("{}")
    base = ["submit", str(SMOKE), "--time", "10", "--dry-run", "--results-root", str(tmp_path), "--only-unfinished"]
    assert slurm.main(base) == 0
    assert "#SBATCH --array=1,3%16" in capsys.readouterr().out
    assert slurm.main(base + ["--cells-per-task", "2", "--max-parallel", "0"]) == 0
    assert "#SBATCH --array=0-1\n" in capsys.readouterr().out  # tasks holding an unfinished cell: both, no throttle
    for cell in (grid.cells[1], grid.cells[3]):
        (folder / cell.id).mkdir()
        (folder / cell.id / "metrics.json").write_text("{}")
    assert slurm.main(base) == 0
    out = capsys.readouterr()
    assert out.out == "" and "nothing to submit" in out.err
    assert slurm.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_agents_use_an_explicit_python_and_python_m_wandb(tmp_path, capsys):
    from dia import slurm

    assert slurm.main(["agents", "me/dia/abc123", "--time", "60", "--agents", "4", "--dry-run", "--logs", str(tmp_path)]) == 0
    script = capsys.readouterr().out
    assert f"export DIA_PYTHON={sys.executable}" in script and '"$python" -m wandb agent' in script
    assert "#SBATCH --array=0-3%16" in script and "#SBATCH --mem=32G" in script
