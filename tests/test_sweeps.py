"""Sweep files: every file in sweeps/ is a valid W&B sweep whose cells all run; lazy grids; stable, shared cell ids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from sweeps import schema_violations_from_proposed_config

from dia import grid as G
from dia.grid import sweep as S
from dia.config import compose

ROOT = Path(__file__).resolve().parent.parent
SWEEP_FILES = sorted((ROOT / "sweeps").rglob("*.yaml"))
GRIDS = sorted({p.parent if p.parent != ROOT / "sweeps" else p for p in SWEEP_FILES})  # a folder is one grid


def test_there_are_sweep_files():
    names = {p.relative_to(ROOT / "sweeps").as_posix() for p in SWEEP_FILES}
    assert {"smoke.yaml", "paper-lite.yaml", "paper/mnist-cifar10.yaml", "paper/imagenet.yaml"} <= names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.relative_to(ROOT / "sweeps").as_posix())
def test_every_sweep_file_passes_wandb_validation(path):
    """The check `wandb sweep --controller` runs (the `sweeps` package's schema)."""
    spec = yaml.safe_load(path.read_text())
    assert schema_violations_from_proposed_config(spec) == []
    assert spec["method"] == "grid" and spec["command"][:5] == S.WANDB_COMMAND


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.relative_to(ROOT / "sweeps").as_posix())
def test_every_cell_an_agent_can_get_runs(path):
    """Every cell of every grid composes and passes dia.run.checks (victims in range, labels, batches)."""
    grid = G.load(path)
    assert G.validate(grid) == len(grid.cells) > 0


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.relative_to(ROOT / "sweeps").as_posix())
def test_an_agent_run_gets_the_grid_cell_id_as_its_name(path):
    """What a W&B agent runs (the file's command with `key=value` formatted as W&B does) lands in the cell's folder."""
    grid = G.load(path)
    for cell in grid.cells[:: max(1, len(grid.cells) // 7)]:
        block = next(b for b in grid.blocks if all(cell.overrides.get(k) in v for k, v in b.params.items()))
        command = block.spec["command"]
        agent_args = [f"{k}={v}" for k, v in cell.overrides.items()] + command[5:]  # W&B: f"{param}={value}"
        cfg = compose(agent_args)
        assert cfg.run.name == cell.id
        out = [a.split("=", 1)[1] for a in command[5:] if a.startswith("run.output_dir=")]
        assert out == [f"results/{grid.name}"]  # the default --results-root of dia.grid


def test_paper_lite_is_the_brief():
    grid = G.load(ROOT / "sweeps" / "paper-lite.yaml")
    cells = [c.overrides for c in grid.cells]
    assert len(cells) == 2 * 3 * 6 * 3
    assert {(c["data"], c["model"]) for c in cells} == {(d, m) for d in ("mnist", "cifar10") for m in ("mlp", "vit", "cnn")}
    assert {c["model.dropout"] for c in cells} == {0.0, 0.1, 0.25, 0.5, 0.75, 0.9}
    assert {c["attack"] for c in cells} == {"ig", "wiig", "dia"}
    assert {(c["num_victims"], c["attack.max_iterations"]) for c in cells} == {(16, 3000)}


def _write(path: Path, params: dict, name: str | None = None) -> Path:
    spec = {"method": "grid", "parameters": params, "command": S.WANDB_COMMAND}
    if name:
        spec["name"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_huge_grid_is_counted_and_indexed_without_expanding_it(tmp_path, capsys):
    params = {f"attack.{k}": {"values": list(range(1, 21))} for k in ("lr_patience", "check_every", "log_every",
                                                                       "iterations_per_step", "early_stop_patience", "max_iterations")}
    path = _write(tmp_path / "huge.yaml", params)
    started = time.time()
    assert G.main([str(path), "--count"]) == 0
    assert capsys.readouterr().out.strip() == str(20**6)
    grid = G.load(path)
    last = grid.cells[-1]
    assert last.index == 20**6 - 1 and all(v == 20 for v in last.overrides.values())
    assert grid.cell(20 * 20 + 3).overrides["attack.max_iterations"] == 4  # mixed radix: the last key varies fastest
    assert G.main([str(path), "--show", str(20**6 - 1), "--results-root", str(tmp_path / "r")]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == last.id
    assert time.time() - started < 5


def test_a_folder_is_one_grid_the_union_of_its_files(tmp_path):
    a = _write(tmp_path / "g" / "a.yaml", {"data": {"value": "mnist"}, "attack": {"values": ["ig", "dia"]}})
    _write(tmp_path / "g" / "b.yaml", {"data": {"value": "cifar10"}, "attack": {"value": "dia"}, "model": {"value": "cnn"}})
    grid = G.load(tmp_path / "g")
    assert grid.name == "g" and len(grid.cells) == 3
    assert [c.overrides for c in grid.cells] == [{"data": "mnist", "attack": "ig"}, {"data": "mnist", "attack": "dia"},
                                                 {"data": "cifar10", "attack": "dia", "model": "cnn"}]
    assert [c.id for c in G.load(a).cells] == [c.id for c in grid.cells[:2]]  # ids do not depend on the rest of the grid


def test_a_grown_grid_is_accepted_in_its_results_folder_a_changed_one_is_not(tmp_path, capsys):
    res = str(tmp_path / "res")
    path = _write(tmp_path / "s" / "t.yaml", {"model.dropout": {"values": [0.25, 0.5]}, "attack": {"value": "ig"}}, name="t")
    assert G.main([str(path), "--validate", "--results-root", res]) == 0
    old = [c.id for c in G.load(path).cells]
    _write(path, {"model.dropout": {"values": [0.25, 0.5, 0.75]}, "attack": {"value": "ig"}}, name="t")  # a rate added
    assert [c.id for c in G.load(path).cells][:2] == old
    assert G.main([str(path), "--validate", "--results-root", res]) == 0
    saved = json.loads((tmp_path / "res" / "t" / "grid.json").read_text())
    assert len(saved["cells"]) == 3
    capsys.readouterr()
    _write(path, {"model.dropout": {"values": [0.25, 0.75]}, "attack": {"value": "ig"}}, name="t")  # a cell dropped
    assert G.main([str(path), "--validate", "--results-root", res]) == 2
    err = capsys.readouterr().err
    assert "holds another grid" in err and err.count("\n") == 1


def test_cell_id_sees_values_as_dia_train_parses_them():
    base = {"data": "mnist", "model.dropout": 0.0, "victims": [0, 1], "attack.compile": False}
    as_text = {"data": "mnist", "model.dropout": "0", "victims": "[0, 1]", "attack.compile": "False"}  # W&B's str()
    assert S.cell_id(base) == S.cell_id(as_text) == S.cell_id({**base, "logger.wandb.mode": "online", "run.output_dir": "x"})
    assert S.cell_id(base) != S.cell_id({**base, "model.dropout": 0.1})
    assert S.cell_id(base).startswith("mnist-p0-v0-1-")


def test_the_old_dia_section_is_refused_with_a_pointer(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"attack": {"value": "ig"}}, "dia": {"blocks": []}}))
    assert G.main([str(path), "--count"]) == 2
    err = capsys.readouterr().err
    assert "one folder" in err and err.count("\n") == 1


def test_the_same_cell_in_two_files_is_refused(tmp_path, capsys):
    _write(tmp_path / "g" / "a.yaml", {"attack": {"values": ["ig", "dia"]}})
    _write(tmp_path / "g" / "b.yaml", {"attack": {"value": "dia"}, "logger.wandb.mode": {"value": "disabled"}})  # logging: same cell
    assert G.main([str(tmp_path / "g"), "--validate", "--results-root", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert "cells 1 and 2 are the same cell" in err and err.count("\n") == 1
