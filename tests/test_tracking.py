"""W&B helpers: a reconstruction grid and a per-victim table logged to an offline run, read back from disk."""

from __future__ import annotations

import os
import time

import pytest
import torch

from dia.run.tracking import log_reconstructions, log_victim_table, read_offline_file, read_offline_run


def test_images_and_victim_table_read_back_from_an_offline_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = wandb.init(mode="offline", dir=str(tmp_path), project="dia-test", group="smoke", tags=["grid:smoke"],
                     config={"attack": {"name": "dia"}, "model": {"dropout": 0.5}})
    rows = [{"index": 0, "label": 7, "status": "max_iterations", "iterations": 20, "loss": 0.3, "mse": 0.7, "psnr": 11.5,
             "ssim": 0.19, "lpips": None, "mask_bal_acc": 0.69},
            {"index": 1, "label": 1, "status": "converged", "iterations": 12, "loss": 0.2, "mse": 0.5, "psnr": 12.8,
             "ssim": 0.18, "lpips": None, "mask_bal_acc": 0.73}]
    log_reconstructions(run, torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28), captions=["#0 SSIM 0.19", "#1 SSIM 0.18"])
    log_victim_table(run, rows)
    run.summary.update({"final/ssim": 0.185, "status": "completed"})
    run_dir = run.dir.rsplit(os.sep, 1)[0]
    run.finish()

    deadline = time.time() + 30  # the offline file is written by wandb's service process: wait until it is complete
    while time.time() < deadline:
        logged = read_offline_run(run_dir)
        if len(logged["history"]) >= 2 and "status" in logged["summary"]:
            break
        time.sleep(0.5)
    assert logged["config"]["attack"] == {"name": "dia"} and logged["config"]["model"]["dropout"] == 0.5
    assert logged["summary"]["final/ssim"] == pytest.approx(0.185) and logged["summary"]["status"] == "completed"
    image = next(r for r in logged["history"] if "reconstructions/_type" in r)
    assert image["reconstructions/_type"] == "image-file" and image["reconstructions/width"] == 2 * 30 + 2
    assert "#1 SSIM 0.18" in image["reconstructions/caption"]
    assert read_offline_file(run_dir, image, "reconstructions").read_bytes()[:4] == b"\x89PNG"
    table = next(r for r in logged["history"] if "victims/_type" in r)
    assert table["victims/_type"] == "table-file" and table["victims/nrows"] == 2
    data = read_offline_file(run_dir, table, "victims")
    cols = data["columns"]
    assert cols[:2] == ["index", "label"] and "mask_bal_acc" in cols and "best_iteration" not in cols
    assert [row[cols.index("ssim")] for row in data["data"]] == [0.19, 0.18]
    assert data["data"][0][cols.index("lpips")] is None


def test_helpers_do_nothing_without_a_logger():
    log_reconstructions(None, torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4))
    log_victim_table(None, [{"index": 0}])
