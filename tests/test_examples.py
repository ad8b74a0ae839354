"""The examples run as a user runs them (a subprocess from the repository root) and reach their quality bar at
a CI-sized budget: your own nn.Module, and a Flower NumPyClient's update attacked on the server side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "script, args",
    [
        ("own_model.py", ["--iterations", "400", "--victims", "2", "--min-ssim", "0.8"]),
        ("flower_client.py", ["--iterations", "300", "--clients", "2", "--min-ssim", "0.8"]),
    ],
)
def test_example_reaches_its_quality_bar(script, args, tmp_path):
    extra = ["--out", str(tmp_path / "run")] if script == "own_model.py" else []
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args, *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ok:" in proc.stdout and "Traceback" not in proc.stderr
    if extra:
        assert (tmp_path / "run" / "reconstructions.png").is_file() and (tmp_path / "run" / "metrics.json").is_file()
