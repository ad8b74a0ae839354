"""Every zoo model on every embedded dataset it fits runs `python -m dia.train` end to end, for each attack."""

from __future__ import annotations

import json

import pytest

from dia.train import main

FITS = {  # model -> embedded datasets (and overrides keeping CPU smoke runs small)
    "mlp": (["mnist", "cifar10"], []),
    "vit": (["mnist", "cifar10"], []),
    "cnn": (["mnist", "cifar10", "imagenet"], []),
    "resnet18": (["mnist", "cifar10", "imagenet"], []),
    "vit_b16": (["imagenet"], ["model.depth=2"]),  # full-size shapes: tests/test_zoo.py
    "timm": (["cifar10"], ["model.arch=convnext_atto", "model.drop_path=0.1"]),
}
CASES = [(m, d, a) for m, (datas, _) in FITS.items() for d in datas for a in ("ig", "wiig", "dia")]


@pytest.mark.parametrize("model,data,attack", CASES, ids=["-".join(c) for c in CASES])
def test_smoke_run(tmp_path, model, data, attack):
    args = [
        f"model={model}",
        f"data={data}",
        f"attack={attack}",
        *FITS[model][1],
        "model.dropout=0.25",
        "attack.max_iterations=2",
        "num_victims=1",
        "attack.compile=false",
        "logger.wandb.mode=disabled",
        "run.progress=false",
        f"run.output_dir={tmp_path}",
    ]
    assert main(args) == 0
    run = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["iterations"] == 2 and m["mean"]["psnr"] >= 0
    assert (m["mean"]["mask_bal_acc"] is not None) == (attack == "dia")
