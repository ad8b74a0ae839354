"""Sweep files: every file in sweeps/ is a valid W&B sweep whose cells all run; lazy grids; stable, shared cell ids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from dia import grid as G
from dia.config import compose
from dia.grid import sweep as S
from sweeps import schema_violations_from_proposed_config

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
    assert {(c["data"], c["model"]) for c in cells} == {
        (d, m) for d in ("mnist", "cifar10") for m in ("mlp", "vit", "cnn")
    }
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
    params = {
        f"attack.{k}": {"values": list(range(1, 21))}
        for k in (
            "lr_patience",
            "check_every",
            "log_every",
            "iterations_per_step",
            "early_stop_patience",
            "max_iterations",
        )
    }
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
    _write(
        tmp_path / "g" / "b.yaml", {"data": {"value": "cifar10"}, "attack": {"value": "dia"}, "model": {"value": "cnn"}}
    )
    grid = G.load(tmp_path / "g")
    assert grid.name == "g" and len(grid.cells) == 3
    assert [c.overrides for c in grid.cells] == [
        {"data": "mnist", "attack": "ig"},
        {"data": "mnist", "attack": "dia"},
        {"data": "cifar10", "attack": "dia", "model": "cnn"},
    ]
    assert [c.id for c in G.load(a).cells] == [
        c.id for c in grid.cells[:2]
    ]  # ids do not depend on the rest of the grid


def test_a_grown_grid_is_accepted_in_its_results_folder_a_changed_one_is_not(tmp_path, capsys):
    res = str(tmp_path / "res")
    path = _write(
        tmp_path / "s" / "t.yaml", {"model.dropout": {"values": [0.25, 0.5]}, "attack": {"value": "ig"}}, name="t"
    )
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
    assert (
        S.cell_id(base)
        == S.cell_id(as_text)
        == S.cell_id({**base, "logger.wandb.mode": "online", "run.output_dir": "x"})
    )
    assert S.cell_id(base) != S.cell_id({**base, "model.dropout": 0.1})
    assert S.cell_id(base).startswith("mnist-p0-v0-1-")


def test_the_old_dia_section_is_refused_with_a_pointer(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text(
        yaml.safe_dump({"method": "grid", "parameters": {"attack": {"value": "ig"}}, "dia": {"blocks": []}})
    )
    assert G.main([str(path), "--count"]) == 2
    err = capsys.readouterr().err
    assert "one folder" in err and err.count("\n") == 1


def test_the_same_cell_in_two_files_is_refused(tmp_path, capsys):
    _write(tmp_path / "g" / "a.yaml", {"attack": {"values": ["ig", "dia"]}})
    _write(
        tmp_path / "g" / "b.yaml", {"attack": {"value": "dia"}, "logger.wandb.mode": {"value": "disabled"}}
    )  # logging: same cell
    assert G.main([str(tmp_path / "g"), "--validate", "--results-root", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert "cells 1 and 2 are the same cell" in err and err.count("\n") == 1


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.relative_to(ROOT / "sweeps").as_posix())
def test_cell_indices_are_wandbs_grid_order(path):
    """Cell i of a file is the i-th run W&B's grid search (the `sweeps` package the W&B server runs) proposes."""
    from sweeps.grid_search import grid_search_next_runs

    grid = G.load(path)
    runs = grid_search_next_runs([], yaml.safe_load(path.read_text()), n=len(grid) + 1)
    assert runs[-1] is None  # W&B's grid has exactly as many runs
    assert [{k: v["value"] for k, v in r.config.items()} for r in runs[:-1]] == [c.overrides for c in grid.cells]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.relative_to(ROOT / "sweeps").as_posix())
def test_dia_grid_on_one_file_writes_where_its_agents_do(path):
    """sweeps/defenses/* and sweeps/paper/imagenet.yaml: agents wrote results/<folder>, dia.grid results/<name:>."""
    spec = yaml.safe_load(path.read_text())
    agents = next(a.split("=", 1)[1] for a in spec["command"] if str(a).startswith("run.output_dir="))
    assert f"results/{G.load(path).name}" == agents
    if path.parent != ROOT / "sweeps":
        assert G.load(path.parent).name == G.load(path).name  # the folder's grid: the same results folder


def test_the_files_of_a_folder_run_one_by_one_share_its_results_folder(tmp_path, capsys):
    """Each file of a grid folder may be run alone into the folder's results (as docs/defenses.md does); a file that
    lost recorded cells, or a file of another grid, is still refused."""
    command = S.WANDB_COMMAND + ["run.name=auto-cell", "run.output_dir=results/g"]
    spec = {"method": "grid", "command": command}
    a, b = tmp_path / "g" / "a.yaml", tmp_path / "g" / "b.yaml"
    a.parent.mkdir()
    a.write_text(yaml.safe_dump(spec | {"parameters": {"attack": {"values": ["ig", "dia"]}}}))
    b.write_text(yaml.safe_dump(spec | {"parameters": {"attack": {"value": "wiig"}}}))
    res = str(tmp_path / "res")
    for path in (a, b, tmp_path / "g", a):
        assert G.main([str(path), "--validate", "--results-root", res]) == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "res" / "g" / "grid.json").read_text())
    assert sorted((c["file"], c["overrides"]["attack"]) for c in saved["cells"]) == [
        ("a.yaml", "dia"),
        ("a.yaml", "ig"),
        ("b.yaml", "wiig"),
    ]
    a.write_text(yaml.safe_dump(spec | {"parameters": {"attack": {"value": "ig"}}}))  # a.yaml lost its dia cell
    capsys.readouterr()
    assert G.main([str(a), "--validate", "--results-root", res]) == 2
    assert "holds another grid" in capsys.readouterr().err
    elsewhere = tmp_path / "other" / "b.yaml"  # same folder name in results, but its b.yaml has other cells
    elsewhere.parent.mkdir()
    elsewhere.write_text(yaml.safe_dump(spec | {"parameters": {"attack": {"value": "dia"}, "model": {"value": "cnn"}}}))
    assert G.main([str(elsewhere), "--validate", "--results-root", res]) == 2


def test_a_command_and_a_folder_that_disagree_are_refused(tmp_path, capsys):
    command = S.WANDB_COMMAND + ["run.output_dir=results/elsewhere"]
    _write(tmp_path / "g" / "a.yaml", {"attack": {"value": "ig"}})
    path = tmp_path / "g" / "b.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "command": command, "parameters": {"attack": {"value": "dia"}}}))
    assert G.main([str(tmp_path / "g"), "--count"]) == 2
    err = capsys.readouterr().err
    assert "run.output_dir=results/elsewhere" in err and "results/g" in err and err.count("\n") == 1


def test_tags_fit_wandb():
    cell = S.Cell(
        0, "x", {"data.root": "/a/very/long/path/" + "d" * 80}, {"data.root": "/a/very/long/path/" + "d" * 80}
    )
    tags = cell.tags("g")
    assert all(1 <= len(t) <= 64 for t in tags) and tags[1].startswith("data.root:/a/very/long/path/")
    assert len(set(S.Cell(0, "x", {}, {"k": "v" * 70 + str(i)}).tags("g")[1] for i in range(5))) == 5  # still distinct
