"""dia.grid: sweep files -> cells with stable ids, validation before running, skip/force/resume, signals, GPUs.

Running cells is tested with a stand-in for `python -m dia.train` (a small script that writes the run folder
as dia.train does), so these tests take seconds; tests/test_slurm.py runs the real thing.
"""

from __future__ import annotations

import itertools
import json
import stat
import sys
from pathlib import Path

import pytest
import yaml

from dia import grid as G

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "sweeps" / "smoke.yaml"
PAPER = ROOT / "sweeps" / "paper"  # a folder: one grid, one plain W&B sweep file per block

FAKE_GRID = """#!/usr/bin/env python3
# a stand-in for `python -m dia.grid ...` children: records its arguments and its GPU
import json, os, sys
json.dump({"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "omp":
os.environ.get("OMP_NUM_THREADS")},
          open(os.path.join(os.environ["FAKE_OUT"], f"child-{os.getpid()}.json"), "w"))
"""


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    """An 'interpreter' whose `-m dia.grid ARGS` only records what it was asked (for --parallel)."""
    script = tmp_path / "fake_grid.py"
    script.write_text(FAKE_GRID)
    exe = tmp_path / "fake-python"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("FAKE_OUT", str(tmp_path))
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
    # W&B's grid order: parameters sorted by name ('attack' < 'model.dropout'), the first varying slowest
    assert [(c.overrides["model.dropout"], c.overrides["attack"]) for c in grid.cells] == [
        (0.25, "ig"),
        (0.5, "ig"),
        (0.25, "dia"),
        (0.5, "dia"),
    ]
    assert [c.id for c in grid.cells] == [c.id for c in G.load(SMOKE).cells]
    assert grid.cells[2].id.startswith("mnist-mlp-p0.25-dia-v0-1-") and len(set(c.id for c in grid.cells)) == 4
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
    assert pairs == {
        ("mnist", "mlp"),
        ("mnist", "vit"),
        ("mnist", "cnn"),
        ("cifar10", "mlp"),
        ("cifar10", "vit"),
        ("cifar10", "cnn"),
        ("imagenet", "mlp"),
        ("imagenet", "vit_b16"),
    }
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


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model__dropuot": {"value": 0.5}}, "unknown key 'model.dropuot'"),
        ({"model__dropout": {"values": [0.25, 1.5]}}, "model.dropout=1.5: must be in [0, 1)"),
        ({"attack": {"values": ["ig", "dai"]}}, "unknown attack 'dai'"),
        ({"victims": {"value": [0, 500]}}, "victims: index 500 out of range"),
        ({"run__name": {"value": "x"}}, "set by dia.grid"),
        ({"model__dropout": {"min": 0.0, "max": 0.5}}, "needs 'values' or 'value'"),
    ],
)
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
    assert capsys.readouterr().out == "4\n"
    saved = json.loads((tmp_path / "res" / "smoke" / "grid.json").read_text())
    assert saved["name"] == "smoke" and len(saved["cells"]) == 4 and saved["sha256"] == G.load(SMOKE).sha256
    capsys.readouterr()
    other = sweep(tmp_path, "smoke", attack={"value": "wiig"})
    assert G.main([str(other), "--run", "0", "--results-root", res]) == 2
    err = capsys.readouterr().err
    assert "holds another grid" in err and err.count("\n") == 1


def test_run_all_packs_cells_skips_finished_ones_and_force_recomputes(tmp_path, capsys):
    grid = G.load(SMOKE)
    folder = G.prepare(grid, tmp_path)
    assert G.run_cells(grid, folder, grid.cells) == 0
    err = capsys.readouterr().err
    assert "program: 4 runs: IGx4 DIAx4" in err  # the four cells, one program
    cfg = yaml.safe_load((folder / grid.cells[3].id / "config.yaml").read_text())
    assert cfg["run"]["name"] == grid.cells[3].id and cfg["run"]["output_dir"] == str(folder)
    assert cfg["logger"]["wandb"]["group"] == "smoke" and "attack:dia" in cfg["logger"]["wandb"]["tags"]
    assert cfg["model"]["dropout"] == 0.5 and cfg["victims"] == [0, 1]
    stamps = {c.id: (folder / c.id / "metrics.json").stat().st_mtime_ns for c in grid.cells}
    assert G.run_cells(grid, folder, grid.cells) == 0
    assert capsys.readouterr().err.count("is finished: skipped") == 4
    assert {c.id: (folder / c.id / "metrics.json").stat().st_mtime_ns for c in grid.cells} == stamps
    assert G.run_cells(grid, folder, grid.cells[:1], force=True) == 0
    assert (folder / grid.cells[0].id / "metrics.json").stat().st_mtime_ns != stamps[grid.cells[0].id]
    assert G.status(grid, folder, grid.cells[1]) == "done"


def test_parallel_shares_whole_packs_between_gpus(tmp_path, fake_python, monkeypatch):
    grid = G.load(sweep(tmp_path, "two", model={"values": ["mlp", "cnn"]}))  # two packs of 4 cells
    folder = G.prepare(grid, tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert G.run_cells(grid, folder, grid.cells, parallel=2, python=fake_python) == 0
    children = [json.loads(p.read_text()) for p in tmp_path.glob("child-*.json")]
    assert sorted(c["cuda"] for c in children) == ["3", "5"]
    shares = [sorted(int(i) for i in c["argv"][c["argv"].index("--run") + 1].split(",")) for c in children]
    models = [{grid.cell(i).overrides["model"] for i in share} for share in shares]
    assert sorted(i for share in shares for i in share) == list(range(8)) and all(len(m) == 1 for m in models)


@pytest.mark.parametrize(
    "cores, user_threads, expected",
    [(2, None, ["1", "1"]), (8, None, ["4", "4"]), (1, None, ["1", "1"]), (8, "3", ["3", "3"])],
)
def test_parallel_cpu_children_share_the_cores(tmp_path, fake_python, monkeypatch, cores, user_threads, expected):
    """Two CPU children each starting one torch thread per core oversubscribed the CPU (the issue: 10x slower):
    each gets its share of this process's cores, unless the user chose OMP_NUM_THREADS."""
    grid = G.load(sweep(tmp_path, "two", model={"values": ["mlp", "cnn"]}))
    folder = G.prepare(grid, tmp_path)
    monkeypatch.setattr(G.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    if user_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user_threads)
    assert G.run_cells(grid, folder, grid.cells, parallel=2, python=fake_python) == 0
    assert sorted(json.loads(p.read_text())["omp"] for p in tmp_path.glob("child-*.json")) == expected


def test_indices_and_exit_codes_rank():
    assert G.parse_indices("0,2-3", 4) == [0, 2, 3]
    with pytest.raises(G.UserError):
        G.parse_indices("1-9", 4)
    assert G.worst([0, 3, 0]) == 3 and G.worst([3, 1]) == 1 and G.worst([1, 2]) == 2 and G.worst([2, 75]) == 75
    assert G.worst([]) == 0 and G.worst([0, 130]) == 130


def test_run_progress_false_keeps_progress_bars_out_of_the_logs(tmp_path, capfd):
    """dia.grid ignored run.progress=false (the smoke grid sets it): tqdm bars filled Slurm logs."""
    grid = G.load(SMOKE)
    assert all(c.overrides["run.progress"] is False for c in grid.cells)
    assert G.main([str(SMOKE), "--run", "0", "--results-root", str(tmp_path)]) == 0
    out, err = capfd.readouterr()
    assert "it/s" not in out + err and "\r" not in out + err, (out + err)[-2000:]
    assert "program: 1 run: IGx2" in err


def test_array_tasks_hold_whole_packs(tmp_path):
    """Indices follow W&B's order (attack slowest); a task's cells follow task order: one (data, model) block each."""
    grid = G.load(PAPER)
    for t in range(grid.tasks(18)):
        cells = grid.task(t, 18)
        assert len({(c.overrides["data"], c.overrides["model"]) for c in cells}) == 1
        assert {(c.overrides["attack"], c.overrides["model.dropout"]) for c in cells} == {
            (a, p) for a in ("ig", "wiig", "dia") for p in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
        }
    assert sorted(c.index for t in range(grid.tasks(18)) for c in grid.task(t, 18)) == list(range(len(grid)))
    assert all(
        grid.task_of(i, 18) == next(t for t in range(8) if i in {c.index for c in grid.task(t, 18)})
        for i in range(0, 144, 7)
    )
    with pytest.raises(G.UserError, match="--task 8 is outside the grid"):
        grid.task(8, 18)


def test_overrides_apply_to_every_cell_with_ids_of_their_own(tmp_path, capsys):
    """`dia.grid SWEEP key=value` (as dia.train takes them): every cell gets them, and ids of its own, so a shortened
    grid runs beside the full one in the same results folder."""
    full, short = G.load(SMOKE), G.load(SMOKE, ["attack.max_iterations=3", "num_victims=1"])
    assert len(short) == len(full) and short.name == full.name and short.sha256 != full.sha256
    assert all(c.overrides["attack.max_iterations"] == 3 and c.overrides["num_victims"] == 1 for c in short.cells)
    assert not {c.id for c in short.cells} & {c.id for c in full.cells}
    assert [c.id for c in short.cells] == [short.cell(i).id for i in range(len(short))]  # lazy cells agree
    res = str(tmp_path / "res")
    assert G.main([str(SMOKE), "attack.max_iterations=3", "--list", "--results-root", res]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 4 and all("attack.max_iterations=3" in line and "pending" in line for line in listed)
    assert G.main([str(SMOKE), "--count", "attack.max_iterations=3"]) == 0 and capsys.readouterr().out == "4\n"
    # run (options and overrides in any order), then the full grid validates into the same folder
    assert G.main([str(SMOKE), "--run-all", "attack.max_iterations=3", "--results-root", res]) == 0
    for cell in G.load(SMOKE, ["attack.max_iterations=3"]).cells:
        cfg = yaml.safe_load((tmp_path / "res" / "smoke" / cell.id / "config.yaml").read_text())
        assert cfg["attack"]["max_iterations"] == 3 and cfg["run"]["name"] == cell.id
    assert G.main([str(SMOKE), "--validate", "--results-root", res]) == 0
    assert capsys.readouterr().out == "4\n"
    saved = json.loads((tmp_path / "res" / "smoke" / "grid.json").read_text())
    assert len(saved["cells"]) == 8 and {c.get("with") for c in saved["cells"]} == {None, "attack.max_iterations=3"}
    assert G.main([str(SMOKE), "attack.max_iterations=3", "--unfinished", "--results-root", res]) == 0
    assert capsys.readouterr().out.strip() == ""  # the shortened grid is done; the full one is not
    assert G.main([str(SMOKE), "--unfinished", "--results-root", res]) == 0
    assert capsys.readouterr().out.strip() == "0,1,2,3"


def test_an_array_task_takes_the_overrides_too(tmp_path):
    """slurm/grid.sbatch runs `dia.grid SWEEP --task T --per-task P "$@"`, the overrides among "$@"."""
    res = str(tmp_path / "res")
    args = ["--task", "1", "--per-task", "2", "attack.max_iterations=2", "--results-root", res]
    assert G.main([str(SMOKE), *args]) == 0
    done = [p for p in (tmp_path / "res" / "smoke").iterdir() if (p / "metrics.json").is_file()]
    assert len(done) == 2
    assert all(json.loads((p / "metrics.json").read_text())["iterations"] == 2 for p in done)
    short = {c.id for c in G.load(SMOKE, ["attack.max_iterations=2"]).task(1, 2)}
    assert {p.name for p in done} == short


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dropout=0.3", "the grid varies model.dropout"),
        ("run.output_dir=x", "set by dia.grid"),
        ("model.dropuot=0.3", "unknown key 'model.dropuot'"),
        ("novalue", "is not key=value"),
    ],
)
def test_bad_overrides_are_one_line(tmp_path, capsys, override, message):
    code = G.main([str(SMOKE), override, "--validate", "--results-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_parallel_children_get_the_overrides(tmp_path, fake_python, monkeypatch):
    grid = G.load(sweep(tmp_path, "two", model={"values": ["mlp", "cnn"]}), ["attack.max_iterations=4"])
    folder = G.prepare(grid, tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert G.run_cells(grid, folder, grid.cells, parallel=2, python=fake_python) == 0
    children = [json.loads(p.read_text())["argv"] for p in tmp_path.glob("child-*.json")]
    assert len(children) == 2 and all("attack.max_iterations=4" in argv for argv in children)


def test_the_bar_is_titled_with_the_whole_pack(tmp_path, capfd):
    """A program of fewer rows than its pack ('6 runs: IGx24' while WIIG and DIA runs wait for its rows) says the
    whole pack it will take."""
    overrides = ["run.progress=true", "attack.parallel=2", "attack.max_iterations=3"]
    assert G.main([str(SMOKE), *overrides, "--run-all", "--results-root", str(tmp_path)]) == 0
    err = capfd.readouterr().err
    assert "program: 1 run: IGx2; 6 problems waiting" in err  # the note: what starts
    assert "4 runs: IGx4 DIAx4:" in err  # the bar: what the program will take
