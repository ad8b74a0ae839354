"""dia.report: the table (mean ± std per dataset x model x rate x attack x defense), missing cells, figures,
montages."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dia import defenses as D
from dia import grid as G
from dia import report as R
from dia.config import compose

SMOKE = Path(__file__).resolve().parent.parent / "sweeps" / "smoke.yaml"


def fake_run(
    folder: Path,
    attack: str,
    dropout: float,
    ssims: list[float],
    status: str = "completed",
    defense: dict[str, Any] | None = None,
    budget: int | None = 20,
) -> None:
    """A run folder as dia.train writes it; without `defense`, a metrics.json from before defenses existed;
    without `budget`, no config.yaml (the grid's cell, if any, says what it is)."""
    folder.mkdir(parents=True)
    if budget is not None:
        config = {
            "attack": {"name": attack, "max_iterations": budget},
            "victims": list(range(len(ssims))),
            "num_victims": len(ssims),
            "victim_seed": None,
            "model": {"dropout": dropout},
        }
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    victims = [
        {
            "index": i,
            "ssim": s,
            "psnr": 10 + 10 * s,
            "lpips": None,
            "mse": 1 - s,
            "mask_bal_acc": 0.9 if attack == "dia" else None,
            "status": "max_iterations",
        }
        for i, s in enumerate(ssims)
    ]
    (folder / "metrics.json").write_text(
        json.dumps(
            {
                "status": status,
                "attack": attack,
                "model": "mlp",
                "data": "mnist",
                "dropout": dropout,
                "victims": victims,
            }
            | ({"defense": defense} if defense else {})
        )
    )
    n = len(ssims)
    torch.save(
        {"originals": torch.rand(n, 1, 28, 28), "reconstructions": torch.rand(n, 1, 28, 28)},
        folder / "reconstructions.pt",
    )


@pytest.fixture
def results(tmp_path):
    grid = G.load(SMOKE)
    folder = tmp_path / "smoke"
    G.write_grid_json(grid, folder)
    c = grid.cells  # (0.25, ig), (0.5, ig), (0.25, dia), (0.5, dia): W&B's order
    fake_run(folder / c[0].id, "ig", 0.25, [0.2, 0.4])
    fake_run(folder / c[2].id, "dia", 0.25, [0.8, 0.9])
    fake_run(folder / c[3].id, "dia", 0.5, [0.5, 0.7], status="diverged")
    (folder / f".{c[1].id}.partial").mkdir()  # an interrupted cell
    fake_run(tmp_path / "runs" / "extra", "ig", 0.25, [0.6])  # a plain dia.train run beside the grid
    return tmp_path, grid


def test_table_has_mean_std_counts_and_lists_missing_cells(results, capsys):
    root, grid = results
    assert R.main([str(root)]) == 0
    md = (root / "report" / "table.md").read_text()
    # the grid's cell and the run beside the grid (another victim set) are not pooled
    assert "| mnist | mlp | 0.25 | ig | smoke | 0-1 | 1/1 | 2 | 0 | 0.300 ± 0.141 |" in md
    assert "| mnist | mlp | 0.25 | ig | — | 0 | 1/1 | 1 | 0 | 0.600 ± 0.000 |" in md
    assert "| mnist | mlp | 0.25 | dia | smoke | 0-1 | 1/1 | 2 | 0 | 0.850 ± 0.071 |" in md
    assert "| mnist | mlp | 0.5 | dia | smoke | 0-1 | 1/1 | 2 | 1 |" in md  # diverged runs are counted, not hidden
    assert (
        "| mnist | mlp | 0.5 | ig | smoke | 0-1 | 0/1 | 0 | 0 | — |" in md
    )  # a group with nothing finished stays in the table
    assert "## Missing cells (1)" in md and f"| smoke | {grid.cells[1].index} | {grid.cells[1].id} | partial |" in md
    rows = list(csv.DictReader((root / "report" / "table.csv").open()))
    dia = next(r for r in rows if r["attack"] == "dia" and r["dropout"] == "0.25")
    assert float(dia["ssim_mean"]) == pytest.approx(0.85) and dia["victims"] == "2" and dia["lpips_n"] == "0"
    assert float(dia["mask_bal_acc_mean"]) == pytest.approx(0.9)
    assert (dia["grid"], dia["budget"], dia["victim_set"]) == ("smoke", "20", "0-1")
    missing = list(csv.DictReader((root / "report" / "missing.csv").open()))
    assert [m["id"] for m in missing] == [grid.cells[1].id] and missing[0]["budget"] == "20"
    assert "4 runs in 5 groups, 1 missing cells" in capsys.readouterr().out
    # no defended run, one budget: no defense, ε or budget columns; grid and victims differ: shown
    assert (
        "| data | model | p | attack | grid | victim set | cells | victims |" in md
        and "defense" not in md
        and "ε" not in md
    )
    assert next(csv.reader((root / "report" / "table.csv").open()))[:10] == [
        "data",
        "model",
        "dropout",
        "attack",
        "defense",
        "epsilon",
        "grid",
        "budget",
        "victim_set",
        "cells_finished",
    ]
    assert {(r["defense"], r["epsilon"]) for r in rows} == {("none", "")}


def test_grids_and_budgets_of_one_results_folder_keep_their_own_rows(tmp_path):
    """README runs the 1,000- and 20,000-iteration MNIST grids side by side: `dia.report results/` keeps them apart."""
    for name, budget, ssims in (("paper-lite-cpu", 1000, [0.5, 0.6]), ("paper-mnist-mlp-cpu", 20000, [0.9, 1.0])):
        spec = {
            "name": name,
            "method": "grid",
            "parameters": {
                "attack": {"value": "ig"},
                "model.dropout": {"value": 0.25},
                "num_victims": {"value": 2},
                "attack.max_iterations": {"value": budget},
            },
        }
        path = tmp_path / "sweeps" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(spec))
        grid = G.load(path)
        G.write_grid_json(grid, tmp_path / "results" / name)
        fake_run(
            tmp_path / "results" / name / grid.cells[0].id, "ig", 0.25, ssims, budget=None if budget == 1000 else budget
        )
    r = R.build(tmp_path / "results", montages=False)
    assert r["groups"] == 2 and r["runs"] == 2
    md = (tmp_path / "results" / "report" / "table.md").read_text()
    assert (
        "| mnist | mlp | 0.25 | ig | paper-lite-cpu | 1000 | 1/1 | 2 | 0 | 0.550 ± 0.071 |" in md
    )  # budget from its grid cell
    assert "| mnist | mlp | 0.25 | ig | paper-mnist-mlp-cpu | 20000 | 1/1 | 2 | 0 | 0.950 ± 0.071 |" in md
    assert "victim set" not in md  # the same victims: no column
    one = R.build(
        tmp_path / "results" / "paper-lite-cpu", montages=False
    )  # one grid: the same rows, no variant columns
    assert one["groups"] == 1
    assert (
        "| data | model | p | attack | cells |"
        in (tmp_path / "results" / "paper-lite-cpu" / "report" / "table.md").read_text()
    )


def test_runs_of_one_attack_with_other_settings_keep_their_own_rows(tmp_path):
    """The unknown-rate grid runs DIA at several assumed rates and with a learned one: one row each (with the
    cells not run yet counted in theirs), never pooled; settings of how it runs (compile) make no row."""
    spec = {
        "name": "rate",
        "method": "grid",
        "parameters": {
            "attack": {"value": "dia"},
            "model.dropout": {"value": 0.5},
            "num_victims": {"value": 2},
            "attack.compile": {"value": False},
            "attack.assumed_rate": {"values": [0.1, 0.5]},
            "attack.rate": {"values": ["known", "learn"]},
        },
    }
    path = tmp_path / "rate.yaml"
    path.write_text(yaml.safe_dump(spec))
    grid = G.load(path)
    G.write_grid_json(grid, tmp_path / "results" / "rate")
    for cell, ssims in zip(grid.cells[:3], ([0.1, 0.2], [0.5, 0.6], [0.8, 0.9])):
        over = cell.overrides
        fake_run(tmp_path / "results" / "rate" / cell.id, "dia", 0.5, ssims)
        cfg_path = tmp_path / "results" / "rate" / cell.id / "config.yaml"
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["attack"] |= {"assumed_rate": over["attack.assumed_rate"], "rate": over["attack.rate"], "compile": False}
        cfg_path.write_text(yaml.safe_dump(cfg))
    r = R.build(tmp_path / "results", montages=False)
    assert r["groups"] == 4 and r["runs"] == 3
    md = (tmp_path / "results" / "report" / "table.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| mnist | mlp | 0.5 | dia")]
    assert len(rows) == 4 and sum("| 0/1 |" in line for line in rows) == 1, md  # the missing cell in its own row
    assert any("dia (assumed_rate=0.1, rate=learn)" in line for line in rows) and not any(
        "compile" in line for line in rows
    )


def _set_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))


def test_runs_at_other_weights_or_batch_sizes_never_pool(tmp_path):
    """Two default runs of run.seed 0 and 1 (other random weights: not like for like) were one row, "cells 2/2, 8
    victims"; a batch_size=2 run's row did not say B. Each gets its own row, with the weights and B as columns
    where they differ."""
    runs = tmp_path / "runs"
    for name, changes in (
        ("seed0", {}),
        ("seed1", {"run__seed": 1}),
        ("seed1b", {"run__seed": 1}),  # the same weights: pooled
        ("b2", {"batch_size": 2}),
        ("ckpt", {"run__seed": 7, "model__checkpoint": "/models/mlp.pt"}),  # weights from a file, whatever the seed
        ("ckpt2", {"run__seed": 8, "model__checkpoint": "/models/mlp.pt"}),
    ):
        fake_run(runs / name, "dia", 0.25, [0.5, 0.7])
        _set_config(runs / name, **changes)
    r = R.build(runs, montages=False)
    assert r["groups"] == 4 and r["runs"] == 6
    md = (runs / "report" / "table.md").read_text()
    assert "| data | model | p | attack | weights | B | cells | victims |" in md
    assert "| mnist | mlp | 0.25 | dia | seed 0 | 1 | 1/1 | 2 |" in md
    assert "| mnist | mlp | 0.25 | dia | seed 1 | 1 | 2/2 | 4 |" in md
    assert "| mnist | mlp | 0.25 | dia | seed 0 | 2 | 1/1 | 2 |" in md
    assert "| mnist | mlp | 0.25 | dia | checkpoint mlp.pt | 1 | 2/2 | 4 |" in md
    rows = list(csv.DictReader((runs / "report" / "table.csv").open()))
    assert sorted((row["weights"], row["batch_size"]) for row in rows) == [
        ("checkpoint mlp.pt", "1"),
        ("seed 0", "1"),
        ("seed 0", "2"),
        ("seed 1", "1"),
    ]
    one = R.build(runs / "seed1", out=tmp_path / "one", montages=False)  # one row: nothing differs, no columns
    assert one["groups"] == 1 and "weights" not in (tmp_path / "one" / "table.md").read_text()


def test_a_grid_cell_not_run_yet_has_the_weights_and_b_of_its_overrides(tmp_path):
    spec = {
        "name": "seeds",
        "method": "grid",
        "parameters": {
            "attack": {"value": "ig"},
            "num_victims": {"value": 2},
            "attack.max_iterations": {"value": 20},
            "run.seed": {"values": [0, 43]},
        },
    }
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(spec))
    grid = G.load(path)
    G.write_grid_json(grid, tmp_path / "results" / "seeds")
    fake_run(tmp_path / "results" / "seeds" / grid.cells[0].id, "ig", 0.25, [0.5, 0.6])
    R.build(tmp_path / "results", montages=False)
    md = (tmp_path / "results" / "report" / "table.md").read_text()
    assert "| mnist | mlp | 0.25 | ig | seed 0 | 1/1 |" in md and "| mnist | mlp | 0.25 | ig | seed 43 | 0/1 |" in md
    missing = list(csv.DictReader((tmp_path / "results" / "report" / "missing.csv").open()))
    assert [(m["weights"], m["batch"]) for m in missing] == [("seed 43", "1")]


def test_panels_without_lines_draw_no_empty_legend(tmp_path):
    """dia.report printed matplotlib's "No artists with labels found to put in legend" for a panel without data."""
    fake_run(tmp_path / "runs" / "dia", "dia", 0.25, [0.5, 0.7])
    fake_run(tmp_path / "runs" / "ig", "ig", 0.25, [0.2, 0.3])
    metrics = json.loads((tmp_path / "runs" / "ig" / "metrics.json").read_text())
    (tmp_path / "runs" / "ig" / "metrics.json").write_text(json.dumps(metrics | {"model": "cnn"}))  # IG: no masks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = R.build(tmp_path / "runs", montages=False)
    assert "mask_bal_acc_vs_dropout.png" in {p.name for p in r["figures"]}  # a panel (cnn) without mask lines


def test_figures_and_montages_are_pngs(results):
    root, grid = results
    r = R.build(root)
    names = {p.name for p in r["figures"]}
    assert {"ssim_vs_dropout.png", "psnr_vs_dropout.png", "mse_vs_dropout.png", "mask_bal_acc_vs_dropout.png"} <= names
    assert "lpips_vs_dropout.png" not in names  # no LPIPS values at all: no empty figure
    assert len(r["montages"]) == 4 and all(p.read_bytes()[:4] == b"\x89PNG" for p in r["figures"] + r["montages"])
    assert (root / "report" / "montages" / f"smoke__{grid.cells[2].id}.png").is_file()
    again = R.build(root, montages=False)  # the report folder itself is not read as results
    assert again["runs"] == 4


def test_empty_or_missing_dir_is_one_line(tmp_path, capsys):
    assert R.main([str(tmp_path / "nope")]) == 2
    assert R.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no dia results" in err and err.count("\n") == 2


def recorded(*overrides: str) -> dict[str, Any]:
    """The `defense` dict dia.train writes into metrics.json for these overrides (dia.run.cell)."""
    cfg = compose(list(overrides))
    return D.summary(cfg.defense, cfg.attack.model_defense)


SIGMAS = (0.1, 1.0, 10.0)


@pytest.fixture
def defended(tmp_path):
    """One grid (two sweep files): mnist/mlp/p=0.25/IG without defense and under DP-SGD at σ = 0.1, 1, 10;
    σ = 10 not run; beside it a run from before defenses (no `defense` key) of the same cell."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    base = (
        "  data: {value: mnist}\n  model: {value: mlp}\n  model.dropout: {value: 0.25}\n  attack: {value: ig}\n"
        "  victims: {value: [0, 1]}\n"
    )
    (sweep / "a_none.yaml").write_text("method: grid\nparameters:\n" + base)
    (sweep / "b_dpsgd.yaml").write_text(
        "method: grid\nparameters:\n" + base + "  defense: {value: dpsgd}\n"
        f"  defense.noise_multiplier: {{values: {list(SIGMAS)}}}\n"
    )
    grid = G.load(sweep)
    folder = tmp_path / "results" / grid.name
    G.write_grid_json(grid, folder)
    none, *dp = grid.cells
    assert [c.overrides.get("defense.noise_multiplier") for c in dp] == list(SIGMAS)
    fake_run(
        folder / none.id, "ig", 0.25, [0.8, 0.9], defense=recorded("attack=ig"), budget=None
    )  # (the grid says: 2000)
    fake_run(
        folder / dp[0].id,
        "ig",
        0.25,
        [0.5, 0.7],
        defense=recorded("attack=ig", "defense=dpsgd", "defense.noise_multiplier=0.1"),
        budget=None,
    )
    fake_run(
        folder / dp[1].id,
        "ig",
        0.25,
        [0.1, 0.2],
        defense=recorded("attack=ig", "defense=dpsgd", "defense.noise_multiplier=1.0"),
        budget=None,
    )
    fake_run(folder / "old", "ig", 0.25, [0.7, 0.8], budget=2000)  # in the grid's folder, no defense key: undefended
    return tmp_path / "results", grid


def test_defended_runs_get_their_own_rows_with_epsilon(defended):
    root, grid = defended
    r = R.build(root, montages=False)
    md = (root / "report" / "table.md").read_text()
    eps = [D.privacy(compose(["defense=dpsgd", f"defense.noise_multiplier={s}"]).defense)["epsilon"] for s in SIGMAS]
    assert eps[0] > eps[1] > eps[2] > 0
    rows = [  # the pooled mean over all 8 victims would be 0.575
        "| mnist | mlp | 0.25 | ig | none | — | 2/1 | 4 | 0 | 0.800 ± 0.082 |",
        f"| mnist | mlp | 0.25 | ig | dpsgd σ=0.1 C=1 | {eps[0]:.3g} | 1/1 | 2 | 0 | 0.600 ± 0.141 |",
        f"| mnist | mlp | 0.25 | ig | dpsgd σ=1 C=1 | {eps[1]:.3g} | 1/1 | 2 | 0 | 0.150 ± 0.071 |",
        # not run: its own row, not none's
        f"| mnist | mlp | 0.25 | ig | dpsgd σ=10 C=1 | {eps[2]:.3g} | 0/1 | 0 | 0 | — |",
    ]
    lines = md.splitlines()
    at = [next(i for i, line in enumerate(lines) if line.startswith(row)) for row in rows]
    assert at == sorted(at), md  # undefended first, then stronger noise
    assert "| data | model | p | attack | defense | ε | cells |" in md
    assert f"| {grid.cells[3].id} | pending | mnist | mlp | 0.25 | ig | dpsgd σ=10 C=1 |" in md
    table = {row["defense"]: row for row in csv.DictReader((root / "report" / "table.csv").open())}
    assert list(table) == ["none", "dpsgd σ=0.1 C=1", "dpsgd σ=1 C=1", "dpsgd σ=10 C=1"]
    assert [float(table[k]["ssim_mean"]) for k in list(table)[:3]] == pytest.approx([0.8, 0.6, 0.15])
    assert table["none"]["epsilon"] == "" and [float(t["epsilon"]) for t in list(table.values())[1:]] == pytest.approx(
        eps, rel=1e-5
    )
    assert [m["defense"] for m in csv.DictReader((root / "report" / "missing.csv").open())] == ["dpsgd σ=10 C=1"]
    assert r["runs"] == 4 and r["groups"] == 4
    assert {p.name for p in r["figures"]} >= {"ssim_vs_dropout.png", "defense_ssim_mnist_mlp.png"}


@pytest.mark.parametrize(
    "overrides, label, epsilon",
    [
        ([], "none", None),
        (["defense=dpsgd", "defense.noise_multiplier=0.5", "defense.clip=2"], "dpsgd σ=0.5 C=2", "accountant"),
        (["defense=dpsgd", "defense.noise_multiplier=0"], "dpsgd σ=0 C=1", math.inf),  # no noise: no privacy
        (["defense=dpsgd", "defense.delta=1e-6"], "dpsgd σ=1 C=1 δ=1e-06", "accountant"),
        (["defense=prune"], "prune 0.9", None),
        (["defense=prune", "attack.model_defense=true"], "prune 0.9 (md)", None),
        (["defense=quantize"], "quantize 4b", None),
        (["defense=quantize", "defense.bits=2", "defense.rounding=stochastic"], "quantize 2b stochastic", None),
        (["defense=sign"], "sign", None),
        (
            ["defense=[prune,dpsgd]", "defense.ratio=0.99", "defense.noise_multiplier=0.1"],
            "prune 0.99+dpsgd σ=0.1 C=1",
            "accountant",
        ),
    ],
)
def test_defense_label_keeps_every_setting(overrides, label, epsilon):
    d = R.describe_defense(recorded(*overrides))
    assert d.label == label
    assert d.epsilon == (D.privacy(compose(overrides).defense)["epsilon"] if epsilon == "accountant" else epsilon)


def test_default_delta_is_left_out_of_the_label():
    default = compose(["defense=dpsgd"]).defense.delta
    assert (
        "δ" not in R.describe_defense({"name": "dpsgd", "noise_multiplier": 1.0, "clip": 1.0, "delta": default}).label
    )
    assert "δ=0.001" in R.describe_defense({"name": "dpsgd", "noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-3}).label


@pytest.mark.parametrize("parts", D.compositions(), ids="+".join)
def test_every_composition_has_a_label_and_a_figure(parts, tmp_path):
    """The report reads its model of defenses from the registry: any allowed composition gets a row and a figure."""
    overrides = [f"defense=[{','.join(parts)}]"] if len(parts) > 1 else [f"defense={parts[0]}"]
    weak, strong = recorded(*overrides), recorded(*overrides)
    d = R.describe_defense(weak)
    assert d.label and all(p in d.label for p in parts if p != "none")
    stage = next((D.DEFENSES.get(p) for p in reversed(parts) if D.DEFENSES.get(p).strength), None)
    if stage is not None:
        strong[stage.strength] = (
            weak[stage.strength] / 2 if stage.stronger_when_smaller else weak[stage.strength] * 1.05
        )
        assert R.describe_defense(strong).kind == d.kind and R.describe_defense(strong).axis == stage.axis
    if parts == ["none"]:
        return
    runs = [
        {
            "data": "mnist",
            "model": "mlp",
            "dropout": 0.5,
            "attack": a,
            "defense": dd,
            "victims": [{"ssim": 0.5, "psnr": 10.0, "lpips": None}],
        }
        for a in ("ig", "dia")
        for dd in (weak, strong)
    ]
    groups = {
        i: R.Row("mnist", "mlp", 0.5, r["attack"], R.describe_defense(r["defense"]), runs=[r])
        for i, r in enumerate(runs)
    }
    paths = R.defense_figures(groups, tmp_path)
    assert paths and all(p.stat().st_size > 0 for p in paths)


def test_ssim_curves_end_at_the_runs_ssim_and_are_drawn(tmp_path):
    from dia.run import execute

    base = [
        "model=mlp",
        "model.width=64",
        "model.depth=2",
        "num_victims=2",
        "attack.max_iterations=60",
        "attack.compile=false",
        "attack.log_every=20",
        "run.checkpoint_every=20",
        "run.progress=false",
        "logger.wandb.mode=disabled",
        "metrics.lpips=off",
        f"run.output_dir={tmp_path}",
    ]
    cfgs = [compose(base + [f"attack={a}", "model.dropout=0.5", f"run.name={a}"]) for a in ("ig", "dia")]
    assert [o.code for o in execute(cfgs, progress=False)] == [0, 0]
    for name in ("ig", "dia"):
        points = [json.loads(line) for line in (tmp_path / name / "curves.jsonl").read_text().splitlines()]
        assert [p["iteration"] for p in points] == [10, 20, 40, 60]
        final = json.loads((tmp_path / name / "metrics.json").read_text())["victims"]
        # the last point is the SSIM of the returned reconstructions: the curve measures what the run reports
        assert points[-1]["eval/ssim"] == pytest.approx(sum(v["ssim"] for v in final) / len(final), abs=1e-5)
    report = R.build(tmp_path, montages=False)
    assert any(Path(f).name == "ssim_vs_iteration_mnist_mlp.png" for f in report["figures"])


@pytest.mark.parametrize("victims", [1, 2, 3])
def test_montage_titles_fit_with_few_victims(victims, tmp_path):
    """With three victims or fewer the montage was narrower than its title: the title was cut."""
    import matplotlib.pyplot as plt

    fake_run(tmp_path / "mnist-mlp-p0.25-ig-v0-1-0123abcd", "ig", 0.25, [0.5] * victims)
    run = json.loads((tmp_path / "mnist-mlp-p0.25-ig-v0-1-0123abcd" / "metrics.json").read_text())
    fig = R.montage_figure(run | {"folder": tmp_path / "mnist-mlp-p0.25-ig-v0-1-0123abcd"})
    fig.canvas.draw()
    box = fig.texts[0].get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, (box, fig.bbox)
    plt.close(fig)


def test_a_runs_own_picture_fits_its_title_with_one_victim(tmp_path, monkeypatch):
    """reconstructions.png of a one-victim run (dia.run.plotting) was narrower than its title too."""
    import matplotlib.pyplot as plt

    from dia.run import plotting

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))  # keep the figure to measure it
    plotting.reconstruction_grid(
        tmp_path / "r.png",
        torch.rand(1, 3, 8, 8),
        torch.rand(1, 3, 8, 8),
        ["#0  SSIM 0.50"],
        title="WIIG on vit_b16/imagenet, p=0.25",
    )
    fig = figures[-1]
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, (box, fig.bbox)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("batch, per_row", [(1, 8), (2, 8), (3, 6)])
def test_sixteen_victims_every_pair_labelled_and_each_clients_images_framed(batch, per_row):
    """The 16-victim picture: every pair of rows says which is the original and which the reconstruction, and with
    B > 1 the images that shared one gradient are framed and named (a row holds whole clients)."""
    from matplotlib.patches import Rectangle

    from dia.run import plotting, record

    n = 16 if batch != 3 else 9
    rows = [{"index": i, "problem": i // batch, "ssim": 0.5} for i in range(n)]
    captions = record.titles(rows)  # B as the rows say (dia.save, dia.report's montages)
    assert captions.clients == (None if batch == 1 else [i // batch for i in range(n)])
    fig = plotting.reconstruction_figure(
        torch.rand(n, 1, 8, 8), torch.rand(n, 1, 8, 8), captions, title="DIA", clients=captions.clients
    )
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]
    pairs = -(-n // per_row)
    assert texts.count("original") == pairs and texts.count("reconstruction") == pairs
    frames = [a for a in fig.artists if isinstance(a, Rectangle)]
    clients = [t for t in texts if t.startswith("client ")]
    assert len(frames) == len(clients) == (0 if batch == 1 else n // batch)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 2 * n and len({round(ax.get_position().x0, 3) for ax in shown}) == per_row
    if batch > 1:  # a client's frame holds exactly its images
        renderer = fig.canvas.get_renderer()
        for k, frame in enumerate(frames):
            box = frame.get_window_extent(renderer)
            centers = [ax.get_window_extent(renderer) for ax in shown]
            inside = [c for c in centers if box.contains((c.x0 + c.x1) / 2, (c.y0 + c.y1) / 2)]
            assert len(inside) == 2 * batch, k
