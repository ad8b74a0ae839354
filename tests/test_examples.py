"""The examples run as a user runs them (a subprocess from the repository root) and reach their quality bar at
a CI-sized budget: your own nn.Module, and a Flower NumPyClient's update attacked on the server side."""

from __future__ import annotations

import os
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


def test_the_flower_example_without_flower_says_how_to_install_it(tmp_path):
    """Without flwr it stopped with a ModuleNotFoundError traceback: one line saying how to install it."""
    blocker = tmp_path / "flwr"  # a package that fails to import as flwr does when it is not installed
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'flwr'\", name='flwr')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "flower_client.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert (
        proc.stderr
        == 'error: this example needs Flower: pip install -e ".[flower]" in the dia checkout (or pip install flwr)\n'
    )
