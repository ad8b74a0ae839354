"""The schema of a run's summary (metrics.json): the metric names and how they are averaged over victims.

Read by dia.train's console table, dia.report and the W&B summary, so a metric is named here once.
"""

from __future__ import annotations

from typing import Any

from dia.metrics import METRICS as TABLE

METRICS = tuple(m.key for m in TABLE)  # per-victim values, averaged into "mean" (the table: dia.metrics.METRICS)
STATUSES = ("completed", "diverged")  # a finished run's "status"


def mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The mean of each metric (and of each per-part mask measure a row has) over the victims that have it."""
    out: dict[str, float | None] = {}
    for m in [*METRICS, *dict.fromkeys(k for r in rows for k in r if k.startswith("mask_") and k not in METRICS)]:
        vals = [r[m] for r in rows if r.get(m) is not None]
        out[m] = sum(vals) / len(vals) if vals else None
    return out
