"""dia.grid: sweep files -> cells with stable ids, validation before running, skip/force/resume, signals, GPUs.

Running cells is tested with a stand-in for `python -m dia.train` (a small script that writes the run folder
as dia.train does), so these tests take seconds; tests/test_slurm.py runs the real thing.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from dia import grid as G

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "sweeps" / "smoke.yaml"
PAPER = ROOT / "sweeps" / "paper"  # a folder: one grid, one plain W&B sweep file per block

FAKE_TRAIN = """#!/usr/bin/env python3
# a stand-in for `python -m dia.train`: writes <output_dir>/<name>/metrics.json (via .partial), or waits for a signal
import json, os, signal, sys, time
args = dict(a.split("=", 1) for a in sys.argv[3:])
out, name = args["run.output_dir"], args["run.name"]
partial = os.path.join(out, "." + name + ".partial")
os.makedirs(partial, exist_ok=True)
resumed = os.path.exists(os.path.join(partial, "checkpoint.pt"))
if os.environ.get("FAKE_WAIT") and not resumed:
    stop = []
    signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
    open(os.path.join(partial, "checkpoint.pt"), "w").write("state")
    while not stop:
        time.sleep(0.05)
    sys.exit(75)
with open(os.path.join(partial, "metrics.json"), "w") as f:
    json.dump({"args": args, "resumed": resumed, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}, f)
if os.environ.get("FAKE_SLOW"):
    time.sleep(float(os.environ["FAKE_SLOW"]))
os.replace(partial, os.path.join(out, name))
sys.exit(int(args.get("exit", 0)) if "exit" in args else 0)
"""


@pytest.fixture
def fake_python(tmp_path):
    """An 'interpreter' whose `-m dia.train ARGS` runs FAKE_TRAIN."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    exe = tmp_path / "fake-python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def sweep(tmp_path: Path, name: str = "t", **changes) -> Path:
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = name
    for key, value in changes.items():
        if value is None:
            spec["parameters"].pop(key.replace("__", "."), None)
        else:
            spec["parameters"][key.replace("__", ".")] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_smoke_cells_are_a_stable_cartesian_product():
    grid = G.load(SMOKE)
    assert grid.name == "smoke" and len(grid.cells) == 4
    assert [(c.overrides["model.dropout"], c.overrides["attack"]) for c in grid.cells] == [(0.25, "ig"), (0.25, "dia"), (0.5, "ig"), (0.5, "dia")]
    assert [c.id for c in grid.cells] == [c.id for c in G.load(SMOKE).cells]
    assert grid.cells[1].id.startswith("mnist-mlp-p0.25-dia-v0-1-") and len(set(c.id for c in grid.cells)) == 4
    assert grid.blocks[0].spec["command"][:5] == G.WANDB_COMMAND and grid.blocks[0].spec["method"] == "grid"


def test_cell_id_depends_on_the_overrides_not_on_their_order(tmp_path):
    spec = yaml.safe_load(SMOKE.read_text())
    spec["parameters"] = dict(reversed(list(spec["parameters"].items())))
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert {c.id.rsplit("-", 1)[1] for c in G.load(path).cells} == {c.id.rsplit("-", 1)[1] for c in G.load(SMOKE).cells}
    more = sweep(tmp_path, "smoke", model__dropout={"values": [0.25, 0.5, 0.75]})
    assert {c.id for c in G.load(SMOKE).cells} < {c.id for c in G.load(more).cells}  # growing a grid keeps ids


def test_paper_grid_covers_the_paper_and_only_models_that_fit():
    grid = G.load(PAPER)
    assert grid.name == "paper" and [b.path.name for b in grid.blocks] == ["imagenet.yaml", "mnist-cifar10.yaml"]
    cells = [c.overrides for c in grid.cells]
    pairs = {(c["data"], c["model"]) for c in cells}
    assert pairs == {("mnist", "mlp"), ("mnist", "vit"), ("mnist", "cnn"), ("cifar10", "mlp"), ("cifar10", "vit"),
                     ("cifar10", "cnn"), ("imagenet", "mlp"), ("imagenet", "vit_b16")}
    assert {c["model.dropout"] for c in cells} == {0.0, 0.1, 0.25, 0.5, 0.75, 0.9}
    assert {c["attack"] for c in cells} == {"ig", "wiig", "dia"}
    assert all(c["attack.max_iterations"] == 20000 for c in cells)
    # a cell is a whole configuration: all 128 published victims (5 embedded photos for ImageNet), not shards
    assert {(c["data"], c["num_victims"]) for c in cells} == {("mnist", 128), ("cifar10", 128), ("imagenet", 5)}
    assert len(grid.cells) == 2 * 3 * 6 * 3 + 2 * 6 * 3
    one_each = {(c.overrides["data"], c.overrides["model"], c.overrides["attack"]): c for c in grid.cells}
    G.validate(grid, one_each.values())


def test_wandb_sweeps_export_is_exactly_the_grid(tmp_path):
    grid = G.load(PAPER)
    want = sorted(json.dumps(c.overrides, sort_keys=True) for c in grid.cells)
    got = []
    paths = G._write_wandb_sweeps(grid, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["paper-imagenet.yaml", "paper-mnist-cifar10.yaml"]
    for path in paths:
        s = yaml.safe_load(path.read_text())
        assert s["method"] == "grid" and s["command"][:5] == G.WANDB_COMMAND and "run.name=auto-cell" in s["command"]
        params = {k: v["values"] if "values" in v else [v["value"]] for k, v in s["parameters"].items()}
        assert params.pop("logger.wandb.mode") == ["online"] and params.pop("logger.wandb.group") == ["paper"]
        got += [json.dumps(dict(zip(params, vals)), sort_keys=True) for vals in itertools.product(*params.values())]
    assert sorted(got) == want


@pytest.mark.parametrize("changes, message", [
    ({"model__dropuot": {"value": 0.5}}, "unknown key 'model.dropuot'"),
    ({"model__dropout": {"values": [0.25, 1.5]}}, "model.dropout=1.5: must be in [0, 1)"),
    ({"attack": {"values": ["ig", "dai"]}}, "unknown attack 'dai'"),
    ({"victims": {"value": [0, 500]}}, "victims: index 500 out of range"),
    ({"run__name": {"value": "x"}}, "set by dia.grid"),
    ({"model__dropout": {"min": 0.0, "max": 0.5}}, "needs 'values' or 'value'"),
])
def test_bad_sweep_ends_with_one_line_before_running_anything(tmp_path, capsys, changes, message, fake_python):
    path = sweep(tmp_path, **changes)
    code = G.main([str(path), "--run-all", "--results-root", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "res" / "t").exists() or not any((tmp_path / "res" / "t").iterdir())


def test_index_outside_the_grid_and_foreign_results_dir_are_refused(tmp_path, capsys):
    res = str(tmp_path / "res")
    assert G.main([str(SMOKE), "--show", "4", "--results-root", res]) == 2
    assert "cell index 4 is outside the grid 'smoke' (4 cells: valid 0..3)" in capsys.readouterr().err
    assert G.main([str(SMOKE), "--run", "7", "--results-root", res]) == 2
    assert "outside the grid" in capsys.readouterr().err
    assert G.main([str(SMOKE), "--validate", "--results-root", res]) == 0
    saved = json.loads((tmp_path / "res" / "smoke" / "grid.json").read_text())
    assert saved["name"] == "smoke" and len(saved["cells"]) == 4 and saved["sha256"] == G.load(SMOKE).sha256
    capsys.readouterr()
    other = sweep(tmp_path, "smoke", attack={"value": "wiig"})
    assert G.main([str(other), "--run", "0", "--results-root", res]) == 2
    err = capsys.readouterr().err
    assert "holds another grid" in err and err.count("\n") == 1


def test_run_all_skips_finished_cells_and_force_recomputes(tmp_path, fake_python, capsys):
    grid = G.load(SMOKE)
    folder = G.prepare(grid, tmp_path)
    assert G.run_cells(grid, folder, grid.cells, python=fake_python) == 0
    first = {c.id: json.loads((folder / c.id / "metrics.json").read_text()) for c in grid.cells}
    args = first[grid.cells[3].id]["args"]
    assert args["run.name"] == grid.cells[3].id and args["run.output_dir"] == str(folder)
    assert args["logger.wandb.group"] == "smoke" and "attack:dia" in args["logger.wandb.tags"]
    assert args["model.dropout"] == "0.5" and args["victims"] == "[0, 1]"
    assert G.run_cells(grid, folder, grid.cells, python=fake_python) == 0
    assert capsys.readouterr().err.count("is finished: skipped") == 4
    assert {c.id: json.loads((folder / c.id / "metrics.json").read_text())["pid"] for c in grid.cells} == {k: v["pid"] for k, v in first.items()}
    assert G.run_cells(grid, folder, grid.cells[:1], force=True, python=fake_python) == 0
    assert json.loads((folder / grid.cells[0].id / "metrics.json").read_text())["pid"] != first[grid.cells[0].id]["pid"]
    assert G.status(grid, folder, grid.cells[1]) == "done"


def test_signal_is_forwarded_and_rerun_resumes(tmp_path, fake_python, monkeypatch, capsys):
    grid = G.load(SMOKE)
    folder = G.prepare(grid, tmp_path)
    monkeypatch.setenv("FAKE_WAIT", "1")
    cell = grid.cells[2]
    ckpt = folder / f".{cell.id}.partial" / "checkpoint.pt"

    def send() -> None:
        deadline = time.time() + 30
        while not ckpt.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=send, daemon=True).start()
    assert G.run_cells(grid, folder, [cell, grid.cells[3]], python=fake_python) == 75
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert G.status(grid, folder, cell) == "partial" and G.status(grid, folder, grid.cells[3]) == "pending"
    monkeypatch.delenv("FAKE_WAIT")
    assert G.run_cells(grid, folder, [cell, grid.cells[3]], python=fake_python) == 0
    assert "resuming cell 2" in capsys.readouterr().err
    assert json.loads((folder / cell.id / "metrics.json").read_text())["resumed"] is True


def test_parallel_cells_get_one_gpu_each(tmp_path, fake_python, monkeypatch):
    grid = G.load(SMOKE)
    folder = G.prepare(grid, tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("FAKE_SLOW", "1")
    started = time.time()
    assert G.run_cells(grid, folder, grid.cells, parallel=2, python=fake_python) == 0
    runs = [json.loads((folder / c.id / "metrics.json").read_text()) for c in grid.cells]
    assert sorted(r["cuda"] for r in runs) == ["3", "3", "5", "5"]
    assert time.time() - started < 4 * 1.0 + 3  # two at a time, not one after another


def test_task_runs_its_slice_and_exit_codes_rank(tmp_path, fake_python, monkeypatch):
    assert G.parse_indices("0,2-3", 4) == [0, 2, 3]
    with pytest.raises(G.UserError):
        G.parse_indices("1-9", 4)
    grid = G.load(sweep(tmp_path, "codes", attack={"values": ["ig", "dia"]}))
    folder = G.prepare(grid, tmp_path)
    diverged = G.Cell(99, "diverged-cell", {**grid.cells[0].overrides, "exit": 3}, {})
    assert G.run_cells(grid, folder, [grid.cells[0], diverged], python=fake_python) == 3
