"""Packs: runs of several attacks and dropout rates attacked as one program equal the same runs alone."""

from __future__ import annotations

import json

import pytest
import torch

from dia.config import compose
from dia.run import execute
from dia.run.pack import pack_key_of

BASE = [
    "model=mlp",
    "model.width=64",
    "model.depth=2",
    "data=mnist",
    "num_victims=2",
    "attack.max_iterations=40",
    "attack.compile=false",
    "attack.check_every=10",
    "run.progress=false",
    "logger.wandb.mode=disabled",
    "metrics.lpips=off",
    "run.checkpoint_every=-1",
]
CELLS = [(attack, p) for attack in ("ig", "wiig", "dia") for p in (0.0, 0.5)]


def _configs(out, **extra):
    return [
        compose(
            BASE
            + [f"attack={a}", f"model.dropout={p}", f"run.output_dir={out}", f"run.name={a}-{p:g}"]
            + [f"{k}={v}" for k, v in extra.items()]
        )
        for a, p in CELLS
    ]


def _victims(out, name):
    return json.loads((out / name / "metrics.json").read_text())["victims"]


def _assert_same_runs(together_root, alone_root) -> int:
    """Every run's victims equal in both roots (up to float reassociation); returns how many stopped early."""
    early = 0
    for a, p in CELLS:
        name = f"{a}-{p:g}"
        for t, s in zip(_victims(together_root, name), _victims(alone_root, name)):
            assert t["iterations"] == s["iterations"] and t["status"] == s["status"], name
            assert t["loss"] == pytest.approx(s["loss"], rel=1e-3, abs=1e-6), name
            assert t["ssim"] == pytest.approx(s["ssim"], abs=1e-3), name
            if a == "dia" and p > 0:
                assert t["mask_bal_acc"] == pytest.approx(s["mask_bal_acc"], abs=1e-3)
            early += s["iterations"] < 40  # BASE's budget
    return early


def test_a_run_inside_a_pack_equals_the_run_alone(tmp_path):
    notes: list[str] = []
    packed = execute(_configs(tmp_path / "packed"), progress=False, note=notes.append)
    assert [o.code for o in packed] == [0] * len(CELLS)
    assert [n for n in notes if n.startswith("program:")] == ["program: 6 runs: IGx4 WIIGx4 DIAx4"]  # one program
    for cfg in _configs(tmp_path / "alone"):
        assert execute([cfg], progress=False)[0].code == 0
    _assert_same_runs(tmp_path / "packed", tmp_path / "alone")


def test_what_may_differ_inside_a_pack():
    same = [pack_key_of(c) for c in _configs("x")]
    assert len(set(same)) == 1  # attack, rate, victims, names
    other = compose(BASE + ["attack=dia", "attack.lr=0.05"])
    assert pack_key_of(other) not in same  # a different schedule cannot share the program


def _refill_configs(out, **extra):
    # 6 runs x 2 problems in 4 rows: two runs start, the others wait and take the rows of stopped ones
    # (with a loss threshold some problems converge early, so rows free up while others go on).
    return [
        compose(
            BASE
            + [f"attack={a}", f"model.dropout={p}", f"run.output_dir={out}", f"run.name={a}-{p:g}", "attack.parallel=4"]
            + [f"{k}={v}" for k, v in extra.items()]
        )
        for a, p in CELLS
    ]


def test_waiting_runs_take_the_rows_of_stopped_ones_and_equal_the_runs_alone(tmp_path):
    notes: list[str] = []
    packed = execute(
        _refill_configs(tmp_path / "refill", **{"attack.loss_threshold": 0.005}), progress=False, note=notes.append
    )
    assert [o.code for o in packed] == [0] * len(CELLS)
    assert [n for n in notes if n.startswith("program:")] == [
        "program: 2 runs: IGx4; 8 problems waiting"
    ]  # one program
    for cfg in _configs(tmp_path / "alone", **{"attack.loss_threshold": 0.005}):
        assert execute([cfg], progress=False)[0].code == 0
    assert _assert_same_runs(tmp_path / "refill", tmp_path / "alone") > 0  # some problems stop before the budget


def test_without_refill_waiting_runs_wait_for_the_next_program(tmp_path):
    notes: list[str] = []
    out = execute(_refill_configs(tmp_path, **{"attack.refill": "false"}), progress=False, note=notes.append)
    assert [o.code for o in out] == [0] * len(CELLS)
    assert len([n for n in notes if n.startswith("program:")]) == 3


def test_a_refilled_program_stopped_and_resumed_equals_one_never_stopped(tmp_path, monkeypatch):
    from dia.run import pack as packs
    from dia.run.signals import STOP, Preempted

    extra = {"run.checkpoint_every": 10, "attack.loss_threshold": 0.005}
    whole = execute(_refill_configs(tmp_path / "whole", **extra), progress=False)
    assert [o.code for o in whole] == [0] * len(CELLS)
    fill = packs.Turnover.fill

    def fill_then_stop(self):  # a signal lands right after waiting runs entered (rows at different iterations)
        before = len(self.inside)
        fill(self)
        if len(self.inside) > before and self.module.done > 20:
            STOP.set(Preempted, 15)

    monkeypatch.setattr(packs.Turnover, "fill", fill_then_stop)
    try:
        with pytest.raises(Exception, match="stopped on a signal"):
            execute(_refill_configs(tmp_path / "stopped", **extra), progress=False)
    finally:
        STOP.clear()
    monkeypatch.setattr(packs.Turnover, "fill", fill)
    unfinished = [
        c for c in _refill_configs(tmp_path / "stopped", **extra) if not (tmp_path / "stopped" / c.run.name).exists()
    ]
    assert 0 < len(unfinished) < len(CELLS)  # stopped with some runs written, some running, some waiting
    resumed = execute(unfinished, progress=False)
    assert [o.code for o in resumed] == [0] * len(unfinished)
    for a, p in CELLS:
        name = f"{a}-{p:g}"
        for t, s in zip(_victims(tmp_path / "stopped", name), _victims(tmp_path / "whole", name)):
            assert t["iterations"] == s["iterations"] and t["status"] == s["status"], name
            assert t["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-7), name


def test_a_program_takes_only_problems_that_fit_its_sites_and_roles(problems_factory):
    from dia.attacks import ATTACKS, Part, Program

    cfg, model, problems, _, mean, std = problems_factory(["attack=dia", "model.dropout=0.5"], [0, 1])
    ig, dia, wiig = (ATTACKS.get(a) for a in ("ig", "dia", "wiig"))

    def part(cls):
        return Part(cls(cfg=cfg.attack), cls.view(problems))

    box = dict(lower=(0 - mean) / std, upper=(1 - mean) / std)
    only_ig = Program(model, [part(ig)], **box)
    assert only_ig.fits(part(ig)) and not only_ig.fits(part(dia)) and not only_ig.fits(part(wiig))  # no mask rows
    expecting = Program(model, [part(ig)], expect=[part(dia)], **box)
    assert expecting.fits(part(dia)) and expecting.fits(part(ig)) and not expecting.fits(part(wiig))
    only_dia = Program(model, [part(dia)], **box)
    assert not only_dia.fits(part(ig))  # every row trains every site: an IG row would get trained masks
    only_dia.on_fit_start()
    with pytest.raises(ValueError, match="do not fit"):
        only_dia.admit(part(ig), torch.tensor([0, 1]))


def test_a_failing_program_fails_only_the_runs_it_was_working_on(tmp_path, monkeypatch):
    from dia.attacks import Program as InvertingGradients  # the program admits rows (dia.attacks.program)

    admit, failed = InvertingGradients.admit, []

    def admit_fails_once(self, part, rows, resume=None):  # e.g. out of memory while a waiting run enters
        if not failed:
            failed.append(1)
            raise RuntimeError("boom")
        return admit(self, part, rows, resume)

    monkeypatch.setattr(InvertingGradients, "admit", admit_fails_once)
    cfgs = _refill_configs(tmp_path, **{"attack.loss_threshold": 0.005, "run.checkpoint_every": 10})
    out = execute(cfgs, progress=False, keep_going=True)
    codes = {o.name: int(o.code) for o in out}
    assert sorted(codes.values()) == [0] * (len(CELLS) - 1) + [1], codes  # the run that was entering; the rest went on
    for o in out:
        if o.code == 1:
            assert o.message == "RuntimeError: boom" and (tmp_path / f".{o.name}.partial").is_dir()  # kept, resumable
        else:
            assert (tmp_path / o.name / "metrics.json").exists()
    again = execute([c for c in cfgs if codes[c.run.name] == 1], progress=False)  # the rerun finishes it
    assert {int(o.code) for o in again} == {0}
