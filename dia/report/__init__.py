"""`python -m dia.report RESULTS_DIR [--out DIR] [--no-montages]`: the paper's tables and figures from local results.

Reads every run folder under RESULTS_DIR (a folder with metrics.json, as dia.train and dia.grid write them;
no W&B needed) and every grid.json (dia.grid's description of a grid, to know which cells are missing).
Writes to RESULTS_DIR/report/ (or --out):

- table.md, table.csv: mean ± std over victims of SSIM, PSNR, LPIPS, MSE and mask recovery for each
  dataset x model x dropout rate x attack x defense x grid x budget (attack.max_iterations) x victim set,
  with the number of cells (finished/expected) and victims (runs of other grids, budgets or victims never
  pool; the markdown shows the grid, budget and victim-set columns only where they differ, the CSV always);
  groups whose cells are all missing are listed with empty metrics, and every missing or unfinished cell
  is listed under "Missing cells" (missing.csv) - nothing is dropped silently. Defended and undefended runs
  never share a row: the defense (a label such as `dpsgd σ=0.1 C=1`) and DP-SGD's ε are columns of the CSV,
  and of the markdown when some run is defended.
- figures/<metric>_vs_dropout.png: the metric against the dropout rate, one line per attack, one panel
  per dataset/model (error bars: std over victims), undefended runs;
  figures/defense_<metric>_<data>_<model>.png: the metric against defense strength.
- montages/<run>.png: the originals above the reconstructions of each run (from reconstructions.pt,
  loaded with weights_only=True).

Only regular files are read (a FIFO or device named metrics.json is skipped, never waited on), folders are
walked without following links, and a file that cannot be read (not UTF-8, too deeply nested, an infinite
number) is skipped with one warning. The report folder is built beside `--out` and swapped in; an existing
`--out` is replaced only when it is a report dia made (it holds `.dia-report`), never the results or any
other folder.

The report in parts: collect.py (reading and grouping), tables.py, figures.py, montages.py; here, building the
report folder beside `--out` and swapping it in.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from dia.errors import ExitCode, UserError
from dia.report.collect import Row, collect, describe_defense
from dia.report.figures import curve_figures, defense_figures, figures
from dia.report.montages import montage, montage_figure
from dia.report.tables import tables


def build(root: Path, out: Path | None = None, montages: bool = True) -> dict[str, Any]:
    """Write the report to `out` (default RESULTS/report) atomically: built in a hidden folder beside it, then
    swapped in."""
    root = Path(root)
    out = Path(out) if out else root / "report"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a folder for the report")
    check_out(root, out)
    groups, missing = collect(root, skip=out.resolve())
    if not any(g.runs for g in groups.values()) and not missing:
        raise UserError(f"no dia results (metrics.json or grid.json) under '{root}'")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise UserError(f"--out '{out}': cannot write there ({exc.strerror})") from None
    try:
        md, table_csv, missing_csv = tables(groups, missing)
        (tmp / MARKER).write_text("a report made by `python -m dia.report`; a rebuild replaces this folder\n")
        (tmp / "table.md").write_text(md)
        (tmp / "table.csv").write_text(table_csv)
        (tmp / "missing.csv").write_text(missing_csv)
        figs = (
            figures(groups, tmp / "figures")
            + defense_figures(groups, tmp / "figures")
            + curve_figures(groups, tmp / "figures")
        )
        mont = []
        if montages:
            for g in groups.values():
                for run in g.runs:
                    rel = Path(run["folder"]).resolve().relative_to(root.resolve())
                    p = montage(run, tmp / "montages" / ("__".join(rel.parts) + ".png"))
                    if p:
                        mont.append(p)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    moved = lambda ps: [out / p.relative_to(tmp) for p in ps]  # noqa: E731
    return {
        "out": out,
        "groups": len(groups),
        "runs": sum(len(g.runs) for g in groups.values()),
        "missing": len(missing),
        "figures": moved(figs),
        "montages": moved(mont),
    }


MARKER = ".dia-report"  # in every report folder dia.report makes: the only folders a rebuild may replace


REPORT_FILES = {"table.md", "table.csv", "missing.csv", "figures", "montages"}  # a report made before the marker


def ours(out: Path) -> bool:
    """Whether `out` is a report dia.report made (or an empty folder): the only thing a rebuild replaces."""
    try:
        names = {p.name for p in out.iterdir()}
    except OSError:
        return False
    return (out / MARKER).is_file() or names <= REPORT_FILES and (out / "table.md").is_file() or not names


def check_out(root: Path, out: Path) -> None:
    """A UserError unless `out` may be (re)placed: never the results, a folder holding them, or a folder of
    anything but a report dia made."""
    r, o = root.resolve(), out.resolve()
    if o == r or o in r.parents:
        raise UserError(
            f"--out '{out}' is the results folder or holds it; the report replaces its folder: give a folder of "
            "its own (default: RESULTS/report)"
        )
    if out.is_dir() and not ours(out):
        raise UserError(
            f"--out '{out}' exists and is not a report dia made (no {MARKER} in it); nothing was touched: "
            "give a new folder, or remove it yourself"
        )


def _swap(new: Path, out: Path) -> None:
    """Put folder `new` at `out`: a rename, and for an existing report two (the old one is removed after; only
    a report dia made, or an empty folder, is ever replaced: `check_out`)."""
    if not out.exists():
        os.rename(new, out)
        return
    if not ours(out):
        raise UserError(f"--out '{out}' is no longer a report dia made; nothing was touched")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dia.report", description="Tables and figures from local dia results.")
    p.add_argument("results", help="a results dir (e.g. results/paper, or results/ with several grids, or runs/)")
    p.add_argument("--out", default=None, help="where to write (default: RESULTS/report)")
    p.add_argument(
        "--no-montages", action="store_true", help="skip the per-run montages of originals and reconstructions"
    )
    p.error = lambda message: (_ for _ in ()).throw(UserError(f"{message}; see `python -m dia.report --help`"))  # type: ignore[method-assign]
    try:
        a = p.parse_args(argv)
        r = build(Path(a.results), Path(a.out) if a.out else None, montages=not a.no_montages)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).splitlines())}", file=sys.stderr)  # one line, whatever the input held
        return ExitCode.BAD_INPUT
    print(
        f"{r['runs']} runs in {r['groups']} groups, {r['missing']} missing cells -> {r['out']}/table.md table.csv "
        f"missing.csv, {len(r['figures'])} figures, {len(r['montages'])} montages"
    )
    print((r["out"] / "table.md").read_text())
    return ExitCode.OK


__all__ = [
    "build",
    "main",
    "collect",
    "tables",
    "figures",
    "defense_figures",
    "curve_figures",
    "montage",
    "montage_figure",
    "describe_defense",
    "Row",
]
