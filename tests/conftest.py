"""Shared helpers: tiny, seeded problems on the embedded data (CPU only)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

from dia.api import simulate  # noqa: E402


def setup_problems(args: list[str], victims: list[int]):
    """(cfg, model, problems, victims, mean, std) for a config given as command-line overrides."""
    sim = simulate("attack.compile=false", *args, f"victims={victims}")
    return sim.cfg, sim.model, sim.problems, sim.victims, sim.mean, sim.std


@pytest.fixture
def problems_factory():
    return setup_problems
