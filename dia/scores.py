"""How good an attack's result is: per-victim rows of every metric in the metric table (dia.metrics.METRICS).

A shared gradient does not say which reconstruction is which image, so within each client's batch the
reconstructions are first matched to the originals (`dia.metrics.match_problems`); the mask measures follow
that matching. The same rows are what metrics.json holds, what `dia.evaluate` returns and what the loggers and
dia.report read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from dia import metrics as M
from dia.engine import AttackResult
from dia.models import site_parts
from dia.problems import Problems


def score(
    result: AttackResult,
    problems: Problems,
    originals: Tensor | None,
    mean: Tensor,
    std: Tensor,
    *,
    skip: Iterable[str] = (),
) -> tuple[list[dict[str, Any]], Tensor]:
    """Per-victim rows and the matched normalized reconstructions (N, C, H, W), in victim order.

    Victims of one problem share its loss, status and mask recovery. Every image metric of the table is
    computed but those in `skip` (e.g. `lpips` with `metrics.lpips=off`). Without `originals` (an attacked update
    whose images nobody has) the image metrics are None and the reconstructions keep the attack's order.
    """
    b = problems.input_shape[0]
    images = [m for m in M.METRICS if m.fn is not None]
    skip = set(skip)
    if originals is None:
        perms = [torch.arange(b)] * result.x.shape[0]
        rec_n = result.x.flatten(0, 1)
        values: dict[str, Tensor | None] = dict.fromkeys(m.key for m in images)
    else:
        perms = M.match_problems((result.x * std + mean).clamp(0, 1), originals)
        rec_n = torch.cat([result.x[k][p] for k, p in enumerate(perms)])
        unit = ((rec_n * std + mean).clamp(0, 1), originals)
        normalized = (rec_n, (originals - mean) / std)
        values = {m.key: None if m.key in skip else m.fn(*(normalized if m.normalized else unit)) for m in images}
    masks: dict[str, Tensor] = {}
    if result.masks and problems.true_masks:  # recovered masks follow the reconstructions' order
        rows = [mask_rows(p, problems) for p in perms]
        ordered = {n: torch.stack([m[k][r] for k, r in enumerate(rows)]) for n, m in result.masks.items()}
        # masks trained per channel where the client drew per unit (attack.conv_masks=channel): each unit its channel's
        ordered = {n: m.expand_as(problems.true_masks[n]) for n, m in ordered.items()}
        masks = M.mask_measures(ordered, problems.true_masks, site_parts(ordered), problems.rates)
    if result.rates:  # the learned dropout rate per problem, the mean over its sites (attack.rate=learn)
        masks["mask_rate"] = torch.stack(list(result.rates.values())).mean(0)
    out = []
    for i in range(rec_n.shape[0]):
        k = i // b
        out.append(
            {
                "problem": k,
                "matched_reconstruction": int(perms[k][i % b]),
                "status": result.status[k],
                "iterations": int(result.iterations[k]),
                "best_iteration": int(result.best_iteration[k]),
                "loss": float(result.best_loss[k]),
                **{m: (None if v is None else float(v[i])) for m, v in values.items()},
                **dict.fromkeys(M.MASK_KEYS),
                **{m: (None if v[k].isnan() else float(v[k])) for m, v in masks.items()},
            }
        )
    return out, rec_n


def mask_rows(perm: Tensor, problems: Problems) -> Tensor:
    """The rows of a problem's recovered masks in victim order (`perm[i]`: the reconstruction matched to victim i).
    FedAvg: a site's masks are T steps' masks stacked; with the whole batch every step each step is reordered
    alike; with split local batches a reconstruction may be matched across steps, so the slots keep the
    attack's order."""
    local = problems.local
    if local is None:
        return perm
    b = problems.input_shape[0]
    if local.per_step(b) != b:
        return torch.arange(local.steps * local.per_step(b))
    return torch.cat([t * b + torch.as_tensor(perm) for t in range(local.steps)])


__all__ = ["score", "mask_rows"]
