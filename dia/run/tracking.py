"""Weights & Biases: offline by default, never a login prompt; one W&B run per dia run, written when it is done."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def log_run(cfg: Any, save_dir: Path, *, name: str, run_id: str, curves: list[dict[str, Any]], originals: Any,
            reconstructions: Any, captions: list[str], rows: list[dict[str, Any]], summary: dict[str, Any]) -> str | None:
    """A run's whole W&B record, written once when the run is done: config, curves stepped by attack
    iteration, the image grid, the per-victim table and the final summary. Resumes the run `run_id` if it
    exists, so a cell is one W&B run however often it was interrupted. Returns the local run directory
    (None when logger.wandb.mode=disabled)."""
    wb = cfg.logger.wandb
    if wb.mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    from omegaconf import OmegaConf

    run = wandb.init(dir=str(save_dir), id=run_id, resume="allow", name=name, project=wb.project, entity=wb.entity,
                     group=wb.group, tags=list(wb.tags) or None, mode=wb.mode, config=OmegaConf.to_container(cfg),
                     settings=wandb.Settings(console="off", silent=True))
    try:
        for point in curves:
            values = {k: v for k, v in point.items() if k not in ("iteration", "group", "step")}
            run.log(values, step=int(point.get("step", point.get("iteration", 0))))
        log_reconstructions(run, originals, reconstructions, captions=captions)
        log_victim_table(run, rows)
        run.summary.update(summary)
        directory = str(Path(run.dir).parent)
    finally:
        run.finish()
    return directory


VICTIM_COLUMNS = ("index", "label", "problem", "status", "iterations", "best_iteration", "loss", "mse", "psnr", "ssim",
                  "lpips", "mask_bal_acc", "mask_recall", "mask_precision")


def _run(logger: Any) -> Any:
    """The wandb run behind a Lightning WandbLogger (or a wandb run itself)."""
    return getattr(logger, "experiment", logger)


def log_reconstructions(logger: Any, originals: Any, reconstructions: Any, *, captions: list[str] | None = None,
                        key: str = "reconstructions", max_images: int = 16, caption: str | None = None) -> None:
    """One image: originals (top row) above reconstructions (bottom row), images in [0, 1], (N, C, H, W).

    Nothing happens when `logger` is None (logger.wandb.mode=disabled).
    """
    if logger is None:
        return
    import torch
    import wandb
    from torchvision.utils import make_grid

    n = min(max_images, originals.shape[0])
    both = torch.cat([originals[:n].detach().cpu().float(), reconstructions[:n].detach().cpu().float()]).clamp(0, 1)
    image = make_grid(both, nrow=n, padding=2, pad_value=1.0)
    text = caption or "top: originals, bottom: reconstructions"
    if captions:
        text += " | " + "  ".join(captions[:n])
    _run(logger).log({key: wandb.Image(image, caption=text)})


def log_victim_table(logger: Any, rows: list[dict[str, Any]], *, key: str = "victims",
                     columns: tuple[str, ...] = VICTIM_COLUMNS) -> None:
    """The per-victim metrics (metrics.json's `victims` rows) as a wandb.Table; None-safe like log_reconstructions."""
    if logger is None:
        return
    import wandb

    present = [c for c in columns if any(c in r for r in rows)]
    _run(logger).log({key: wandb.Table(columns=present, data=[[r.get(c) for c in present] for r in rows])})


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """Config, history rows and summary of an offline W&B run directory (`.../wandb/offline-run-*`).

    Deliberately hand-written: wandb (0.31) ships no public reader for the offline `.wandb` file. The
    file is a LevelDB-style log (a 7-byte 'W&B' header, 32 KiB blocks of records, each with a 7-byte
    header: CRC32C, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) of `wandb_internal_pb2.Record`s.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw = next(Path(run_dir).glob("*.wandb")).read_bytes()
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left - 7
            continue
        buf += raw[pos : pos + length]
        pos += length
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(buf)
        buf = b""
        which = record.WhichOneof("record_type")
        if which == "run":
            config.update({key(u): json.loads(u.value_json) for u in record.run.config.update})
        elif which == "config":
            config.update({key(u): json.loads(u.value_json) for u in record.config.update})
        elif which == "history":
            history.append({key(u): json.loads(u.value_json) for u in record.history.item})
        elif which == "summary":
            summary.update({key(u): json.loads(u.value_json) for u in record.summary.update})
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    return {"config": config, "history": history, "summary": summary}


def read_offline_file(run_dir: Path, row: dict[str, Any], key: str) -> Any:
    """A media value logged under `key` in a `read_offline_run` history (or summary) row: a table
    (`table-file`) as {"columns", "data"}; an image (`image-file`) as the path of its PNG file."""
    import json

    entry = row[key] if isinstance(row.get(key), dict) else {k[len(key) + 1:]: v for k, v in row.items() if k.startswith(f"{key}/")}
    if "path" not in entry:
        raise KeyError(f"no media logged under '{key}'")
    path = Path(run_dir) / "files" / entry["path"]
    if entry.get("_type") == "image-file":
        return path
    return json.loads(path.read_text())
