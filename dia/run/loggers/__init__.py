"""Loggers: where a run's curves, summary and images go besides its folder (the folder is always the record).

A logger is one module of this package that registers an opener at its definition (`@register_logger(name)`):
`opener(cfg, folder, name) -> Logger | None` (None: it has nothing to do for this config). `logger=NAME` (or
`logger=wandb+csv`, several) selects them; the default is `wandb` (offline unless `logger.wandb.mode=online`).

- `wandb` (dia.run.loggers.wandb): one W&B run per dia run, live, continued across resumes;
- `csv`, `tensorboard`, `mlflow` (dia.run.loggers.lightning): Lightning's own CSVLogger, TensorBoardLogger and
  MLFlowLogger, writing into the run folder (`csv/`, `tensorboard/`, `mlruns/`).

What a logger receives: `log(points)` with curve points as they land in curves.jsonl (`attack.log_every` apart,
stepped by attack iteration), `finish(summary, figure=..., originals=..., reconstructions=...)` once the run is
scored (metrics.json's content, reconstructions.png, the images in [0, 1]) before its folder is renamed, and
`close(exit_code)` when the run stops or fails instead. A logger that fails costs one warning; the run goes on.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dia import config
from dia.config import stage_names
from dia.errors import UserError
from dia.registry import Registry


class Logger:
    """The seam: what a run tells a logger (every method may be left as it is: a no-op)."""

    name = "logger"

    def log(self, points: list[dict[str, Any]]) -> None:
        """Curve points ({"group", "iteration", "step", name: value}) as they land in curves.jsonl."""

    def finish(self, summary: dict[str, Any], *, figure: Path, originals: Any, reconstructions: Any) -> str | None:
        """The run is scored: its summary (metrics.json's content), picture and images. Returns where the logger
        put it (printed by dia.train), or None."""
        return None

    def close(self, exit_code: int | None = None) -> None:
        """The run stopped (a signal: 75, 130) or failed (1) before `finish`."""


Opener = Callable[[Any, Path, str], Logger | None]
LOGGERS: Registry[Opener] = Registry("logger")


def register_logger(name: str) -> Callable[[Opener], Opener]:
    """Decorator: make `opener(cfg, folder, name)` the logger `logger=<name>`."""
    return LOGGERS.register(name)


class Loggers(Logger):
    """The loggers a run config selects, told everything in turn (a failing one is dropped with one warning)."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def _each(self, what: str, call: Callable[[Logger], Any]) -> list[Any]:
        out = []
        for logger in list(self.loggers):
            try:
                out.append(call(logger))
            except Exception as exc:  # a logger must never cost a run: its folder is the record
                self.loggers.remove(logger)
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                warnings.warn(
                    f"logger {logger.name} failed in {what} ({type(exc).__name__}: {first}); the run goes on and "
                    "its folder has every result",
                    stacklevel=3,
                )
        return out

    def log(self, points: list[dict[str, Any]]) -> None:
        self._each("log", lambda lg: lg.log(points))

    def finish(self, summary: dict[str, Any], *, figure: Path, originals: Any, reconstructions: Any) -> dict[str, str]:
        """Every logger's `finish`; returns {logger name: where it put the run}."""
        names = [lg.name for lg in self.loggers]
        done = self._each(
            "finish", lambda lg: lg.finish(summary, figure=figure, originals=originals, reconstructions=reconstructions)
        )
        return {n: w for n, w in zip(names, done) if w}

    def close(self, exit_code: int | None = None) -> None:
        self._each("close", lambda lg: lg.close(exit_code))


def open_loggers(cfg: Any, folder: Path, name: str) -> Loggers:
    """The loggers of `cfg.logger.name` for the run `name` in `folder` (its partial folder, locked). Open before
    curves.jsonl is trimmed on resume, so that a logger knows which points an earlier process sent."""
    opened = [LOGGERS.get(n)(cfg, Path(folder), name) for n in stage_names(cfg.logger.name) if n != "none"]
    return Loggers([lg for lg in opened if lg is not None])


def check_logger(cfg: Any) -> None:
    """compose's code check for `logger=`: registered loggers, `none` alone."""
    names = stage_names(cfg.logger.name)
    for n in names:
        if n != "none":
            check = getattr(LOGGERS.get(n), "check", None)  # e.g. its package is installed
            if check is not None:
                check(cfg)
    if "none" in names and len(names) > 1:
        raise UserError(f"logger={'+'.join(names)}: 'none' cannot be combined with other loggers")


for _module in pkgutil.iter_modules(__path__):  # every logger of the package registers itself
    importlib.import_module(f"{__name__}.{_module.name}")

config.register_check("logger", check_logger)

__all__ = ["Logger", "Loggers", "LOGGERS", "register_logger", "open_loggers", "check_logger"]
