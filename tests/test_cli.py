"""`python -m dia.train` as a user runs it: the run folder, W&B offline run, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dia.run.loggers.wandb import read_offline_run
from dia.train import main

FAST = [
    "attack.max_iterations=30",
    "num_victims=2",
    "run.progress=false",
    "attack.log_every=10",
    "attack.compile=false",
]


def _only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


def test_run_folder_holds_config_metrics_png_tensors_and_offline_wandb_run(tmp_path, capsys):
    code = main(FAST + [f"run.output_dir={tmp_path}"])
    assert code == 0
    run = _only_run(tmp_path)
    assert run.name.startswith("dia-mlp-mnist-p0.25-")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert {"mse", "psnr", "ssim", "lpips", "mask_bal_acc", "mask_bal_acc_keep_all", "mask_bal_acc_init"} <= set(
        metrics["mean"]
    )
    assert len(metrics["victims"]) == 2 and metrics["victims"][1]["index"] == 1
    assert 0 < metrics["mean"]["ssim"] <= 1 and 0.5 < metrics["mean"]["mask_bal_acc"] <= 1
    assert metrics["iterations"] == 30 and metrics["wall_time_s"] > 0
    tensors = torch.load(run / "reconstructions.pt", weights_only=True)
    assert tensors["reconstructions"].shape == (2, 1, 28, 28) == tensors["originals"].shape
    assert any(k.startswith("masks/") for k in tensors)
    assert (run / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "SSIM" in out and str(run) in out
    wandb_run = next((run / "wandb").glob("offline-run-*"))
    logged = read_offline_run(wandb_run)
    assert logged["config"]["attack"]["name"] == "dia" and logged["config"]["model"]["dropout"] == 0.25
    assert logged["summary"]["status"] == "completed"
    assert logged["summary"]["final/ssim"] == pytest.approx(metrics["mean"]["ssim"], rel=1e-6)
    assert any("attack/loss" in row for row in logged["history"])
    assert any(0.5 < row.get("masks/keep_rate", 0) <= 1 for row in logged["history"])  # DIA's masks, keep-rate ~ 1-p


def test_saved_config_reruns_the_same_result(tmp_path):
    assert main(FAST + ["attack=ig", "logger.wandb.mode=disabled", f"run.output_dir={tmp_path / 'a'}"]) == 0
    first = _only_run(tmp_path / "a")
    assert main(["--config", str(first / "config.yaml"), f"run.output_dir={tmp_path / 'b'}"]) == 0
    second = _only_run(tmp_path / "b")
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (first, second))
    assert a["attack"] == b["attack"] == "ig"
    assert [v["mse"] for v in a["victims"]] == [v["mse"] for v in b["victims"]]


def test_help_lists_groups_choices_and_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "attack   dia, analytic, dlg, ig, wiig" in out and "model.dropout = 0.25" in out and "run.seed = 0" in out


def test_describe_model_lists_dropout_sites(capsys):
    assert main(["model=vit", "data=cifar10", "--describe-model"]) == 0
    out = capsys.readouterr().out
    assert "17 dropout sites" in out and "blocks.0.0.attn_drop" in out and "[16, 65, 65]" in out


def test_diverging_attack_stops_keeps_best_and_says_diverged(tmp_path):
    ckpt = tmp_path / "nan.pt"
    from dia.config import compose
    from dia.models import build_model

    model = build_model(compose([]).model, channels=1, image_size=28, num_classes=10, seed=0)
    torch.save({k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}, ckpt)
    code = main(FAST + ["logger.wandb.mode=disabled", f"model.checkpoint={ckpt}", f"run.output_dir={tmp_path / 'out'}"])
    assert code == 3
    metrics = json.loads((_only_run(tmp_path / "out") / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and all(v["status"] == "diverged" for v in metrics["victims"])
    assert all(v["iterations"] == 1 for v in metrics["victims"])


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir()
    broken = tmp / "broken" / "cat"
    broken.mkdir(parents=True)
    (broken / "x.png").write_bytes(b"not an image")
    wrong = tmp / "wrong.pt"
    torch.save({"net.1.weight": torch.zeros(3, 3)}, wrong)
    afile = tmp / "afile"
    afile.write_text("x")
    return [
        (["attack=foo"], "unknown attack 'foo'"),
        (["model.dropuot=0.5"], "did you mean 'model.dropout'"),
        (["model.dropout=abc"], "model.dropout"),
        (["model.dropout=1.0"], "must be in [0, 1)"),
        (["model.dropout=-0.1"], "must be in [0, 1)"),
        (["attack.max_iterations=0"], "attack.max_iterations"),
        (["victims=[0,500]"], "index 500 out of range"),
        (["data.source=torchvision"], "data.root is required"),
        (["data=imagenet", "data.source=imagefolder", f"data.root={tmp / 'missing'}"], "is not a directory"),
        (["data=imagenet", "data.source=imagefolder", f"data.root={empty}"], "holds no images"),
        (
            ["data=imagenet", "data.source=imagefolder", f"data.root={tmp / 'broken'}", "num_victims=1"],
            "cannot read image",
        ),
        ([f"model.checkpoint={wrong}"], "does not fit this model"),
        ([f"run.output_dir={afile / 'sub'}"], "run.output_dir: cannot write"),
        (["batch_size=3"], "do not split"),
        (["--frobnicate"], "unknown option"),
    ]


def test_bad_input_gets_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    for args, expected in _bad_inputs(tmp_path):
        code = main(
            args + ["logger.wandb.mode=disabled", f"run.output_dir={out}"]
            if "run.output_dir" not in " ".join(args)
            else args
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, args
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (args, err)
        assert not out.exists() or not any(out.iterdir()), args


def test_the_real_process_prints_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "dia.train", "attack=foo"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown attack 'foo'; choose one of: analytic, dia, dlg, ig, wiig"


def test_vit_on_cifar10_runs_end_to_end(tmp_path):
    args = [
        "model=vit",
        "data=cifar10",
        "attack=dia",
        "attack.max_iterations=3",
        "num_victims=1",
        "attack.compile=false",
        "run.progress=false",
        "logger.wandb.mode=disabled",
        f"run.output_dir={tmp_path}",
    ]
    assert main(args) == 0
    metrics = json.loads((_only_run(tmp_path) / "metrics.json").read_text())
    assert metrics["model"] == "vit" and metrics["victims"][0]["mask_bal_acc_attention"] is not None


def test_batches_of_two_are_matched_and_labels_can_be_inferred(tmp_path):
    assert (
        main(FAST + ["batch_size=2", "num_victims=4", "logger.wandb.mode=disabled", f"run.output_dir={tmp_path / 'b'}"])
        == 0
    )
    m = json.loads((_only_run(tmp_path / "b") / "metrics.json").read_text())
    assert [v["problem"] for v in m["victims"]] == [0, 0, 1, 1]
    assert sorted(v["matched_reconstruction"] for v in m["victims"][:2]) == [0, 1]
    assert main(FAST + ["attack.labels=infer", "logger.wandb.mode=disabled", f"run.output_dir={tmp_path / 'l'}"]) == 0
    m = json.loads((_only_run(tmp_path / "l") / "metrics.json").read_text())
    assert m["labels"] == "infer" and m["label_accuracy"] == 1.0


def test_label_inference_counts_batches_of_one_gradient_step_only(tmp_path, capsys):
    args = ["attack.labels=infer", "batch_size=2", "logger.wandb.mode=disabled", f"run.output_dir={tmp_path}"]
    assert main([*args, "client.local_steps=2"]) == 2
    assert "needs client.local_steps=1 (got 2)" in capsys.readouterr().err
