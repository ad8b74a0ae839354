"""Shared helpers: tiny, seeded problems on the embedded data (CPU only)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
# dia's machine-wide memory (LPIPS tried once per machine: dia.metrics.lpips_marker) is the session's own
os.environ["DIA_CACHE_DIR"] = tempfile.mkdtemp(prefix="dia-test-cache-")
atexit.register(shutil.rmtree, os.environ["DIA_CACHE_DIR"], True)
torch.set_num_threads(2)

from dia.api import simulate  # noqa: E402


def setup_problems(args: list[str], victims: list[int]):
    """(cfg, model, problems, victims, mean, std) for a config given as command-line overrides."""
    sim = simulate("attack.compile=false", *args, f"victims={victims}")
    return sim.cfg, sim.model, sim.problems, sim.victims, sim.mean, sim.std


@pytest.fixture
def problems_factory():
    return setup_problems


@pytest.fixture(autouse=True)
def _own_compile_book(tmp_path, monkeypatch):
    """Each test starts with an empty compile cost book (dia.attacks.compiling): attack.compile=auto decides the
    same way whatever ran before it (a shared book made one test's compile another's path)."""
    monkeypatch.setenv("DIA_COMPILE_BOOK_DIR", str(tmp_path / "compile-book"))


@pytest.fixture(autouse=True)
def _signals_restored():
    """In-process commands install their signal handlers (and Lightning may ignore SIGINT), and a test may leave a
    stop request set: put pytest's handlers back and clear the request, so no test sees another's signal."""
    import signal

    from dia.run.signals import STOP

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    STOP.clear()
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    STOP.clear()
