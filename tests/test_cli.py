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
    table = out[out.index("victim") :].split("\n\n")[0].splitlines()
    assert len(table) == 3 and max(map(len, table)) <= 120, table  # it was ~230 columns wide
    assert "mask bal. acc." in table[0] and "(init)" not in table[0]  # baselines: metrics.json only
    assert "curves.jsonl" in out  # the files it wrote
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


def test_readme_reruns_a_finished_run_say_where_it_is_at_once(tmp_path, monkeypatch, capsys):
    """README: `python -m dia.train` twice, and `python -m dia.train --config runs/<run>/config.yaml  # rerun a run
    exactly`, ended in "run.name: '...' already exists; choose another run.name" (exit 2, after 27 s) for a run the
    user never named. Now: its summary and where it is, exit 0, nothing run or rewritten, before torch is imported."""
    monkeypatch.chdir(tmp_path)  # README's relative runs/ folder
    args = [*FAST, "num_victims=1", "attack=ig", "logger.wandb.mode=disabled"]
    assert main(args) == 0
    run = _only_run(tmp_path / "runs")
    written = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    capsys.readouterr()
    for again in (args, ["--config", f"runs/{run.name}/config.yaml"]):
        assert main(again) == 0
        out = capsys.readouterr().out
        assert f"already done: runs/{run.name}/ holds this config's finished run" in out, out
        assert "status completed" in out and "SSIM" in out  # the summary of its metrics.json
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == written and _only_run(tmp_path / "runs") == run
    code = (
        "import sys, time; from dia.train import main; t = time.time(); "
        f"rc = main({args!r}); print(rc, 'torch' in sys.modules, round(time.time() - t, 1))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    rc, torch_loaded, seconds = done.stdout.strip().splitlines()[-1].split()
    assert (rc, torch_loaded) == ("0", "False") and float(seconds) < 5, done.stdout + done.stderr
    assert main([*args, "attack.max_iterations=31"]) == 0  # another config: another run
    assert len([p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]) == 2


def test_help_lists_groups_choices_and_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "attack   dia, analytic, dlg, ig, wiig" in out and "model.dropout = 0.25" in out and "run.seed = 0" in out


def _key_lines(text: str) -> list[str]:
    lines = text.split("keys (", 1)[1].split("\n\noptions:", 1)[0].splitlines()[1:]
    assert lines and all(line.startswith("  ") for line in lines)
    return lines


def test_help_gives_every_key_its_values_and_a_description(capsys):
    """Every key of every choice (a composition too) has what it may be and what it does: from the schema's fields,
    from the comments beside a choice's own keys in its YAML, from the range its check enforces."""
    from dia.config import choices, compose, key_doc

    selections = [[]] + [[f"{g}={c}"] for g in ("attack", "model", "data", "defense") for c in choices(g)]
    for args in selections + [["defense=[prune,dpsgd]"]]:
        assert main(["--help", *args]) == 0
        lines = _key_lines(capsys.readouterr().out)
        cfg = compose(args, code_checks=False, validated=False)
        assert len(lines) > 40
        for line in lines:
            key = line.split(" = ", 1)[0].strip()
            values, text = key_doc(key, cfg)
            assert len(values) >= 2 and len(text.split()) >= 2, (args, line)  # what it may be, what it does
            assert line.endswith(f"  ({values}) {text}"), (args, line)
    main(["--help"])
    out = capsys.readouterr().out
    assert "  attack.mask_param = clip  (clip | sigmoid) how trained masks are parametrized" in out
    assert "  model.dropout = 0.25  (in [0, 1)) dropout rate p" in out  # the range model.dropout's check enforces
    assert "  attack.assumed_rate = null  (null or in [0, 1)) the dropout rate DIA assumes" in out
    main(["--help", "model=vit"])
    assert "  model.heads = 16  (an integer > 0) attention heads" in capsys.readouterr().out


def test_help_into_a_closed_pipe_ends_quietly_with_exit_0():
    """`python -m dia.train --help | head -3` ended in exit 1 with a BrokenPipeError line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dia.train", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader has gone before the help is written
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def test_describe_model_lists_dropout_sites(capsys):
    assert main(["model=vit", "data=cifar10", "--describe-model"]) == 0
    out = capsys.readouterr().out
    assert "17 dropout sites" in out and "blocks.0.0.attn_drop" in out and "[16, 65, 65]" in out


def test_diverging_attack_stops_keeps_best_and_says_diverged(tmp_path):
    ckpt = tmp_path / "huge.pt"  # finite weights whose activations overflow (NaN weights are refused at the door)
    from dia.config import compose
    from dia.models import build_model

    model = build_model(compose([]).model, channels=1, image_size=28, num_classes=10, seed=0)
    torch.save({k: v * 1e30 for k, v in model.state_dict().items()}, ckpt)
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
