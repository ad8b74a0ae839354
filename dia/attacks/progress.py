"""The console progress bar of an attack: iterations, speed and the reconstruction loss.

It counts attack iterations, not Lightning steps, and moves every iteration (at most every `interval` seconds):
the program calls `tick(done)` after each iteration with its host-side count (`Program.on_iteration`), so the
bar costs no host sync. The loss beside it is the one the program logs every `attack.check_every` iterations.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

TERMINAL_INTERVAL = 0.5  # seconds between redraws in a terminal
LOG_INTERVAL = 30.0  # in a file (a Slurm log): a line of the log every half minute, not ten per second


class AttackProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar on stderr, titled with the attack(s) and the number of problems, without epoch noise:
    no "Training" or "Epoch 0" bar comes before it, even in a log file."""

    def __init__(self, title: str, interval: float | None = None) -> None:
        super().__init__(refresh_rate=1)
        self.title = title
        self.interval = interval
        self.shown = 0.0  # when the bar was last redrawn (time.monotonic)
        self.total = 0
        self.first = 1  # the program's first iteration (done after it)
        self.postfix: dict[str, Any] = {}

    def redraw_interval(self) -> float:
        if self.interval is not None:
            return self.interval
        try:
            return TERMINAL_INTERVAL if sys.stderr.isatty() else LOG_INTERVAL
        except (AttributeError, ValueError):
            return LOG_INTERVAL

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.title,
            total=self.total or None,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0,
            mininterval=0,  # `tick` decides when to redraw
            miniters=1,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.total = pl_module.expected or pl_module.horizon  # count iterations, not Lightning steps
        self.train_progress_bar = self.init_train_tqdm()
        gradient = getattr(pl_module, "gradient", None)
        if getattr(gradient, "compiled", None) is not None and getattr(gradient, "compile_s", 0) is None:
            self.train_progress_bar.set_postfix_str("compiling the attack program first")  # a notebook has no notices
        self.first = pl_module.done + 1
        self.shown = time.monotonic()
        pl_module.on_iteration = self.tick

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Nothing: Lightning's would reset the bar to batches and call it "Epoch 0"."""

    def tick(self, done: int) -> None:
        """After each iteration: `done`, the program's host-side count of iterations (no sync)."""
        now = time.monotonic()
        if done == self.first:  # the first iteration held the compile (announced apart): rate and ETA start after it
            bar = self.train_progress_bar
            bar.initial, bar.n, bar.start_t = done, done, bar._time()
            bar.last_print_n, bar.last_print_t = done, bar.start_t
            bar.set_postfix(self.postfix, refresh=False)
        if now - self.shown >= self.redraw_interval() or done >= self.total:
            self.shown = now
            bar = self.train_progress_bar
            if done > bar.n:
                bar.update(done - bar.n)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = self.get_metrics(trainer, pl_module)
        if metrics != self.postfix:  # the loss, logged every check_every iterations: shown at the next redraw
            self.postfix = metrics
            self.train_progress_bar.set_postfix(metrics, refresh=False)
        self.tick(pl_module.done)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        bar = self.train_progress_bar
        if pl_module.done > bar.n:
            bar.update(pl_module.done - bar.n)
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        pl_module.on_iteration = None
        super().on_train_end(trainer, pl_module)

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
