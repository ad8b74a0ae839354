"""Hostile input: every case is one line on stderr naming the problem, exit code 2, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from dia import bench, grid as G, report as R, slurm
from dia.run.checks import check
from dia.config import compose
from dia.errors import ExitCode, UserError
from dia.train import main as train

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "sweeps" / "smoke.yaml"
QUIET = ["logger.wandb.mode=disabled", "run.progress=false", "attack.compile=false", "attack.max_iterations=2", "num_victims=1"]


def _one_line(capsys, expected: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    return lines[0]


def _nothing_in(folder: Path) -> None:
    assert not folder.exists() or not any(folder.rglob("*")), sorted(folder.rglob("*"))


def _saved_config(tmp: Path, old: str, new: str) -> Path:
    path = tmp / "config.yaml"
    text = OmegaConf.to_yaml(compose([]))
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def _folder(tmp: Path, labels: str | None) -> Path:
    from PIL import Image

    root = tmp / "images"
    root.mkdir()
    Image.new("RGB", (40, 40)).save(root / "a.png")
    if labels is not None:
        (tmp / "labels.csv").write_text(f"a.png,{labels}\n")
    return root


CASES = {  # id -> (arguments, or a function of tmp_path giving them; the expected piece of the one line)
    "abs-name": (["run.name=/abs/path"], "run.name='/abs/path': must be a folder name"),
    "nested-name": (["run.name=a/b"], "not a path"),
    "dotdot-name": (["run.name=.."], "must not start with '.'"),
    "hidden-name": (["run.name=.x"], "must not start with '.'"),
    "control-name": (["run.name=a\tb"], "control characters"),
    "long-name": (["run.name=" + "x" * 300], "at most 128"),
    "seed-negative": (["run.seed=-1"], "run.seed=-1: must be an integer in 0..4294967295"),
    "seed-2^32": (["run.seed=4294967296"], "run.seed=4294967296"),
    "seed-20-digits": (["run.seed=12345678901234567890"], "run.seed=12345678901234567890"),
    "victim-seed": (["victim_seed=-2"], "victim_seed=-2"),
    "device": (["run.device=cuda:abc"], "run.device='cuda:abc': must be auto, cpu, mps, cuda or cuda:N"),
    "mlp-width": (["model.width=-1"], "model.width=-1: must be a positive integer"),
    "vit-patch-0": (["model=vit", "data=cifar10", "model.patch_size=0"], "model.patch_size=0"),
    "vit-patch-5": (["model=vit", "data=cifar10", "model.patch_size=5"], "does not divide data.image_size=32"),
    "vit-heads-0": (["model=vit", "data=cifar10", "model.heads=0"], "model.heads=0"),
    "iterations-20-digits": (["attack.max_iterations=12345678901234567890"], "attack.max_iterations=12345678901234567890"),
    "unparsable": (["victims=[0,1"], "victims: cannot parse value '[0,1'"),
    "interpolation-cycle": (lambda t: ["--config", str(_saved_config(t, "seed: 0", "seed: ${run.seed}"))], "Recursive interpolation"),
    "unset-env": (lambda t: ["--config", str(_saved_config(t, "device: auto", "device: ${oc.env:DIA_SURELY_UNSET}"))],
                  "cannot resolve an interpolation"),
    "cmdline-env": (["run.name=${oc.env:DIA_SURELY_UNSET}"], "cannot resolve an interpolation"),
    "label-negative": (lambda t: ["data=folder", f"data.root={_folder(t, '-3')}", f"data.labels_file={t / 'labels.csv'}"],
                       "with a label >= 0"),
    "folder-missing": (lambda t: ["data=folder", f"data.root={t / 'nope'}"], "is not a directory (it does not exist)"),
    "folder-is-file": (lambda t: ["data=folder", f"data.root={(t / 'f').write_text('x') and t / 'f'}"], "is not a directory (a file)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    args, expected = CASES[case]
    args = args(tmp_path) if callable(args) else args
    out = tmp_path / "runs"
    assert train(QUIET + args + [f"run.output_dir={out}"]) == ExitCode.BAD_INPUT
    _one_line(capsys, expected)
    _nothing_in(out)


@pytest.mark.parametrize("text", ["off", "007", "1e3", "0x10", "true", "null-ish", "~", "[a]"])
def test_run_names_keep_the_command_line_text(text):
    assert compose([f"run.name={text}"]).run.name == text
    assert compose([f"logger.wandb.project={text}"]).logger.wandb.project == text  # every string key
    assert compose(["run.name=null"]).run.name is None


def test_a_grid_cell_passes_strings_through_unchanged(tmp_path):
    """dia.grid quotes strings with spaces or YAML meaning (`"off"`); a string key gets them back without quotes."""
    from dia.grid.sweep import Cell

    for text in ("/data/my images", "off", "007", "a,b"):
        cell = Cell(0, "x", {"data": "folder", "data.root": text, "logger.wandb.project": text}, {})
        cfg = compose(cell.args())
        assert cfg.data.root == text and cfg.logger.wandb.project == text


def test_distinct_names_get_distinct_folders(tmp_path):
    for name in ("007", "7"):
        assert train(QUIET + [f"run.output_dir={tmp_path}", f"run.name={name}", "run.save_tensors=false"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["007", "7"]


@pytest.mark.parametrize("args, expected", [
    (["victims=[0,500]"], "index 500 out of range"),
    (["batch_size=3"], "do not split into client batches"),
    (["data=imagenet", "num_victims=6"], "num_victims=6 out of range"),
])
def test_checks_look_at_the_data_cheaply(args, expected):
    with pytest.raises(UserError, match=expected.replace("[", r"\[")):
        check(compose(args))
    check(compose(["data=imagenet", "num_victims=5"]))  # the 5 embedded photos


def test_checks_labels_against_num_classes(tmp_path):
    root = _folder(tmp_path, "12")
    cfg = compose(["data=folder", f"data.root={root}", f"data.labels_file={tmp_path / 'labels.csv'}", "num_victims=1",
                   "data.num_classes=10"])
    with pytest.raises(UserError, match="data.num_classes=10 but a victim has label 12"):
        check(cfg)


def test_wandb_online_without_a_login_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(UserError, match="logger.wandb.mode=online needs a W&B login"):
        check(compose(["logger.wandb.mode=online"]))
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    check(compose(["logger.wandb.mode=online"]))


def test_grid_validate_runs_the_data_checks_for_every_cell(tmp_path, capsys):
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = "g"
    spec["parameters"].update({"batch_size": {"value": 2}, "victims": {"values": [[0, 1], [0, 1, 2]]}})
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert G.main([str(path), "--validate", "--results-root", str(tmp_path / "res")]) == 2
    _one_line(capsys, "3 victims do not split into client batches")
    _nothing_in(tmp_path / "res")


@pytest.mark.parametrize("option", ["--results-root", "--wandb-sweeps"])
def test_grid_file_where_a_folder_is_needed(option, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    what = ["--wandb-sweeps", str(afile)] if option == "--wandb-sweeps" else ["--validate", "--results-root", str(afile)]
    assert G.main([str(SMOKE), *what]) == 2
    _one_line(capsys, "is a file")
    assert afile.read_text() == "x"


@pytest.mark.parametrize("argv, expected", [
    (["--ks", "a,b"], "--ks 'a,b'"),
    (["--ks", "0"], "integers >= 1"),
    (["--models", "resnet"], "choose from: mlp, vit"),
    (["--attacks", "foo"], "choose from: dia, ig, wiig"),
    (["--device", "cuda:abc"], "--device 'cuda:abc'"),
    (["--iterations", "-3"], "--iterations=-3"),
    (["--warmup", "x"], "invalid int value"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--variants", "default,fast"], "choose from: default, reduce-overhead, tf32"),
    (["--variants", "tf32+turbo"], "unknown 'turbo'"),
])
def test_bench_bad_arguments(argv, expected, capsys, tmp_path):
    assert bench.main(argv + ["--out", str(tmp_path / "b.json")]) == 2
    _one_line(capsys, expected)
    _nothing_in(tmp_path)


@pytest.mark.parametrize("argv, expected", [
    (["--partition", "gpu\necho pwned"], "--partition"),
    (["--extra-sbatch=--account=lab\necho pwned"], "--extra-sbatch"),
    (["--extra-sbatch=echo pwned"], "--extra-sbatch"),
    (["--mem-per-cell", "lots"], "--mem-per-cell 'lots'"),
    (["--time", "1:00\n"], "--time"),
])
def test_slurm_options_cannot_inject_script_lines(argv, expected, tmp_path, capsys):
    assert slurm.main(["submit", str(SMOKE), "--time", "10", "--dry-run", "--results-root", str(tmp_path), *argv]) == 2
    _one_line(capsys, expected)
    assert slurm.main(["submit", str(SMOKE), "--time", "10", "--dry-run", "--results-root", str(tmp_path / "a\nb")]) == 2
    _one_line(capsys, "control characters")
    _nothing_in(tmp_path)


# ----------------------------------------------------------------------------------------------- report

def _run(folder: Path, ssim: float = 0.5) -> None:
    folder.mkdir(parents=True)
    victims = [{"index": 0, "ssim": ssim, "psnr": 20.0, "lpips": None, "mse": 0.1, "mask_recovery": None}]
    (folder / "metrics.json").write_text(json.dumps({"status": "completed", "attack": "ig", "model": "mlp", "data": "mnist",
                                                     "dropout": 0.25, "victims": victims}))
    torch.save({"originals": torch.rand(1, 1, 28, 28), "reconstructions": torch.rand(1, 1, 28, 28)}, folder / "reconstructions.pt")


@pytest.mark.parametrize("breakage, warned", [
    ("truncated-pt", "reconstructions.pt cannot be read"),
    ("victims-not-rows", "is not a dia metrics.json"),
    ("cell-without-overrides", "cell 1 has no id, index or overrides"),
])
def test_report_skips_a_broken_cell_with_one_warning(breakage, warned, tmp_path, capsys):
    _run(tmp_path / "good")
    _run(tmp_path / "bad", ssim=0.9)
    bad = tmp_path / "bad"
    if breakage == "truncated-pt":
        data = (bad / "reconstructions.pt").read_bytes()
        (bad / "reconstructions.pt").write_bytes(data[: len(data) // 2])
    elif breakage == "victims-not-rows":
        m = json.loads((bad / "metrics.json").read_text())
        (bad / "metrics.json").write_text(json.dumps(m | {"victims": [1, 2]}))
    else:
        (tmp_path / "grid.json").write_text(json.dumps({"name": "g", "cells": [{"index": 0, "id": "good", "overrides": {}},
                                                                               {"index": 1, "id": "x"}]}))
    assert R.main([str(tmp_path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and warned in err[0], err
    assert (tmp_path / "report" / "table.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]  # no half-built report left


def test_report_out_a_file_is_one_line_and_a_rebuild_replaces_the_report(tmp_path, capsys):
    _run(tmp_path / "res" / "a")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert R.main([str(tmp_path / "res"), "--out", str(afile)]) == 2
    _one_line(capsys, "is a file")
    assert afile.read_text() == "x"
    out = tmp_path / "rep"
    assert R.main([str(tmp_path / "res"), "--out", str(out)]) == 0
    (out / "stale.txt").write_text("from an older report")
    assert R.main([str(tmp_path / "res"), "--out", str(out), "--no-montages"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["figures", "missing.csv", "table.csv", "table.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "rep", "res"]
