"""Hostile input: every case is one line on stderr naming the problem, exit code 2, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from dia import bench, slurm
from dia import grid as G
from dia import report as R
from dia.config import compose
from dia.errors import ExitCode, UserError
from dia.run.checks import check
from dia.train import main as train

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "sweeps" / "smoke.yaml"
QUIET = [
    "logger.wandb.mode=disabled",
    "run.progress=false",
    "attack.compile=false",
    "attack.max_iterations=2",
    "num_victims=1",
]


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


def _labels(tmp: Path, raw: bytes) -> list[str]:
    root = _folder(tmp, None)
    (tmp / "labels.csv").write_bytes(raw)
    return ["data=folder", f"data.root={root}", f"data.labels_file={tmp / 'labels.csv'}"]


def _embedded(tmp: Path, kind: str) -> list[str]:
    """data.embedded pointing at something that is not an embedded victim set."""
    import numpy as np

    if kind == "folder":
        return [f"data.embedded={tmp}"]
    if kind == "npy":
        np.save(tmp / "x.npy", np.zeros((2, 28, 28, 1), dtype=np.uint8))
        return [f"data.embedded={tmp / 'x.npy'}"]
    if kind == "object":
        np.savez(tmp / "x.npz", images=np.array([object(), object()], dtype=object), labels=np.array([0, 1]))
        return [f"data.embedded={tmp / 'x.npz'}"]
    np.savez(tmp / "x.npz", images=np.zeros((2, 28, 28), dtype=np.uint8), labels=np.array([0, 1]))  # no channel axis
    return [f"data.embedded={tmp / 'x.npz'}"]


SMALL = ["model.width=16"]  # the MLP of the files below: small, so they are quick to write and read


def _model(seed: int = 0):
    from dia.models import build_for

    return build_for(compose([*QUIET, *SMALL, f"run.seed={seed}"]))


def _checkpoint(tmp: Path, kind: str) -> list[str]:
    """model.checkpoint=FILE of a state dict that cannot be weights (issue 25)."""
    state = _model().state_dict()
    key = "net.1.weight"
    bad = {
        "int": 3,
        "str": "weights",
        "meta": state[key].to("meta"),
        "nan": torch.full_like(state[key], float("nan")),
        "inf": torch.full_like(state[key], float("inf")),
        "complex": state[key].to(torch.complex64),
        "long": state[key].long(),
    }
    if kind == "key":
        state[5] = state[key]
    else:
        state[key] = bad[kind]
    torch.save(state, tmp / "ckpt.pt")
    return [*SMALL, f"model.checkpoint={tmp / 'ckpt.pt'}"]


def _client(tmp: Path, kind: str) -> list[str]:
    """captured.file=FILE of a ClientUpdate (2 images, lr 0.1) with one defect (issue 25), and its model's
    checkpoint."""
    import dia

    model = _model()
    torch.save(model.state_dict(), tmp / "ckpt.pt")
    u = dia.capture_update(model, torch.rand(2, 1, 28, 28), torch.tensor([3, 5]), lr=0.1, seed=0)
    path = u.save(tmp / "client.pt")
    flat = torch.load(path, weights_only=True)
    g, m = "gradient/net.1.weight", f"masks/{next(iter(u.masks))}"
    changes = {
        "lr-vector": {"lr": torch.tensor([0.1, 0.2])},
        "steps-vector": {"local_steps": torch.tensor([2, 3]), "local_batch": torch.tensor(0)},
        "lr-0": {"lr": torch.tensor(0.0)},
        "lr-negative": {"lr": torch.tensor(-1.0)},
        "lr-nan": {"lr": torch.tensor(float("nan"))},
        "sparse": {g: flat[g].to_sparse()},
        "meta": {g: flat[g].to("meta")},
        "zero": {k: torch.zeros_like(v) for k, v in flat.items() if k.startswith("gradient/")},
        "nan-images": {"images": torch.full_like(flat["images"], float("nan"))},
        "nan-masks": {m: torch.full_like(flat[m], float("nan"))},
        "masks-7": {m: torch.full_like(flat[m], 7.0)},
        "labels-2d": {"labels": flat["labels"].view(1, 2)},
        "key": {7: flat["labels"]},
    }
    if kind == "other-model":  # the checkpoint of another model than the one the client had
        torch.save(_model(seed=1).state_dict(), tmp / "ckpt.pt")
    flat.update(changes.get(kind, {}))
    torch.save(flat, path)
    return [*SMALL, f"model.checkpoint={tmp / 'ckpt.pt'}", f"captured.file={path}"]


def _bare_many_steps(tmp: Path) -> list[str]:
    """A bare update file of the default MLP (670k parameters) said to take 10^6 local steps: a 16 TB unroll."""
    import numpy as np

    from dia.models import build_for

    model = build_for(compose(QUIET))
    torch.save(model.state_dict(), tmp / "ckpt.pt")
    np.savez(tmp / "bare.npz", *[np.full(tuple(p.shape), 1e-3, dtype=np.float32) for p in model.parameters()])
    return [
        f"model.checkpoint={tmp / 'ckpt.pt'}",
        f"captured.file={tmp / 'bare.npz'}",
        "attack.labels=infer",
        "client.local_steps=1000000",
    ]


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
    "iterations-20-digits": (
        ["attack.max_iterations=12345678901234567890"],
        "attack.max_iterations=12345678901234567890",
    ),
    "unparsable": (["victims=[0,1"], "victims: cannot parse value '[0,1'"),
    "interpolation-cycle": (
        lambda t: ["--config", str(_saved_config(t, "seed: 0", "seed: ${run.seed}"))],
        "Recursive interpolation",
    ),
    "unset-env": (
        lambda t: ["--config", str(_saved_config(t, "device: auto", "device: ${oc.env:DIA_SURELY_UNSET}"))],
        "cannot resolve an interpolation",
    ),
    "cmdline-env": (["run.name=${oc.env:DIA_SURELY_UNSET}"], "cannot resolve an interpolation"),
    "label-negative": (
        lambda t: ["data=folder", f"data.root={_folder(t, '-3')}", f"data.labels_file={t / 'labels.csv'}"],
        "with a label >= 0",
    ),
    "folder-missing": (lambda t: ["data=folder", f"data.root={t / 'nope'}"], "is not a directory (it does not exist)"),
    "folder-is-file": (
        lambda t: ["data=folder", f"data.root={(t / 'f').write_text('x') and t / 'f'}"],
        "is not a directory (a file)",
    ),
    # issue 17: bad input that exited 1 or 3 (some leaving a .partial and a lock behind)
    "labels-not-utf8": (lambda t: _labels(t, b"a.png,\xff\xfe1\n"), "data.labels_file: "),
    "labels-odd-digits": (lambda t: _labels(t, "a.png,\u00b2\n".encode()), "is not 'file,label' with a label >= 0"),
    "labels-arabic-digits": (lambda t: _labels(t, "a.png,\u0663\n".encode()), "is not 'file,label' with a label >= 0"),
    "embedded-folder": (lambda t: _embedded(t, "folder"), "data.embedded: no embedded set"),
    "embedded-npy": (lambda t: _embedded(t, "npy"), "is not an .npz archive"),
    "embedded-object-array": (lambda t: _embedded(t, "object"), "data.embedded: cannot read"),
    "embedded-wrong-shape": (lambda t: _embedded(t, "shape"), "expected uint8 (N, H, W, 1 or 3)"),
    "mean-nan": (["data.mean=[.nan]"], "data.mean[0]=nan: must be a finite number"),
    "mean-inf": (["data.mean=[.inf]"], "data.mean[0]=inf"),
    "std-subnormal": (["data.std=[1e-40]"], "data.std[0]=1e-40: must be a finite number in [1e-06"),
    "std-inf": (["data.std=[.inf]"], "data.std[0]=inf"),
    # issue 17: W&B settings refused before the attack, not by wandb.init after it
    "wandb-project-slash": (["logger.wandb.project=a/b"], "logger.wandb.project='a/b': W&B does not allow '/'"),
    "wandb-project-hash": (["logger.wandb.project=a#b"], "W&B does not allow '#'"),
    "wandb-project-long": (["logger.wandb.project=" + "p" * 129], "logger.wandb.project: 129 characters"),
    "wandb-tags-nested": (["logger.wandb.tags=[[a,b]]"], "logger.wandb.tags: tag 0 is ['a', 'b'], not a string"),
    "wandb-tag-long": (["logger.wandb.tags=[" + "t" * 65 + "]"], "tag 0 has 65 characters; W&B takes 1 to 64"),
    "wandb-tag-empty": (["logger.wandb.tags=['']"], "tag 0 has 0 characters"),
    "wandb-group-long": (["logger.wandb.group=" + "g" * 129], "logger.wandb.group: 129 characters"),
    # issue 25: files handed in whose contents cannot be right passed the door and failed inside (exit 1, a
    # .partial and a lock left), or ran to a meaningless end (NaN weights: exit 3); each is one line at the door
    "mean-nan-word": (["data.mean=[nan]"], "data.mean[0]=nan: must be a finite number"),  # no FutureWarning first
    "checkpoint-int": (lambda t: _checkpoint(t, "int"), "ckpt.pt': 'net.1.weight' is a int, not a tensor"),
    "checkpoint-str": (lambda t: _checkpoint(t, "str"), "ckpt.pt': 'net.1.weight' is a str, not a tensor"),
    "checkpoint-meta": (lambda t: _checkpoint(t, "meta"), "'net.1.weight' is on the meta device"),
    "checkpoint-key": (lambda t: _checkpoint(t, "key"), "ckpt.pt' has the key 5 (int); a state dict maps names"),
    "checkpoint-nan": (lambda t: _checkpoint(t, "nan"), "ckpt.pt': 'net.1.weight' holds NaN or inf"),
    "checkpoint-inf": (lambda t: _checkpoint(t, "inf"), "ckpt.pt': 'net.1.weight' holds NaN or inf"),
    "checkpoint-complex": (lambda t: _checkpoint(t, "complex"), "'net.1.weight' has dtype torch.complex64"),
    "checkpoint-int-weights": (lambda t: _checkpoint(t, "long"), "'net.1.weight' has dtype torch.int64"),
    "update-lr-vector": (lambda t: _client(t, "lr-vector"), "client.pt': 'lr' holds 2 values (2,); give one number"),
    "update-steps-vector": (lambda t: _client(t, "steps-vector"), "client.pt': 'local_steps' holds 2 values"),
    "update-lr-0": (lambda t: _client(t, "lr-0"), "client.pt': 'lr'=0: must be a finite number > 0"),
    "update-lr-negative": (lambda t: _client(t, "lr-negative"), "client.pt': 'lr'=-1: must be a finite number > 0"),
    "update-lr-nan": (lambda t: _client(t, "lr-nan"), "client.pt': 'lr'=nan: must be a finite number > 0"),
    "update-sparse": (lambda t: _client(t, "sparse"), "client.pt': 'net.1.weight' is a sparse_coo tensor"),
    "update-meta": (lambda t: _client(t, "meta"), "client.pt': 'net.1.weight' is on the meta device"),
    "update-all-zero": (lambda t: _client(t, "zero"), "client.pt': every value is 0"),
    "update-nan-images": (lambda t: _client(t, "nan-images"), "client.pt': 'images' holds NaN or inf"),
    "update-nan-masks": (lambda t: _client(t, "nan-masks"), "holds NaN or inf"),
    "update-masks-7": (lambda t: _client(t, "masks-7"), "holds 7.0; a recorded keep-mask holds 0 (dropped) and 1"),
    "update-labels-2d": (lambda t: _client(t, "labels-2d"), "client.pt': 'labels' (1, 2): give the batch's B >= 1"),
    "update-key": (lambda t: _client(t, "key"), "client.pt': has the key 7 (int)"),
    "update-other-model": (lambda t: _client(t, "other-model"), "client.pt': an update from another model"),
    "update-labels-infer-2-images": (
        lambda t: [*_client(t, "none"), "attack.labels=infer"],
        "attack.labels=infer: captured.file '",
    ),
    "update-steps-contradicted": (
        lambda t: [*_client(t, "none"), "client.local_steps=3"],
        "client.local_steps=3: captured.file '",
    ),
    "bare-update-too-many-steps": (_bare_many_steps, "bare.npz': unrolling 1000000 local steps needs about"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys, recwarn):
    args, expected = CASES[case]
    args = args(tmp_path) if callable(args) else args
    out = tmp_path / "runs"
    assert train(QUIET + args + [f"run.output_dir={out}"]) == ExitCode.BAD_INPUT
    _one_line(capsys, expected)
    _nothing_in(out)
    assert not [w for w in recwarn if not issubclass(w.category, DeprecationWarning)], [str(w) for w in recwarn]


def test_a_grid_cell_with_a_bad_checkpoint_is_refused_by_validate(tmp_path, capsys):
    """The door is shared: `dia.grid --validate` reads and checks each cell's files as dia.train does."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = "g"
    spec["parameters"]["model.checkpoint"] = {"value": _checkpoint(tmp_path, "nan")[-1].split("=", 1)[1]}
    spec["parameters"]["model.width"] = {"value": 16}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert G.main([str(path), "--validate", "--results-root", str(tmp_path / "res")]) == 2
    _one_line(capsys, "'net.1.weight' holds NaN or inf")
    _nothing_in(tmp_path / "res")


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


@pytest.mark.parametrize(
    "args, expected",
    [
        (["victims=[0,500]"], "index 500 out of range"),
        (["batch_size=3"], "do not split into client batches"),
        (["data=imagenet", "num_victims=6"], "num_victims=6 out of range"),
    ],
)
def test_checks_look_at_the_data_cheaply(args, expected):
    with pytest.raises(UserError, match=expected.replace("[", r"\[")):
        check(compose(args))
    check(compose(["data=imagenet", "num_victims=5"]))  # the 5 embedded photos


def test_checks_labels_against_num_classes(tmp_path):
    root = _folder(tmp_path, "12")
    cfg = compose(
        [
            "data=folder",
            f"data.root={root}",
            f"data.labels_file={tmp_path / 'labels.csv'}",
            "num_victims=1",
            "data.num_classes=10",
        ]
    )
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
    what = (
        ["--wandb-sweeps", str(afile)] if option == "--wandb-sweeps" else ["--validate", "--results-root", str(afile)]
    )
    assert G.main([str(SMOKE), *what]) == 2
    _one_line(capsys, "is a file")
    assert afile.read_text() == "x"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--ks", "a,b"], "--ks 'a,b'"),
        (["--ks", "0"], "integers >= 1"),
        (["--models", "resnet"], "choose from: mlp, vit"),
        (["--attacks", "foo"], "choose from: analytic, dia, dlg, ig, wiig"),
        (["--device", "cuda:abc"], "--device 'cuda:abc'"),
        (["--iterations", "-3"], "--iterations=-3"),
        (["--warmup", "x"], "invalid int value"),
        (["--frobnicate"], "unrecognized arguments"),
        (["--variants", "default,fast"], "choose from: default, reduce-overhead, max-autotune, tf32, bf16"),
        (["--variants", "tf32+turbo"], "unknown 'turbo'"),
    ],
)
def test_bench_bad_arguments(argv, expected, capsys, tmp_path):
    assert bench.main(argv + ["--out", str(tmp_path / "b.json")]) == 2
    _one_line(capsys, expected)
    _nothing_in(tmp_path)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--partition", "gpu\necho pwned"], "--partition"),
        (["--extra-sbatch=--account=lab\necho pwned"], "--extra-sbatch"),
        (["--extra-sbatch=echo pwned"], "--extra-sbatch"),
        (["--extra-sbatch=--account=lab --qos=high"], "one sbatch option"),  # two options in one
        (["--extra-sbatch=--output=/elsewhere"], "dia.slurm sets --output itself"),
        (["--mem-per-program", "lots"], "--mem-per-program 'lots'"),
        (["--time", "1:00\n"], "--time"),
    ],
)
def test_slurm_options_cannot_inject_script_lines(argv, expected, tmp_path, capsys):
    assert slurm.main(["submit", str(SMOKE), "--time", "10", "--dry-run", "--results-root", str(tmp_path), *argv]) == 2
    _one_line(capsys, expected)
    assert (
        slurm.main(["submit", str(SMOKE), "--time", "10", "--dry-run", "--results-root", str(tmp_path / "a\nb")]) == 2
    )
    _one_line(capsys, "control characters")
    _nothing_in(tmp_path)


# ----------------------------------------------------------------------------------------------- report


def _run(folder: Path, ssim: float = 0.5) -> None:
    folder.mkdir(parents=True)
    victims = [{"index": 0, "ssim": ssim, "psnr": 20.0, "lpips": None, "mse": 0.1, "mask_recovery": None}]
    (folder / "metrics.json").write_text(
        json.dumps(
            {
                "status": "completed",
                "attack": "ig",
                "model": "mlp",
                "data": "mnist",
                "dropout": 0.25,
                "victims": victims,
            }
        )
    )
    torch.save(
        {"originals": torch.rand(1, 1, 28, 28), "reconstructions": torch.rand(1, 1, 28, 28)},
        folder / "reconstructions.pt",
    )


@pytest.mark.parametrize(
    "breakage, warned",
    [
        ("truncated-pt", "reconstructions.pt cannot be read"),
        ("victims-not-rows", "is not a dia metrics.json"),
        ("cell-without-overrides", "cell 1 has no id, index or overrides"),
    ],
)
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
        (tmp_path / "grid.json").write_text(
            json.dumps({"name": "g", "cells": [{"index": 0, "id": "good", "overrides": {}}, {"index": 1, "id": "x"}]})
        )
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
    assert sorted(p.name for p in out.iterdir()) == [".dia-report", "figures", "missing.csv", "table.csv", "table.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "rep", "res"]


def test_report_out_never_deletes_what_it_did_not_create(tmp_path, capsys):
    """--out DIR used to be replaced whatever it was: the results being reported, their parent, any folder."""
    res = tmp_path / "res"
    _run(res / "a")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    for out in (res, tmp_path, other):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        assert R.main([str(res), "--out", str(out)]) == 2
        _one_line(capsys, "--out")
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing deleted, nothing added
    empty = tmp_path / "empty"
    empty.mkdir()
    assert R.main([str(res), "--out", str(empty)]) == 0  # an empty folder may take the report
    assert (empty / "table.md").is_file() and (empty / ".dia-report").is_file()
    assert R.main([str(res), "--out", str(empty)]) == 0  # and a report dia made is rebuilt in place
    capsys.readouterr()


def test_report_survives_fifos_deep_nesting_bad_bytes_and_infinite_iterations(tmp_path):
    """Each would hang the report or end it in a traceback; now: skipped, with one warning each."""
    import os
    import subprocess
    import sys

    res = tmp_path / "res"
    _run(res / "good")
    os.mkfifo(res / "good" / "curves.jsonl")  # a FIFO where a file is read: never waited on
    (res / "fifo").mkdir()
    os.mkfifo(res / "fifo" / "metrics.json")
    _run(res / "pt-fifo")
    (res / "pt-fifo" / "reconstructions.pt").unlink()
    os.mkfifo(res / "pt-fifo" / "reconstructions.pt")
    _run(res / "nested")
    (res / "nested" / "metrics.json").write_text("[" * 100000 + "]" * 100000)
    _run(res / "latin1")
    (res / "latin1" / "metrics.json").write_bytes(b'{"data": "\xe9"}')
    _run(res / "inf")
    (res / "inf" / "curves.jsonl").write_text(
        '{"iteration": Infinity, "eval/ssim": 0.5}\n{"iteration": 1e400, "eval/ssim": 0.5}\n'
        '{"iteration": 10, "eval/ssim": 0.5}\n'
    )
    deep = res / "deep"
    deep.mkdir()
    here = os.getcwd()
    os.chdir(deep)  # 1100 levels below (relative steps: the absolute path is long): Path.rglob raised RecursionError
    try:
        for _ in range(1100):
            os.mkdir("d")
            os.chdir("d")
        (Path.cwd() / "grid.json").write_bytes(b"\xff\xfe")
    finally:
        os.chdir(here)  # (other tests import this checkout's dia from the working folder)
    done = subprocess.run(
        [sys.executable, "-m", "dia.report", str(res)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    warnings = done.stderr.strip().splitlines()  # FIFOs are not files: passed over without a word, like any non-file
    assert all(w.startswith("warning: ") for w in warnings) and len(warnings) == 3, warnings
    assert "nested/metrics.json is not a dia metrics.json (ValueError: nested too deeply)" in done.stderr
    assert (
        "latin1/metrics.json is not a dia metrics.json" in done.stderr
        and "/d/grid.json is not a dia grid.json" in done.stderr
    )
    assert done.stdout.startswith(
        "3 runs in"
    )  # good, pt-fifo (no montage), inf (its curve without the infinite points)


def test_grid_huge_grids_and_yaml_bombs_end_in_one_line(tmp_path, capsys):
    huge = tmp_path / "huge.yaml"
    huge.write_text(
        yaml.safe_dump(
            {
                "method": "grid",
                "parameters": {
                    f"attack.{k}": {"values": list(range(1, 21))}
                    for k in (
                        "lr_patience",
                        "check_every",
                        "log_every",
                        "iterations_per_step",
                        "early_stop_patience",
                        "max_iterations",
                    )
                },
            }
        )
    )
    for what in (["--validate"], ["--list"], ["--run-all"], ["--unfinished"]):
        assert G.main([str(huge), *what, "--results-root", str(tmp_path / "res")]) == 2
        _one_line(capsys, "has 64,000,000 cells")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        "method: grid\nx0: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(
            f"x{i}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
            for i in range(20)
        )
        + "parameters:\n  victims: {values: [*u]}\n"
    )
    assert G.main([str(bomb), "--count"]) == 2
    _one_line(capsys, "aliases (*name) are not supported")
    dup = tmp_path / "dup.yaml"
    dup.write_text(
        "method: grid\nparameters:\n  attack: {values: [ig, dia]}\n  model.dropout: {values: [0.25]}\n"
        "  attack: {values: [wiig]}\n"
    )
    assert G.main([str(dup), "--count"]) == 2  # the second 'attack' silently dropped ig and dia
    _one_line(capsys, "line 5: duplicate key 'attack'")
    _nothing_in(tmp_path / "res")


def test_a_folder_with_a_cells_name_is_not_a_finished_cell(tmp_path, capsys):
    """An empty folder named like a cell was counted as done: skipped by --run-all, --unfinished and
    --only-unfinished while the report listed it missing. Now it is unfinished, and its run is refused (not ours)."""
    grid = G.load(SMOKE)
    folder = G.prepare(grid, tmp_path)
    cell = grid.cells[0]
    (folder / cell.id).mkdir()
    (folder / cell.id / "notes.txt").write_text("mine")
    assert G.status(grid, folder, cell) == "pending"
    assert G.main([str(SMOKE), "--unfinished", "--results-root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "0,1,2,3"
    assert G.main([str(SMOKE), "--run", "0", "--results-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"'{folder / cell.id}' is a folder without metrics.json, not a finished run" in err, err
    assert (folder / cell.id / "notes.txt").read_text() == "mine" and not (folder / f".{cell.id}.partial").exists()
    assert not (folder / f".{cell.id}.lock").exists()  # no lock file stranded beside it


def test_force_takes_the_run_lock(tmp_path, capsys):
    """--force removed a running cell's .partial without its lock: the running process died, its checkpoint gone."""
    from dia.run.folder import RunFolder

    grid = G.load(SMOKE)
    folder = G.prepare(grid, tmp_path)
    cell = grid.cells[0]
    running = RunFolder(folder, cell.id)
    assert running.acquire()  # another process working on the cell (flock: per open file, so this counts as another)
    try:
        running.partial.mkdir()
        (running.partial / "checkpoint.pt").write_bytes(b"progress")
        assert G.main([str(SMOKE), "--run", "0", "--force", "--results-root", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "--force: being run by another process" in err and "nothing removed" in err, err
        assert (running.partial / "checkpoint.pt").read_bytes() == b"progress"
    finally:
        running.release()


def test_wandb_sweeps_copies_are_accepted_by_dia_grid(tmp_path):
    """The copies set logger.wandb.group (for agents): dia.grid refused them as setting a reserved key."""
    grid = G.load(ROOT / "sweeps" / "paper")
    for path in G._write_wandb_sweeps(grid, tmp_path):
        copy = G.load(path)
        assert copy.name == "paper"  # its agents write results/paper, as dia.grid on the folder does
        block = next(b for b in grid.blocks if path.stem.endswith(b.path.stem))
        assert [c.id for c in copy.cells] == [
            grid.cell(i).id for i in range(len(grid)) if grid.cell(i).file == block.path.name
        ]
    other = tmp_path / "other.yaml"
    spec = yaml.safe_load((tmp_path / "paper-imagenet.yaml").read_text())
    spec["parameters"]["logger.wandb.group"] = {"value": "elsewhere"}
    other.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match="logger.wandb.group: set by dia.grid"):
        G.load(other)


def test_a_fifo_among_the_images_is_skipped_not_read(tmp_path):
    """dia.train hung on a FIFO named like an image in a data folder (deaf to signals: the read never returns)."""
    import os
    import subprocess
    import sys

    root = _folder(tmp_path, None)
    os.mkfifo(root / "b.png")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dia.train",
            *QUIET,
            "metrics.lpips=off",
            "data=folder",
            f"data.root={root}",
            f"run.output_dir={tmp_path / 'runs'}",
            "run.name=f",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "f" / "metrics.json").read_text())["victims"][0]["index"] == 0
