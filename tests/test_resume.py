"""A run stopped by a signal saves its attack state; rerunning it resumes and ends exactly as an unbroken run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = [
    "attack=dia",
    "model.dropout=0.5",
    "num_victims=2",
    "attack.parallel=1",
    "attack.max_iterations=150",
    "run.checkpoint_every=20",
    "attack.compile=false",
    "logger.wandb.mode=disabled",
    "run.progress=false",
    "run.name=cell",
]


def _train(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dia.train", *ARGS, f"run.output_dir={out}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("extra", [[], ["attack.restarts=2"]], ids=["one-start", "restarts"])
def test_signal_checkpoints_and_rerun_resumes_bit_for_bit(tmp_path, extra):
    straight = _train(tmp_path / "straight", *extra)
    stopped = _train(tmp_path / "broken", *extra)
    ckpt = tmp_path / "broken" / ".cell.partial" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and stopped.poll() is None:
        time.sleep(0.1)
    assert ckpt.exists(), stopped.communicate()
    stopped.send_signal(signal.SIGUSR1)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 75, err
    assert "preempted" in err and "rerun the same command to resume" in err
    assert not (tmp_path / "broken" / "cell").exists()  # nothing looks finished

    resumed = _train(tmp_path / "broken", *extra)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming" in err
    straight.communicate(timeout=300)
    a, b = (json.loads((tmp_path / d / "cell" / "metrics.json").read_text()) for d in ("straight", "broken"))
    assert [v["mse"] for v in a["victims"]] == [v["mse"] for v in b["victims"]]
    assert [v["iterations"] for v in a["victims"]] == [v["iterations"] for v in b["victims"]]
    assert not (tmp_path / "broken" / "cell" / "checkpoint.pt").exists()


def test_a_finished_run_is_never_overwritten(tmp_path):
    first = _train(tmp_path, "attack.max_iterations=5")
    first.communicate(timeout=120)
    metrics = (tmp_path / "cell" / "metrics.json").read_bytes()
    again = _train(tmp_path, "attack.max_iterations=5")  # the same command: its result stands, said at once
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "already done" in out, err
    other = _train(tmp_path, "attack.max_iterations=6")  # another config under the name
    _, err = other.communicate(timeout=120)
    assert other.returncode == 2 and "already exists, a finished run of another config" in err
    assert (tmp_path / "cell" / "metrics.json").read_bytes() == metrics
