"""Packs: runs of several attacks and dropout rates attacked as one program equal the same runs alone."""

from __future__ import annotations

import json

import pytest

from dia.config import compose
from dia.run import execute
from dia.run.pack import pack_key_of

BASE = ["model=mlp", "model.width=64", "model.depth=2", "data=mnist", "num_victims=2", "attack.max_iterations=40",
        "attack.compile=false", "attack.check_every=10", "run.progress=false", "logger.wandb.mode=disabled",
        "metrics.lpips=off", "run.checkpoint_every=-1"]
CELLS = [(attack, p) for attack in ("ig", "wiig", "dia") for p in (0.0, 0.5)]


def _configs(out, **extra):
    return [compose(BASE + [f"attack={a}", f"model.dropout={p}", f"run.output_dir={out}", f"run.name={a}-{p:g}"]
                    + [f"{k}={v}" for k, v in extra.items()]) for a, p in CELLS]


def _victims(out, name):
    return json.loads((out / name / "metrics.json").read_text())["victims"]


def test_a_run_inside_a_pack_equals_the_run_alone(tmp_path):
    notes: list[str] = []
    packed = execute(_configs(tmp_path / "packed"), progress=False, note=notes.append)
    assert [o.code for o in packed] == [0] * len(CELLS)
    assert [n for n in notes if n.startswith("pack ")] == ["pack 1/1: 6 runs: IGx4 WIIGx4 DIAx4"]  # one program
    for cfg in _configs(tmp_path / "alone"):
        assert execute([cfg], progress=False)[0].code == 0
    for a, p in CELLS:
        name = f"{a}-{p:g}"
        together, alone = _victims(tmp_path / "packed", name), _victims(tmp_path / "alone", name)
        for t, s in zip(together, alone):
            assert t["iterations"] == s["iterations"] and t["status"] == s["status"], name
            assert t["loss"] == pytest.approx(s["loss"], rel=1e-3, abs=1e-6), name
            assert t["ssim"] == pytest.approx(s["ssim"], abs=1e-3), name
            if a == "dia" and p > 0:
                assert t["mask_bal_acc"] == pytest.approx(s["mask_bal_acc"], abs=1e-3)


def test_what_may_differ_inside_a_pack():
    same = [pack_key_of(c) for c in _configs("x")]
    assert len(set(same)) == 1  # attack, rate, victims, names
    other = compose(BASE + ["attack=dia", "attack.lr=0.05"])
    assert pack_key_of(other) not in same  # a different schedule cannot share the program
