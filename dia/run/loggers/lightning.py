"""Lightning's own loggers as dia loggers: `logger=csv`, `logger=tensorboard`, `logger=mlflow`.

Each writes into the run folder (`csv/metrics.csv`, `tensorboard/` event files, an MLflow file store in
`mlruns/`), so a run's logs move with it. They receive the curve points as they land in curves.jsonl (stepped
by attack iteration), then the summary at the run's last step (`final/<metric>` for every mean metric, the config
as hyperparameters) and, where the logger takes images, the reconstructions: TensorBoard as an image, MLflow as
the artifact reconstructions.png. CSV has no images.

On resume: Lightning's CSV writer starts its file anew, so it is given every point curves.jsonl holds; the
TensorBoard and MLflow stores keep what an earlier process wrote, so they get only the points after it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dia.errors import UserError
from dia.run import record
from dia.run.loggers import Logger, register_logger

NEEDS = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}  # a package of each, any one


def _available(backend: str) -> None:
    wanted = NEEDS.get(backend, ())
    if wanted and not any(importlib.util.find_spec(m) is not None for m in wanted):
        raise UserError(
            f"logger={backend}: needs the {wanted[0]} package; pip install {wanted[0]} (or, in dia's checkout, "
            f'pip install -e ".[{backend}]")'
        )


def _make(backend: str, cfg: Any, folder: Path, name: str) -> Any:
    from lightning.pytorch import loggers

    if backend == "csv":
        return loggers.CSVLogger(save_dir=str(folder), name="csv", version="")
    if backend == "tensorboard":
        return loggers.TensorBoardLogger(save_dir=str(folder), name="tensorboard", version="", default_hp_metric=False)
    return loggers.MLFlowLogger(
        experiment_name=str(cfg.logger.wandb.project),
        run_name=name,
        tracking_uri=(folder / "mlruns").resolve().as_uri(),
    )


class LightningLogger(Logger):
    """One of Lightning's loggers (`backend`), made at the first point and fed as the module docstring says."""

    def __init__(self, backend: str, cfg: Any, folder: Path, name: str) -> None:
        self.name, self.backend, self.cfg, self.folder, self.run_name = backend, backend, cfg, folder, name
        self.logger: Any = None
        self.keeps_history = backend != "csv"
        points = record.read_curves(folder)
        self.floor = max((record.step(p) for p in points), default=-1) if self.keeps_history else -1
        self.last = -1  # the last step this process sent

    def _open(self) -> Any:
        if self.logger is None:
            self.logger = _make(self.backend, self.cfg, self.folder, self.run_name)
            self._send(record.read_curves(self.folder))  # what this store does not have yet
        return self.logger

    def _send(self, points: list[dict[str, Any]]) -> None:
        for point in points:
            step = record.step(point)
            if step <= max(self.floor, self.last):
                continue
            values = {k: float(v) for k, v in point.items() if k not in ("iteration", "group", "step")}
            self.logger.log_metrics(values, step=step)
            self.last = step
        self.logger.save()

    def log(self, points: list[dict[str, Any]]) -> None:
        if self.logger is None:
            self._open()  # sends what curves.jsonl holds, these points included
        else:
            self._send(points)

    def finish(self, summary: dict[str, Any], *, figure: Path, originals: Any, reconstructions: Any) -> str | None:
        logger = self._open()
        step = max(self.last, 0)
        logger.log_hyperparams(OmegaConf.to_container(self.cfg, resolve=True))
        final = {f"final/{k}": float(v) for k, v in summary.get("mean", {}).items() if isinstance(v, (int, float))}
        logger.log_metrics(final, step=step)
        if self.backend == "tensorboard":
            import numpy as np
            from PIL import Image

            picture = np.asarray(Image.open(figure).convert("RGB"))
            logger.experiment.add_image("reconstructions", picture, step, dataformats="HWC")
        elif self.backend == "mlflow":
            logger.experiment.log_artifact(logger.run_id, str(figure))
        logger.save()
        logger.finalize("success")
        self.logger = None
        return str(Path(self.folder) / ("mlruns" if self.backend == "mlflow" else self.backend))

    def close(self, exit_code: int | None = None) -> None:
        if self.logger is not None:
            self.logger.finalize("failed" if exit_code == 1 else "success")
            self.logger = None


def _opener(backend: str) -> Callable[[Any, Path, str], Logger]:
    def opener(cfg: Any, folder: Path, name: str) -> Logger:
        _available(backend)
        return LightningLogger(backend, cfg, folder, name)

    opener.__name__ = opener.__qualname__ = f"open_{backend}"
    opener.check = lambda cfg: _available(backend)  # type: ignore[attr-defined]  # before anything is written
    return opener


for _kind in ("csv", "tensorboard", "mlflow"):
    register_logger(_kind)(_opener(_kind))

__all__ = ["LightningLogger"]
