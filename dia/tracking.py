"""Weights & Biases through Lightning's logger: offline by default, never a login prompt."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def wandb_logger(cfg: Any, *, save_dir: Path, name: str, config: dict[str, Any]):
    """A `WandbLogger` for `cfg.logger.wandb`, or None when mode=disabled."""
    wb = cfg.logger.wandb
    if wb.mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(
        name=name, save_dir=str(save_dir), project=wb.project, entity=wb.entity, group=wb.group,
        tags=list(wb.tags) or None, mode=wb.mode, config=config, log_model=False,
    )


def finish(logger: Any, summary: dict[str, Any]) -> str | None:
    """Write final metrics into the run summary, close the run, and return its local directory."""
    if logger is None:
        return None
    run = logger.experiment
    run.summary.update(summary)
    directory = str(Path(run.dir).parent)
    run.finish()
    return directory


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
