"""The console progress bar of an attack: iterations, speed and the reconstruction loss."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class AttackProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, titled with the attack and the number of problems, without epoch noise."""

    def __init__(self, title: str, refresh_rate: int = 10) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.title = title

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.title)

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
