"""dia: gradient inversion through dropout (IG, WIIG, the Dropout Inversion Attack, DLG) as a library and a suite.

    import dia
    update = dia.capture_update(model, images, labels)        # what a client sends (one training step)
    r = dia.reconstruct(model, update.gradient, labels=labels, input_shape=(1, 28, 28),
                        mean=(0.1307,), std=(0.3081,), attack="dia", max_iterations=1500)
    dia.evaluate(r, images_in_0_1, masks=update.masks)       # SSIM, PSNR, mask recovery, ...

Layers: the API (dia.api, dia.updates) on top of the science (dia.attacks, dia.models, dia.engine,
dia.losses, dia.gradients, dia.problems, dia.defenses, dia.metrics, dia.data), one run (dia.run) and the
orchestration commands (dia.grid, dia.slurm, dia.report, dia.bench; `python -m dia.train` for one run).
Importing dia is instant: torch, Lightning and the rest load when a function needs them.
"""

from __future__ import annotations

from typing import Any

from dia.errors import UserError

__version__ = "0.1.0"

_API = {
    "reconstruct": "dia.api",
    "evaluate": "dia.api",
    "simulate": "dia.api",
    "save": "dia.api",
    "Reconstruction": "dia.api",
    "Simulation": "dia.api",
    "capture_update": "dia.updates",
    "check_update": "dia.updates",
    "ClientUpdate": "dia.updates",
    "UpdateCheck": "dia.updates",
}
__all__ = ["UserError", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dia' has no attribute {name!r}")
