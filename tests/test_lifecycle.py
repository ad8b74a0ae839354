"""Fault injection: signals, concurrent runs, corrupt checkpoints, a full disk. Each ends in a documented
state (docs/reliability.md) with nothing lost: the last good checkpoint survives everything."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["attack=dia", "model.width=32", "model.depth=2", "model.dropout=0.5", "num_victims=2", "attack.max_iterations=4000",
        "attack.loss_threshold=0", "attack.early_stop_patience=100000", "run.checkpoint_every=20",
        "attack.compile=false", "logger.wandb.mode=disabled", "run.progress=false", "metrics.lpips=off"]


def _train(out: Path, *extra: str, limit_file_size: int | None = None) -> subprocess.Popen:
    def limit() -> None:
        if limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.Popen([sys.executable, "-m", "dia.train", *ARGS, f"run.output_dir={out}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert path.exists(), proc.communicate()


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """The output dir of a run `s` stopped by SIGTERM after its first checkpoint (exit 75)."""
    out = tmp_path_factory.mktemp("stopped")
    proc = _train(out, "run.name=s")
    ckpt = out / ".s.partial" / "checkpoint.pt"
    _wait_for(ckpt, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and "preempted" in err, err
    assert ckpt.is_file() and not (out / "s").exists()
    return out


def _stopped_run(stopped: Path, out: Path) -> Path:
    """A copy of the stopped run under `out`; returns its checkpoint."""
    shutil.copytree(stopped, out)
    return out / ".s.partial" / "checkpoint.pt"


def test_ctrl_c_keeps_the_checkpoint_and_the_rerun_finishes_like_an_unbroken_run_in_one_wandb_run(tmp_path):
    short = ["run.name=r", "attack.max_iterations=200", "logger.wandb.mode=offline"]
    straight = _train(tmp_path / "straight", *short)
    proc = _train(tmp_path / "broken", *short)
    ckpt = tmp_path / "broken" / ".r.partial" / "checkpoint.pt"
    _wait_for(ckpt, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "rerun the same command to resume" in err and "Traceback" not in err
    assert ckpt.is_file() and not (tmp_path / "broken" / "r").exists()
    again = _train(tmp_path / "broken", *short)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    straight.communicate(timeout=300)
    a, b = (json.loads((tmp_path / d / "r" / "metrics.json").read_text())["victims"] for d in ("straight", "broken"))
    assert [v["mse"] for v in a] == [v["mse"] for v in b]
    from dia.run.tracking import read_offline_runs

    parts = read_offline_runs(tmp_path / "broken" / "r" / "wandb")  # one offline directory per process, as W&B resumes
    assert len({p["run"]["run_id"] for p in parts}) == 1 and [p["exit_code"] for p in parts] == [130, 0]  # one W&B run

    def steps(records):
        return [row["_step"] for r in records for row in r["history"] if "attack/loss" in row]

    straight_steps = steps(read_offline_runs(tmp_path / "straight" / "r" / "wandb"))
    assert steps(parts) == straight_steps and straight_steps[-1] == 200  # the points of the unbroken run, none twice


def test_a_second_run_of_the_same_name_is_refused_while_the_first_runs(stopped, tmp_path):
    _stopped_run(stopped, tmp_path / "o")
    first = _train(tmp_path / "o", "run.name=s")  # resumes
    partial = tmp_path / "o" / ".s.partial"
    deadline = time.time() + 120
    while (partial.parent / ".s.lock").read_text().strip() != str(first.pid) and time.time() < deadline:
        time.sleep(0.1)
    config = (partial / "config.yaml").read_text()
    second = _train(tmp_path / "o", "run.name=s", "attack.max_iterations=301")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and "being run by another process" in err and err.count("\n") == 1, err
    assert (partial / "config.yaml").read_text() == config  # untouched
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert first.returncode == 75 and (partial / "checkpoint.pt").is_file()


def test_a_different_config_under_an_unfinished_name_is_refused_not_replaced(stopped, tmp_path):
    ckpt = _stopped_run(stopped, tmp_path / "o")
    before = ckpt.read_bytes()
    other = _train(tmp_path / "o", "run.name=s", "attack.lr=0.05")
    _, err = other.communicate(timeout=120)
    assert other.returncode == 2 and "unfinished run of another config" in err, err
    assert ckpt.read_bytes() == before


def test_a_corrupt_checkpoint_is_one_line_naming_it_and_is_kept(stopped, tmp_path):
    ckpt = _stopped_run(stopped, tmp_path / "o")
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    again = _train(tmp_path / "o", "run.name=s")
    _, err = again.communicate(timeout=120)
    assert again.returncode == 2, err
    assert err.count("\n") == 1 and str(ckpt) in err and "rm" in err
    assert ckpt.is_file()


def test_a_full_disk_while_resuming_keeps_the_last_checkpoint(stopped, tmp_path):
    ckpt = _stopped_run(stopped, tmp_path / "o")
    before = ckpt.read_bytes()
    full = _train(tmp_path / "o", "run.name=s", limit_file_size=len(before) // 2)  # every checkpoint write fails
    _, err = full.communicate(timeout=300)
    assert full.returncode == 1, err
    assert "error:" in err and "checkpoint are kept" in err and "Traceback" not in err
    assert ckpt.read_bytes() == before  # the last good checkpoint, whole
    assert not list(ckpt.parent.glob(".*.tmp*"))  # no half-written leftovers


def test_an_unnamed_run_resumes_its_own_unfinished_folder(tmp_path):
    proc = _train(tmp_path, "attack.max_iterations=300")
    deadline = time.time() + 180
    while not list(tmp_path.glob(".*.partial/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    again = _train(tmp_path, "attack.max_iterations=300")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "resuming" in err, err
    assert not list(tmp_path.glob(".*.partial"))  # no orphan folder left
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1


SWEEP = """
name: faults
method: grid
command: ["${env}", "${interpreter}", "-m", "dia.train", "${args_no_hyphens}"]
parameters:
  attack: {values: [ig, dia]}
  model.width: {value: 32}
  model.depth: {value: 2}
  num_victims: {value: 2}
  attack.max_iterations: {value: 400}
  attack.loss_threshold: {value: 0}
  attack.early_stop_patience: {value: 100000}
  run.checkpoint_every: {value: 20}
  attack.compile: {value: false}
  logger.wandb.mode: {value: disabled}
  run.progress: {value: false}
"""


def test_a_terminated_grid_counts_its_cells_unfinished_and_resumes(tmp_path):
    sweep = tmp_path / "faults.yaml"
    sweep.write_text(SWEEP)
    root = tmp_path / "results"
    grid = subprocess.Popen([sys.executable, "-m", "dia.grid", str(sweep), "--run-all", "--results-root", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while len(list((root / "faults").glob(".*.partial/checkpoint.pt"))) < 2 and time.time() < deadline and grid.poll() is None:
        time.sleep(0.1)
    grid.send_signal(signal.SIGTERM)
    _, err = grid.communicate(timeout=120)
    assert grid.returncode == 75, err
    assert "2 cell(s) unfinished" in err
    assert len(list((root / "faults").glob(".*.partial/checkpoint.pt"))) == 2
    again = subprocess.run([sys.executable, "-m", "dia.grid", str(sweep), "--run-all", "--results-root", str(root)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr and len(list((root / "faults").glob("*/metrics.json"))) == 2
