"""docs/batches.md's tables from finished run folders: per (data, model, B, p, attack, settings) cell the mean SSIM
with its range over the runs' images, the fraction of images recovered (SSIM > 0.6), the median iterations, the
fraction of problems converged and the mask recovery (balanced accuracy of the dropped units). No wall times: a
run inside a pack (dia.grid) shares its program's.

    python -m dia.grid sweeps/batches-cpu --run-all && python benchmarks/batches.py results/batches-cpu
    python benchmarks/batches.py results/analytic-cpu --by model.bias
    python benchmarks/batches.py results/batches-cpu results/batches-resnet-cpu --figure batches.png

It only reads: each run's metrics.json and config.yaml through dia.run.record (the run folder's one owner), found
as dia.report finds them.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from dia.files import atomic_write
from dia.report.collect import walk
from dia.run import record

RECOVERED = 0.6  # an image counts as recovered above this SSIM (docs/batches.md)
KEYS = ("data.name", "model.name", "batch_size", "model.dropout", "attack.name")


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def _ssims(victims: list[dict[str, Any]]) -> list[float]:
    """The per-image SSIMs of a cell's per-victim rows (rows without one, e.g. a diverged problem's, left out)."""
    return [v["ssim"] for v in victims if isinstance(v.get("ssim"), (int, float))]


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f}" if values else "—"


def collect(root: Path, extra: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    """Runs grouped by their cell: KEYS and the `extra` config keys; a folder that is not a finished run is skipped."""
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for path in walk(root, {record.METRICS}):  # any depth; hidden (.partial) folders are skipped
        try:
            m, cfg = record.read_metrics(path), record.read_config(path.parent)
        except (OSError, ValueError):
            continue
        cells[tuple(_get(cfg, k) for k in (*KEYS, *extra))].append(m)
    return cells


def table(cells: dict[tuple, list[dict[str, Any]]], extra: list[str]) -> str:
    head = ["data", "model", "B", "p", "attack", *extra, "images", "SSIM mean (range)", "recovered", "iterations"]
    head += ["converged", "mask bal. acc."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(cells, key=lambda k: tuple(str(v) for v in k)):
        runs = cells[key]
        victims = [v for m in runs for v in m.get("victims", [])]
        ssim = _ssims(victims)
        its = [v["iterations"] for v in victims if isinstance(v.get("iterations"), (int, float))]
        masks = [v["mask_bal_acc"] for v in victims if isinstance(v.get("mask_bal_acc"), (int, float))]
        converged = [v.get("status") == "converged" for v in victims]
        span = f" ({min(ssim):.2f}-{max(ssim):.2f})" if ssim else ""
        row = [*(str(k) for k in key), str(len(victims)), _mean(ssim) + span]
        row += [f"{sum(s > RECOVERED for s in ssim)}/{len(ssim)}" if ssim else "—"]
        row += [f"{statistics.median(its):.0f}" if its else "—", f"{sum(converged)}/{len(converged)}"]
        row += [_mean(masks)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def by_batch_size(cells: dict[tuple, list[dict[str, Any]]], extra: list[str]) -> str:
    """The same cells as one row per (data, model, p, attack, extra) and one column per batch size B: mean SSIM
    and the recovered fraction."""
    sizes = sorted({k[2] for k in cells if k[2] is not None})
    rows: dict[tuple, dict[int, str]] = defaultdict(dict)
    for key, runs in cells.items():
        ssim = _ssims([v for m in runs for v in m.get("victims", [])])
        if ssim:
            rows[(*key[:2], *key[3:])][key[2]] = (
                f"{statistics.fmean(ssim):.2f} ({sum(s > RECOVERED for s in ssim)}/{len(ssim)})"
            )
    head = ["data", "model", "p", "attack", *extra, *(f"B = {b}" for b in sizes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(rows, key=lambda k: tuple(str(v) for v in k)):
        lines.append("| " + " | ".join([*(str(k) for k in key), *(rows[key].get(b, "") for b in sizes)]) + " |")
    return "\n".join(lines)


def figure(cells: dict[tuple, list[dict[str, Any]]], extra: list[str], path: Path) -> Path:
    """Mean SSIM (bars: the images' range) against the batch size B, one panel per (data, model, extra), one line
    per (attack, p); the dashed line is RECOVERED. Written whole (temp file + rename)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[tuple, dict[tuple, list[tuple[int, list[float]]]]] = defaultdict(lambda: defaultdict(list))
    for key, runs in cells.items():
        ssim = _ssims([v for m in runs for v in m.get("victims", [])])
        if ssim and key[2] is not None:
            points[(*key[:2], *key[5:])][(key[4], key[3])].append((key[2], ssim))
    panels = sorted(points, key=lambda k: tuple(str(v) for v in k))
    cols = min(4, len(panels))
    fig, axes = plt.subplots(
        math.ceil(len(panels) / cols), cols, figsize=(3.6 * cols, 3.0 * math.ceil(len(panels) / cols)), squeeze=False
    )
    lines = sorted({line for panel in panels for line in points[panel]}, key=lambda a: (str(a[0]), a[1]))
    colors = {line: plt.get_cmap("tab10")(i % 10) for i, line in enumerate(lines)}  # one colour a line everywhere
    for ax, panel in zip(axes.flat, panels):
        for (attack, p), pts in sorted(points[panel].items(), key=lambda a: (str(a[0][0]), a[0][1])):
            pts.sort()
            means = [statistics.fmean(s) for _, s in pts]
            ax.errorbar(
                [b for b, _ in pts],
                means,
                yerr=[[m - min(s) for m, (_, s) in zip(means, pts)], [max(s) - m for m, (_, s) in zip(means, pts)]],
                marker="o",
                ms=3,
                capsize=2,
                color=colors[(attack, p)],
                label=f"{str(attack).upper()} p={p}",
            )
        ax.axhline(RECOVERED, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({b for pts in points[panel].values() for b, _ in pts}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        named = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(extra, panel[2:]) if v is not None]
        ax.set_title(" / ".join([str(panel[0]), str(panel[1]), *named]), fontsize=9)
        ax.set_xlabel("batch size B", fontsize=8)
        ax.set_ylabel("SSIM (mean, range)", fontsize=8)
        ax.set_ylim(-0.1, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, nargs="+", help="results folders (dia.grid's run.output_dir)")
    ap.add_argument("--by", action="append", default=[], help="another config key that tells cells apart")
    ap.add_argument("--by-batch-size", action="store_true", help="one column per batch size: mean SSIM (recovered)")
    ap.add_argument("--figure", type=Path, help="also draw mean SSIM against B into this image file (.png, .pdf, .svg)")
    args = ap.parse_args(argv)
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for root in args.root:
        if not root.is_dir():
            ap.error(f"{root}: not a folder")
        found = collect(root, args.by)
        if not found:
            ap.error(f"{root}: no finished runs (metrics.json) inside")
        for key, runs in found.items():
            cells[key].extend(runs)
    if args.figure is not None and args.figure.suffix.lower() not in {".png", ".pdf", ".svg"}:
        ap.error(f"--figure {args.figure}: the file must end in .png, .pdf or .svg")
    print(by_batch_size(cells, args.by) if args.by_batch_size else table(cells, args.by))
    if args.figure is not None:
        print(f"figure: {figure(cells, args.by, args.figure)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
