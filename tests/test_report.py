"""dia.report: the table (mean ± std per dataset x model x rate x attack), missing cells, figures, montages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from dia import grid as G
from dia import report as R

SMOKE = Path(__file__).resolve().parent.parent / "sweeps" / "smoke.yaml"


def fake_run(folder: Path, attack: str, dropout: float, ssims: list[float], status: str = "completed") -> None:
    folder.mkdir(parents=True)
    victims = [{"index": i, "ssim": s, "psnr": 10 + 10 * s, "lpips": None, "mse": 1 - s,
                "mask_bal_acc": 0.9 if attack == "dia" else None, "status": "max_iterations"} for i, s in enumerate(ssims)]
    (folder / "metrics.json").write_text(json.dumps({"status": status, "attack": attack, "model": "mlp", "data": "mnist",
                                                     "dropout": dropout, "victims": victims}))
    n = len(ssims)
    torch.save({"originals": torch.rand(n, 1, 28, 28), "reconstructions": torch.rand(n, 1, 28, 28)}, folder / "reconstructions.pt")


@pytest.fixture
def results(tmp_path):
    grid = G.load(SMOKE)
    folder = tmp_path / "smoke"
    G.write_grid_json(grid, folder)
    c = grid.cells  # (0.25, ig), (0.25, dia), (0.5, ig), (0.5, dia)
    fake_run(folder / c[0].id, "ig", 0.25, [0.2, 0.4])
    fake_run(folder / c[1].id, "dia", 0.25, [0.8, 0.9])
    fake_run(folder / c[3].id, "dia", 0.5, [0.5, 0.7], status="diverged")
    (folder / f".{c[2].id}.partial").mkdir()  # an interrupted cell
    fake_run(tmp_path / "runs" / "extra", "ig", 0.25, [0.6])  # a plain dia.train run beside the grid
    return tmp_path, grid


def test_table_has_mean_std_counts_and_lists_missing_cells(results, capsys):
    root, grid = results
    assert R.main([str(root)]) == 0
    md = (root / "report" / "table.md").read_text()
    assert "| mnist | mlp | 0.25 | ig | 2/1 | 3 | 0 | 0.400 ± 0.200 |" in md  # grid cell + extra run pooled: 0.2 0.4 0.6
    assert "| mnist | mlp | 0.25 | dia | 1/1 | 2 | 0 | 0.850 ± 0.071 |" in md
    assert "| mnist | mlp | 0.5 | dia | 1/1 | 2 | 1 |" in md  # diverged runs are counted, not hidden
    assert "| mnist | mlp | 0.5 | ig | 0/1 | 0 | 0 | — |" in md  # a group with nothing finished stays in the table
    assert "## Missing cells (1)" in md and f"| smoke | 2 | {grid.cells[2].id} | partial |" in md
    rows = list(csv.DictReader((root / "report" / "table.csv").open()))
    dia = next(r for r in rows if r["attack"] == "dia" and r["dropout"] == "0.25")
    assert float(dia["ssim_mean"]) == pytest.approx(0.85) and dia["victims"] == "2" and dia["lpips_n"] == "0"
    assert float(dia["mask_bal_acc_mean"]) == pytest.approx(0.9)
    missing = list(csv.DictReader((root / "report" / "missing.csv").open()))
    assert [m["id"] for m in missing] == [grid.cells[2].id]
    assert "4 runs in 4 groups, 1 missing cells" in capsys.readouterr().out


def test_figures_and_montages_are_pngs(results):
    root, grid = results
    r = R.build(root)
    names = {p.name for p in r["figures"]}
    assert {"ssim_vs_dropout.png", "psnr_vs_dropout.png", "mse_vs_dropout.png", "mask_bal_acc_vs_dropout.png"} <= names
    assert "lpips_vs_dropout.png" not in names  # no LPIPS values at all: no empty figure
    assert len(r["montages"]) == 4 and all(p.read_bytes()[:4] == b"\x89PNG" for p in r["figures"] + r["montages"])
    assert (root / "report" / "montages" / f"smoke__{grid.cells[1].id}.png").is_file()
    again = R.build(root, montages=False)  # the report folder itself is not read as results
    assert again["runs"] == 4


def test_empty_or_missing_dir_is_one_line(tmp_path, capsys):
    assert R.main([str(tmp_path / "nope")]) == 2
    assert R.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no dia results" in err and err.count("\n") == 2
