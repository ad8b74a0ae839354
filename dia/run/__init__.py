"""One run, or many runs packed into few programs: the run contract (`execute`, in dia.run.contract).

    contract.py    `execute`: the only way anything runs a configuration (dia.train one, dia.grid many)
    runs.py        one run: its checks, folder, clients (dia.clients), score and result files
    pack.py        runs sharing one program (dia.attacks.program): which run holds which rows, turnover
    record.py      the run folder's files (config.yaml, metrics.json, curves.jsonl, reconstructions.*)
    checkpoint.py  resumable progress;  folder.py  states and lock;  signals.py  SIGTERM/SIGUSR1/SIGINT
    loggers/       W&B, CSV, TensorBoard, MLflow;  checks.py  what a config needs here;  plotting.py  pictures

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
