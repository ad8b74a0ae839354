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
