"""The console progress bar of an attack: iterations, speed and the reconstruction loss."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class AttackProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, titled with the attack and the number of problems, without epoch noise."""

    def __init__(self, title: str, refresh_rate: int = 10) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.title = title

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=pl_module.expected or pl_module.horizon)  # count iterations, not Lightning steps
        bar.update(pl_module.done)
        bar.set_description(self.title)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if pl_module.done - bar.n >= self.refresh_rate or pl_module.done >= pl_module.horizon:
            bar.update(pl_module.done - bar.n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
