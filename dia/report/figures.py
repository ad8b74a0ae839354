"""The report's figures: each metric against the dropout rate (one line per attack), against defense strength, and
SSIM against attack iterations (from curves.jsonl)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from dia.report.collect import Row, describe_defense, differing, metric_columns, rank, warn
from dia.run import record


def figures(groups: dict[tuple, Row], out: Path) -> list[Path]:
    """figures/<metric>_vs_dropout.png of the undefended groups (defended ones: `defense_figures`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vary = differing(groups)
    groups = {k: g for k, g in groups.items() if g.defense.label == "none"}
    panels = sorted(
        {(g.data, g.model) for g in groups.values() if g.runs},
        key=lambda p: (rank("data", p[0]), rank("model", p[1])),
    )
    attacks = sorted(
        {(g.attack, g.variant(vary)) for g in groups.values() if g.runs}, key=lambda a: (rank("attack", a[0]), a[1])
    )
    written = []
    if not panels:
        return written
    out.mkdir(parents=True, exist_ok=True)
    for metric, name, arrow in metric_columns():
        if not any(g.stats(metric) for g in groups.values()):
            continue
        cols = min(4, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
        for ax, (data, model) in zip(axes.flat, panels):
            for attack, variant in attacks:
                pts = sorted(
                    (g.dropout, g.stats(metric))
                    for g in groups.values()
                    if (g.data, g.model, g.attack, g.variant(vary)) == (data, model, attack, variant)
                    and g.stats(metric)
                )
                if pts:
                    ax.errorbar(
                        [p for p, _ in pts],
                        [s[0] for _, s in pts],
                        yerr=[s[1] for _, s in pts],
                        marker="o",
                        ms=3,
                        capsize=2,
                        label=attack.upper() + (f" ({variant})" if variant else ""),
                    )
            ax.set_title(f"{data} / {model}", fontsize=9)
            ax.set_xlabel("dropout rate p", fontsize=8)
            ax.set_ylabel(f"{name} {arrow}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            _legend(ax)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out / f"{metric}_vs_dropout.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _legend(ax: object) -> None:
    """A panel's legend, where it has labelled lines (matplotlib warns about an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _ssim_curve(folder: Path) -> dict[int, list[float]]:
    """{iteration: [eval/ssim of each group of problems]} from a run's curves.jsonl ({} without one;
    unreadable lines are skipped: curves are a picture, not a result)."""
    points: dict[int, list[float]] = {}
    try:
        rows = record.read_curves(folder)
    except OSError as exc:
        warn(f"{folder / record.CURVES} cannot be read ({exc}); its curve is skipped")
        return points
    for row in rows:
        try:
            it, value = row["iteration"], float(row["eval/ssim"])
            if (
                isinstance(it, bool)
                or not isinstance(it, (int, float))
                or not 0 <= it < 2**53
                or not math.isfinite(value)
            ):
                continue  # Infinity, NaN, negative: not a point of a curve
            points.setdefault(int(it), []).append(value)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
            continue
    return points


def curve_figures(groups: dict[tuple, Row], out: Path) -> list[Path]:
    """figures/ssim_vs_iteration_<data>_<model>.png: SSIM of the best iterate so far against attack
    iterations (metrics.curves_ssim), one panel per dropout rate, one line per attack: the mean over runs'
    groups of problems, shaded between the lowest and highest group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vary = differing(groups)
    curves: dict[tuple, dict[int, list[float]]] = {}
    for g in groups.values():
        if g.defense.label != "none":
            continue
        for run in g.runs:
            for it, values in _ssim_curve(Path(run["folder"])).items():
                curves.setdefault((g.data, g.model, g.dropout, (g.attack, g.variant(vary))), {}).setdefault(
                    it, []
                ).extend(values)
    written = []
    for data, model in sorted({k[:2] for k in curves}, key=lambda p: (rank("data", p[0]), rank("model", p[1]))):
        rates = sorted({k[2] for k in curves if k[:2] == (data, model)})
        cols = min(3, len(rates))
        fig, axes = plt.subplots(
            math.ceil(len(rates) / cols),
            cols,
            figsize=(3.4 * cols, 2.7 * math.ceil(len(rates) / cols)),
            squeeze=False,
            sharey=True,
        )
        for ax, rate in zip(axes.flat, rates):
            for attack, variant in sorted(
                {k[3] for k in curves if k[:3] == (data, model, rate)}, key=lambda a: (rank("attack", a[0]), a[1])
            ):
                pts = sorted(curves[(data, model, rate, (attack, variant))].items())
                its = [i for i, _ in pts]
                (line,) = ax.plot(
                    its,
                    [statistics.mean(v) for _, v in pts],
                    label=attack.upper() + (f" ({variant})" if variant else ""),
                    lw=1.2,
                )
                ax.fill_between(
                    its, [min(v) for _, v in pts], [max(v) for _, v in pts], color=line.get_color(), alpha=0.15
                )
            ax.set_title(f"p = {rate:g}", fontsize=9)
            ax.set_xlabel("attack iteration", fontsize=8)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in axes[:, 0]:
            ax.set_ylabel("SSIM of the best iterate", fontsize=8)
        _legend(axes.flat[0])
        for ax in list(axes.flat)[len(rates) :]:
            ax.axis("off")
        fig.suptitle(f"{data} / {model}: SSIM against iterations", fontsize=10)
        fig.tight_layout()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"ssim_vs_iteration_{data}_{model}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def defense_figures(groups: dict[tuple, Row], out: Path) -> list[Path]:
    """figures/defense_<metric>_<data>_<model>.png: the metric against defense strength (runs with a `defense`).

    One panel per defense x dropout rate, one line per attack (dashed: attack.model_defense), the undefended
    run of the same cell as a dotted line; x: noise multiplier (with its epsilon), prune ratio, bits (stronger
    to the right); error bars: std over victims.
    """
    vary = differing(groups)
    runs = [
        r | {"attack": r["attack"] + (f" ({g.variant(vary)})" if vary else "")}
        for g in groups.values()
        for r in g.runs
        if isinstance(r.get("defense"), dict)
    ]  # variants never pool
    if not any(r["defense"].get("name") != "none" for r in runs):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    out.mkdir(parents=True, exist_ok=True)
    for data, model in sorted({(r["data"], r["model"]) for r in runs}):
        mine = [r for r in runs if (r["data"], r["model"]) == (data, model)]
        defended = [r for r in mine if r["defense"]["name"] != "none"]
        kinds = sorted({describe_defense(r["defense"]).kind for r in defended}, key=lambda k: (k.count("+"), k))
        rates = sorted({float(r["dropout"]) for r in defended})
        attacks = sorted({r["attack"] for r in mine}, key=lambda a: rank("attack", a))
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        colors = {a: cycle[i % len(cycle)] for i, a in enumerate(dict.fromkeys(a.split(" ")[0] for a in attacks))}
        for metric, name, arrow in metric_columns()[:3]:
            if not any(v.get(metric) is not None for r in defended for v in r["victims"]):
                continue
            fig, axes = plt.subplots(
                len(kinds), len(rates), figsize=(3.8 * len(rates), 2.9 * len(kinds)), squeeze=False
            )
            for row, kind in enumerate(kinds):
                for col, rate in enumerate(rates):
                    ax = axes[row][col]
                    cell = [
                        r
                        for r in defended
                        if float(r["dropout"]) == rate and describe_defense(r["defense"]).kind == kind
                    ]
                    ticks = sorted(
                        {(pt.strength, pt.tick) for pt in (describe_defense(r["defense"]) for r in cell)},
                        reverse=describe_defense(cell[0]["defense"]).reverse if cell else False,
                    )
                    pos = {v: i for i, (v, _) in enumerate(ticks)}
                    for attack in attacks:
                        for md in (False, True):
                            pts = []
                            for v, _ in ticks:
                                vals = [
                                    x[metric]
                                    for r in cell
                                    if r["attack"] == attack
                                    and bool(r["defense"].get("model_defense")) == md
                                    and describe_defense(r["defense"]).strength == v
                                    for x in r["victims"]
                                    if x.get(metric) is not None
                                ]
                                if vals:
                                    mean = sum(vals) / len(vals)
                                    pts.append(
                                        (
                                            pos[v],
                                            mean,
                                            math.sqrt(sum((x - mean) ** 2 for x in vals) / max(1, len(vals) - 1)),
                                        )
                                    )
                            if pts:
                                ax.errorbar(
                                    [p[0] for p in pts],
                                    [p[1] for p in pts],
                                    yerr=[p[2] for p in pts],
                                    marker="o",
                                    ms=3,
                                    capsize=2,
                                    color=colors.get(attack.split(" ")[0]),
                                    ls="--" if md else "-",
                                    label=attack.upper() + (" (model_defense)" if md else ""),
                                )
                        clear = [
                            x[metric]
                            for r in mine
                            if r["defense"]["name"] == "none" and r["attack"] == attack and float(r["dropout"]) == rate
                            for x in r["victims"]
                            if x.get(metric) is not None
                        ]
                        if clear:
                            ax.axhline(sum(clear) / len(clear), color=colors.get(attack.split(" ")[0]), ls=":", lw=1)
                    ax.set_xticks(range(len(ticks)), [t for _, t in ticks], fontsize=6)
                    ax.set_title(f"{kind}, p={rate:g}", fontsize=9)
                    ax.set_xlabel(
                        (describe_defense(cell[0]["defense"]).axis if cell else "strength") + " (dotted: undefended)",
                        fontsize=7,
                    )
                    ax.set_ylabel(f"{name} {arrow}", fontsize=8)
                    ax.tick_params(axis="y", labelsize=7)
                    ax.grid(alpha=0.3)
            handles = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels())}
            if handles:
                fig.legend(handles.values(), handles.keys(), loc="upper right", fontsize=7, ncol=len(handles))
            fig.suptitle(f"{data} / {model}: {name} against defense strength", fontsize=10, x=0.3)
            fig.tight_layout(rect=(0, 0, 1, 0.98))
            path = out / f"defense_{metric}_{data}_{model}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written
