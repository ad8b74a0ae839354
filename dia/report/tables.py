"""The report's tables: table.md and table.csv (mean ± std over victims per row), missing.csv."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from dia.report.collect import Row, differing, metric_columns


def _fmt(stats: tuple[float, float, int] | None, metric: str) -> str:
    if stats is None:
        return "—"
    digits = 2 if metric == "psnr" else 3 if metric != "mse" else 4
    return f"{stats[0]:.{digits}f} ± {stats[1]:.{digits}f}"


def _epsilon(eps: float | None) -> str:
    return "—" if eps is None else "∞" if math.isinf(eps) else f"{eps:.3g}"


def tables(groups: dict[tuple, Row], missing: list[dict[str, Any]]) -> tuple[str, str, str]:
    """table.md, table.csv and missing.csv: one row per data x model x rate x attack x defense.

    The markdown has its defense and ε columns only where some group is defended (reports of undefended
    results read as before); the CSV always has them (defense, epsilon), right after `attack`.
    """
    ordered = sorted(groups.values(), key=lambda g: g.key)
    defended = any(g.defense.label != "none" for g in ordered)  # every missing cell has its group
    vary = differing(groups)  # grid, budget, victim set: shown where they differ (always in the CSV)
    shown = (["defense", "ε"] if defended else []) + [
        {"grid": "grid", "budget": "budget", "victims": "victim set", "steps": "T", "weights": "weights", "batch": "B"}[
            k
        ]
        for k in vary
    ]
    head = ["data", "model", "p", "attack", *shown, "cells", "victims", "diverged"] + [
        f"{name} {arrow}" for _, name, arrow in metric_columns()
    ]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(
        [
            "data",
            "model",
            "dropout",
            "attack",
            "defense",
            "epsilon",
            "grid",
            "budget",
            "victim_set",
            "cells_finished",
            "cells_expected",
            "victims",
            "diverged",
            "local_steps",
            "weights",
            "batch_size",
        ]
        + [f"{m}_{s}" for m, _, _ in metric_columns() for s in ("mean", "std", "n")]
    )
    for g in ordered:
        expected = g.expected or len(g.runs)
        n_victims = sum(len(r["victims"]) for r in g.runs)
        diverged = sum(r.get("status") == "diverged" for r in g.runs)
        defense = [g.defense.label, _epsilon(g.defense.epsilon)] if defended else []
        variant = [
            {
                "grid": g.grid or "—",
                "budget": "?" if g.budget is None else str(g.budget),
                "victims": g.victims_set,
                "steps": str(g.steps),
                "weights": g.weights or "?",
                "batch": str(g.batch),
            }[k]
            for k in vary
        ]
        md.append(
            "| "
            + " | ".join(
                [
                    g.data,
                    g.model,
                    f"{g.dropout:g}",
                    g.attack,
                    *defense,
                    *variant,
                    f"{len(g.runs)}/{expected}",
                    str(n_victims),
                    str(diverged),
                ]
                + [_fmt(g.stats(m), m) for m, _, _ in metric_columns()]
            )
            + " |"
        )
        eps = g.defense.epsilon
        row: list[Any] = [
            g.data,
            g.model,
            g.dropout,
            g.attack,
            g.defense.label,
            "" if eps is None else f"{eps:.6g}",
            g.grid,
            "" if g.budget is None else g.budget,
            g.victims_set,
            len(g.runs),
            expected,
            n_victims,
            diverged,
            g.steps,
            g.weights,
            g.batch,
        ]
        for m, _, _ in metric_columns():
            s = g.stats(m)
            row += ["", "", 0] if s is None else [f"{s[0]:.6g}", f"{s[1]:.6g}", s[2]]
        w.writerow(row)
    note = (
        " defense: what the clients sent ((md): attack.model_defense=true); ε: of one client's DP-SGD release, δ=1e-5 "
        "unless its label names δ (∞: no noise)."
        if defended
        else ""
    )
    text = [
        "# Results",
        "",
        f"{sum(len(g.runs) for g in ordered)} finished runs in {len(ordered)} groups; "
        "mean ± std over victims (std with n-1; 0 for one victim). cells: finished/expected." + note,
        "",
    ] + md
    text += ["", f"## Missing cells ({len(missing)})", ""]
    if missing:
        extra = [k for k in vary if k != "grid"]
        cols = ["grid", "index", "cell", "state", "data", "model", "p", "attack"] + ["defense"] * defended + extra
        text += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        text += [
            "| "
            + " | ".join(
                [
                    m["grid"],
                    str(m["index"]),
                    m["id"],
                    m["state"],
                    m["data"],
                    m["model"],
                    f"{m['dropout']:g}",
                    m["attack"],
                ]
                + [m["defense"]] * defended
                + [str(m[k]) for k in extra]
            )
            + " |"
            for m in missing
        ]
    else:
        text.append("none")
    miss = io.StringIO()
    mw = csv.DictWriter(
        miss,
        fieldnames=[
            "grid",
            "file",
            "index",
            "id",
            "state",
            "data",
            "model",
            "dropout",
            "attack",
            "defense",
            "budget",
            "victims",
            "steps",
            "weights",
            "batch",
        ],
    )
    mw.writeheader()
    mw.writerows(missing)
    return "\n".join(text) + "\n", out.getvalue(), miss.getvalue()
