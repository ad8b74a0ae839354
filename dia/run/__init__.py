"""One run, or many runs packed into few programs: the run contract (`execute`, in dia.run.contract).

    contract.py    `execute`: the only way anything runs a configuration (dia.train one, dia.grid many)
    cell.py        one run: its checks, folder, victims -> problems, evaluation and result files
    pack.py        runs sharing one vectorized program; the program's life under a Lightning Trainer
    checkpoint.py  resumable progress;  folder.py  states and lock;  signals.py  SIGTERM/SIGUSR1/SIGINT
    summary.py     metrics.json's schema;  tracking.py  W&B;  plotting.py, progress.py, files.py, console.py

Importing this package is cheap: `execute` and its kin load torch and Lightning when first used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Outcome", "execute", "check"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dia.run import contract as module

        return getattr(module, name)
    raise AttributeError(f"module 'dia.run' has no attribute {name!r}")
