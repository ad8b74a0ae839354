"""Shared helpers: tiny, seeded problems on the embedded data (CPU only)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

from dia.config import compose  # noqa: E402
from dia.data import load_victims, normalizer  # noqa: E402
from dia.models import build_for  # noqa: E402
from dia.problems import simulate_clients  # noqa: E402


def setup_problems(args: list[str], victims: list[int]):
    """(cfg, model, problems, victims, mean, std) for a config given as command-line overrides."""
    cfg = compose(["attack.compile=false"] + args + [f"victims={victims}"])
    v = load_victims(cfg.data, indices=victims, count=len(victims), seed=None)
    model = build_for(cfg)
    mean, std = normalizer(cfg.data)
    problems = simulate_clients(model, (v.images - mean) / std, v.labels, batch_size=cfg.batch_size, seed=cfg.run.seed)
    return cfg, model, problems, v, mean, std


@pytest.fixture
def problems_factory():
    return setup_problems
