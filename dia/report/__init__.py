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
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import math
import os
import shutil
import stat
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dia.errors import ExitCode, UserError

ORDER = {
    "data": ["mnist", "cifar10", "imagenet"],
    "model": ["mlp", "cnn", "vit", "vit_b16"],
    "attack": ["ig", "wiig", "dia"],
}


def _metrics() -> list[tuple[str, str, str]]:
    """(key, label, arrow) of the table's metric columns: dia.metrics.METRICS, the one metric table."""
    from dia.metrics import METRICS as TABLE

    return [(m.key, m.label, m.arrow) for m in TABLE if m.column]


def _rank(kind: str, value: Any) -> tuple:
    known = ORDER.get(kind, [])
    base = str(value).split(" ")[0]  # "dia (rate=learn)" ranks as dia
    return (known.index(base) if base in known else len(known), str(value))


class Defense(NamedTuple):
    """A run's defense as the report shows it: in the defense figure (kind, strength, tick, axis) and the table
    (label, epsilon). Everything about a defense comes from its entry in the defense registry (dia.defenses)."""

    kind: str  # the figure's panel: the stages and every setting but the strength ('none': undefended)
    strength: float  # the figure's x: the strength key of the last stage that has one (0 for one point)
    tick: str  # the figure's tick: the strength, with the epsilon where there is one
    label: str  # the table's row: every stage with its keys, '+'-joined, ' (md)' for attack.model_defense
    epsilon: float | None  # of a private release (inf: no noise); None without one
    axis: str = ""  # the figure's x label
    reverse: bool = False  # stronger to the right means smaller values (bits)


NOT_SETTINGS = ("name", "model_defense", "epsilon")


def describe_defense(d: dict[str, Any] | None) -> Defense:
    """The `defense` dict of a metrics.json (dia.defenses.summary) as the figure and the table show it.

    No dict (results from before defenses) is `none`. The label keeps every key that changes what the client
    sends, so runs share a table row only when they share a defense; a stage the registry does not know
    (results of another version) is shown by its name.
    """
    from dia.defenses import DEFENSES, Stage, identity

    d = d or {"name": "none"}
    name = str(d["name"])
    stages = [
        (s, DEFENSES.get(s) if s in DEFENSES else Stage(identity, label=lambda _, s=s: s)) for s in name.split("+")
    ]
    label = "+".join(stage.label(d) for _, stage in stages) + (" (md)" if d.get("model_defense") else "")
    epsilon = d.get("epsilon")
    epsilon = math.inf if epsilon is None and any(stage.private for _, stage in stages) else epsilon
    strong = next((stage for _, stage in reversed(stages) if stage.strength and stage.strength in d), None)
    value = 0.0 if strong is None else float(d[strong.strength])
    tick = (f"{value:g}" + (f"\nε={d['epsilon']:.3g}" if d.get("epsilon") is not None else "")) if strong else label
    others = sorted(k for k in d if k not in NOT_SETTINGS and (strong is None or k != strong.strength))
    kind = name + "".join(f", {k}={d[k]}" for k in others)
    return Defense(
        kind, value, tick, label, epsilon, strong.axis if strong else "", bool(strong and strong.stronger_when_smaller)
    )


NONE = Defense("none", 0.0, "none", "none", None)


@dataclass
class Group:
    data: str
    model: str
    dropout: float
    attack: str
    defense: Defense = NONE  # what the clients sent: runs with different defenses never share a group
    grid: str = ""  # the grid (grid.json folder) its runs lie in; "" for runs outside any grid
    budget: int | None = None  # attack.max_iterations (None: unknown)
    victims_set: str = ""  # which victims (`victim_label`)
    steps: int = 1  # the clients' local steps T (client.local_steps; 1: FedSGD)
    runs: list[dict[str, Any]] = field(default_factory=list)
    expected: int = 0  # cells a grid expects (0: no grid.json knows this group)
    missing: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        d = self.defense
        return (
            _rank("data", self.data),
            _rank("model", self.model),
            self.grid,
            -1 if self.budget is None else self.budget,
            self.victims_set,
            self.steps,
            self.dropout,
            _rank("attack", self.attack),
            d.kind != "none",
            d.kind.count("+"),
            d.kind,
            d.strength,
            d.label,
        )

    def variant(self, shown: list[str]) -> str:
        """The group's grid, budget, victim set and local steps where they differ between groups (`shown`), for labels."""
        parts = {
            "grid": self.grid or "no grid",
            "budget": f"{self.budget} it" if self.budget is not None else "? it",
            "victims": f"victims {self.victims_set}",
            "steps": f"T={self.steps}",
        }
        return ", ".join(parts[k] for k in shown)

    def values(self, metric: str) -> list[float]:
        return [
            v[metric]
            for r in self.runs
            for v in r["victims"]
            if isinstance(v.get(metric), (int, float)) and not isinstance(v[metric], bool) and math.isfinite(v[metric])
        ]

    def stats(self, metric: str) -> tuple[float, float, int] | None:
        vals = self.values(metric)
        if not vals:
            return None
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return mean, std, len(vals)


def _coords(overrides: dict[str, Any], config_defaults: dict[str, Any]) -> tuple[str, str, float, str]:
    return (
        str(overrides.get("data", config_defaults["data"])),
        str(overrides.get("model", config_defaults["model"])),
        float(overrides.get("model.dropout", config_defaults["dropout"])),
        str(overrides.get("attack", config_defaults["attack"])),
    )


def _defaults() -> dict[str, Any]:
    """The dataset/model/rate/attack of a cell that does not set them: dia.train's defaults."""
    try:
        from dia.config import compose

        cfg = compose([])
        return {"data": cfg.data.name, "model": cfg.model.name, "dropout": cfg.model.dropout, "attack": cfg.attack.name}
    except Exception:
        return {"data": "mnist", "model": "mlp", "dropout": 0.25, "attack": "dia"}


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


MAX_READ = 256 << 20  # a metrics.json, grid.json, config.yaml or curves.jsonl larger than this is not one dia wrote


def read_regular(path: Path, limit: int = MAX_READ) -> bytes:
    """The bytes of `path` if it is a regular file (opened without blocking: a FIFO is refused, not waited on)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        if st.st_size > limit:
            raise OSError(f"larger than {limit >> 20} MiB")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    """A JSON file (regular, UTF-8); ValueError for anything else (RecursionError included)."""
    try:
        return json.loads(read_regular(path).decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except OSError as exc:
        raise ValueError(str(exc.strerror or exc)) from None


def _read_metrics(path: Path) -> dict[str, Any] | None:
    """A run's metrics.json, or None (with one warning) when it is not one dia wrote."""
    try:
        m = read_json(path)
        key = (
            (str(m["data"]), str(m["model"]), float(m["dropout"]), str(m["attack"])),
            describe_defense(m.get("defense")),
        )
        if not isinstance(m["victims"], list) or not all(isinstance(v, dict) for v in m["victims"]):
            raise TypeError("victims is not a list of per-victim rows")
        if not math.isfinite(key[0][2]):
            raise ValueError("dropout is not a number")
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        warn(f"{path} is not a dia metrics.json ({type(exc).__name__}: {str(exc)[:80]}); run skipped")
        return None
    m["key"] = key
    return m


def _grid_cells(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """A grid.json's name and its well-formed cells; a broken grid.json or cell is skipped with one warning."""
    try:
        spec = read_json(path)
        cells = spec["cells"]
        if not isinstance(cells, list):
            raise TypeError("cells is not a list")
    except (ValueError, KeyError, TypeError):
        warn(f"{path} is not a dia grid.json; skipped")
        return "", []
    good = []
    for i, cell in enumerate(cells):
        ok = (
            isinstance(cell, dict)
            and isinstance(cell.get("overrides"), dict)
            and isinstance(cell.get("id"), str)
            and isinstance(cell.get("index"), int)
            and "/" not in cell["id"]
            and not cell["id"].startswith(".")
        )
        if ok:
            good.append(cell)
        else:
            warn(f"{path}: cell {i} has no id, index or overrides; skipped")
    return str(spec.get("name") or path.parent.name), good


def _config(folder: Path) -> dict[str, Any]:
    """A run's config.yaml as a plain dict ({} when it has none or it cannot be read: then metrics.json decides)."""
    import yaml

    path = folder / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(read_regular(path).decode("utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        warn(f"{path} cannot be read; its budget and victim set are taken from metrics.json")
        return {}


def victim_label(victims: Any, count: Any, seed: Any) -> str:
    """Which victims a run attacks, as a short label: '0-3' (the first four, or that list), '0,5,9', '16 drawn (seed 1)'."""
    if isinstance(victims, list) and victims and all(isinstance(v, int) for v in victims):
        if victims == list(range(victims[0], victims[0] + len(victims))):
            return f"{victims[0]}-{victims[-1]}" if len(victims) > 1 else str(victims[0])
        text = ",".join(map(str, victims))
        return text if len(text) <= 24 else f"{len(victims)} listed (#{hashlib.sha1(text.encode()).hexdigest()[:6]})"
    if isinstance(count, int) and count > 0:
        return f"0-{count - 1}" if seed is None else f"{count} drawn (seed {seed})"
    return "?"


def _run_variant(folder: Path, m: dict[str, Any]) -> tuple[int | None, str, int]:
    """(budget, victim set, local steps) of a run: from its config.yaml, else from what metrics.json says."""
    cfg = _config(folder)
    try:
        budget = int(cfg["attack"]["max_iterations"])
    except (KeyError, TypeError, ValueError):
        budget = m.get("max_iterations") if isinstance(m.get("max_iterations"), int) else None
    if cfg:
        label = victim_label(cfg.get("victims"), cfg.get("num_victims"), cfg.get("victim_seed"))
    else:
        label = victim_label([v.get("index") for v in m["victims"]], None, None)
    client = cfg.get("client") if isinstance(cfg.get("client"), dict) else m.get("client")
    steps = client.get("local_steps", 1) if isinstance(client, dict) else 1
    return budget, label, steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else 1


ENGINE_KEYS = {
    "name",
    "max_iterations",
    "compile",
    "compile_mode",
    "parallel",
    "refill",
    "log_every",
    "check_every",
    "iterations_per_step",
    "matmul_precision",
    "model_defense",
}  # how it runs, or shown elsewhere (budget, defense)


@functools.cache
def _attack_defaults(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from dia.config import group_settings

    return OmegaConf.to_container(group_settings("attack", name))  # type: ignore[return-value]


def attack_variant(attack: Any) -> str:
    """The settings of a run's attack section that differ from its YAML's, as a label suffix (" (rate=learn)"):
    runs of one attack with other settings (an assumed rate, a learning rate) never share a row. Engine keys and
    the budget are left out (the budget has its own column); "" when nothing differs or nothing can be known."""
    if not isinstance(attack, dict) or not isinstance(attack.get("name"), str):
        return ""
    try:
        base = _attack_defaults(attack["name"])
    except Exception:
        return ""
    diff = [f"{k}={attack[k]}" for k in sorted(attack) if k not in ENGINE_KEYS and k in base and attack[k] != base[k]]
    return f" ({', '.join(diff)})" if diff else ""


def _cell_attack_variant(overrides: dict[str, Any]) -> str:
    """`attack_variant` of a grid cell that has not run yet: its attack overrides composed as dia.train does."""
    from dia.grid.sweep import format_value

    args = tuple(f"{k}={format_value(v)}" for k, v in overrides.items() if k == "attack" or k.startswith("attack."))
    return _composed_attack_variant(args) if any(a.startswith("attack.") for a in args) else ""


@functools.cache
def _composed_attack_variant(args: tuple[str, ...]) -> str:
    try:
        from omegaconf import OmegaConf

        from dia.config import compose

        return attack_variant(OmegaConf.to_container(compose(list(args)).attack))
    except Exception:
        return ""


def _group(
    groups: dict[tuple, Group],
    coords: tuple[str, str, float, str],
    defense: Defense,
    grid: str,
    budget: int | None,
    victims: str,
    steps: int = 1,
) -> Group:
    """The group of a run or cell: its data, model, rate and attack, its defense's label, its grid, budget, victims
    and the clients' local steps."""
    return groups.setdefault(
        (*coords, defense.label, grid, budget, victims, steps), Group(*coords, defense, grid, budget, victims, steps)
    )


def _cell_variant(overrides: dict[str, Any]) -> tuple[int | None, str, int]:
    """(budget, victim set, local steps) a grid cell that has not run yet will have: its overrides composed as dia.train does."""
    from dia.grid.sweep import format_value

    keys = [
        k
        for k in ("attack", "attack.max_iterations", "victims", "num_victims", "victim_seed", "client.local_steps")
        if k in overrides
    ]
    return _composed_variant(tuple(f"{k}={format_value(overrides[k])}" for k in keys))


@functools.cache
def _composed_variant(args: tuple[str, ...]) -> tuple[int | None, str, int]:
    try:
        from dia.config import compose

        cfg = compose(list(args))
        return (
            int(cfg.attack.max_iterations),
            victim_label(None if cfg.victims is None else list(cfg.victims), cfg.num_victims, cfg.victim_seed),
            int(cfg.client.local_steps),
        )
    except Exception:
        return None, "?", 1


def _cell_defense(overrides: dict[str, Any]) -> Defense:
    """The defense a grid cell that has not run yet will record: its defense overrides (and its attack, whose
    config holds model_defense's default), composed as dia.train does; none without any."""
    from dia.grid.sweep import format_value

    keys = [k for k in overrides if k == "defense" or k.startswith("defense.") or k == "attack.model_defense"]
    keys = ["attack"] * ("attack" in overrides and bool(keys)) + keys
    return _composed_defense(tuple(f"{k}={format_value(overrides[k])}" for k in keys))


@functools.cache
def _composed_defense(args: tuple[str, ...]) -> Defense:
    """`describe_defense` of what dia.defenses.summary records for these overrides (cached: grid cells share them)."""
    try:
        from dia.config import compose
        from dia.defenses import summary

        cfg = compose(list(args))
        return describe_defense(summary(cfg.defense, cfg.attack.model_defense))
    except Exception as exc:
        if args:
            raise ValueError(" ".join(str(exc).split())) from None
        return NONE


def walk(root: Path, names: set[str], skip: Path | None = None) -> list[Path]:
    """Regular files called one of `names` under `root`, in sorted order: an iterative walk (any depth) that
    does not follow links to folders and skips hidden folders (partial runs, reports being built) and `skip`."""
    found: list[Path] = []
    root = root.resolve()  # then every path below is resolved too (links to folders are not followed)
    stack = [root]
    skipped = str(skip) if skip is not None else None
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if not e.name.startswith(".") and e.path != skipped:
                        stack.append(Path(e.path))
                elif e.name in names and e.is_file():
                    found.append(Path(e.path))
            except OSError:
                continue
    return sorted(found)


def collect(root: Path, skip: Path | None = None) -> tuple[dict[tuple, Group], list[dict[str, Any]]]:
    """Groups of finished runs and the grids' missing cells under `root`."""
    if not root.is_dir():
        raise UserError(f"results dir '{root}' does not exist")
    groups: dict[tuple, Group] = {}
    runs: dict[Path, dict[str, Any]] = {}
    files = walk(root, {"metrics.json", "grid.json"}, skip)
    grids = {}  # grid folder -> its grid.json (name, cells)
    for gj in (f for f in files if f.name == "grid.json"):
        grids[gj.parent] = _grid_cells(gj)
    cell_overrides = {(where / c["id"]).resolve(): c["overrides"] for where, (_, cells) in grids.items() for c in cells}
    variants: dict[Path, tuple[int | None, str, int]] = {}
    for path in (f for f in files if f.name == "metrics.json"):
        folder = path.parent
        m = _read_metrics(path)
        if m is None:
            continue
        coords, defense = m.pop("key")
        variant = attack_variant(_config(folder).get("attack"))
        if variant:
            coords = (*coords[:3], coords[3] + variant)
            m["attack"] = coords[3]
        m["folder"] = folder
        m["grid"] = grids[folder.parent][0] if folder.parent in grids else ""
        budget, victims, steps = _run_variant(folder, m)
        if budget is None and folder.resolve() in cell_overrides:  # no config.yaml: the grid says what the cell is
            budget, victims, steps = _cell_variant(cell_overrides[folder.resolve()])
        variants[folder.resolve()] = budget, victims, steps
        runs[folder.resolve()] = m
        _group(groups, coords, defense, m["grid"], budget, victims, steps).runs.append(m)
    missing: list[dict[str, Any]] = []
    defaults = None
    for where, (name, cells) in grids.items():
        gj = where / "grid.json"
        if not cells:
            continue
        defaults = defaults or _defaults()
        for cell in cells:
            try:
                key = _coords(cell["overrides"], defaults)
                key = (*key[:3], key[3] + _cell_attack_variant(cell["overrides"]))
            except (TypeError, ValueError):
                warn(f"{gj}: cell {cell['index']} ({cell['id']}) has an unreadable model.dropout; skipped")
                continue
            folder = (where / cell["id"]).resolve()
            try:
                defense = (
                    describe_defense(runs[folder].get("defense"))
                    if folder in runs
                    else _cell_defense(cell["overrides"])
                )
            except (KeyError, TypeError, ValueError) as exc:
                warn(f"{gj}: cell {cell['index']} ({cell['id']}) has an unreadable defense ({str(exc)[:80]}); skipped")
                continue
            budget, victims, steps = variants[folder] if folder in runs else _cell_variant(cell["overrides"])
            group = _group(groups, key, defense, name, budget, victims, steps)
            group.expected += 1
            if folder not in runs:
                state = "partial" if (where / f".{cell['id']}.partial").is_dir() else "pending"
                entry = {
                    "grid": name,
                    "index": cell["index"],
                    "id": cell["id"],
                    "state": state,
                    "data": key[0],
                    "model": key[1],
                    "dropout": key[2],
                    "attack": key[3],
                    "defense": defense.label,
                    "budget": "" if budget is None else budget,
                    "victims": victims,
                    "steps": steps,
                    "file": cell.get("file", ""),
                }
                group.missing.append(entry)
                missing.append(entry)
    return groups, missing


def differing(groups: dict[tuple, Group]) -> list[str]:
    """Which of grid, budget, victim set and local steps T take more than one value among the groups (the columns to show)."""
    ordered = list(groups.values())
    return [
        k
        for k, get in (
            ("grid", lambda g: g.grid),
            ("budget", lambda g: g.budget),
            ("victims", lambda g: g.victims_set),
            ("steps", lambda g: g.steps),
        )
        if len({get(g) for g in ordered}) > 1
    ]


def _fmt(stats: tuple[float, float, int] | None, metric: str) -> str:
    if stats is None:
        return "—"
    digits = 2 if metric == "psnr" else 3 if metric != "mse" else 4
    return f"{stats[0]:.{digits}f} ± {stats[1]:.{digits}f}"


def _epsilon(eps: float | None) -> str:
    return "—" if eps is None else "∞" if math.isinf(eps) else f"{eps:.3g}"


def tables(groups: dict[tuple, Group], missing: list[dict[str, Any]]) -> tuple[str, str, str]:
    """table.md, table.csv and missing.csv: one row per data x model x rate x attack x defense.

    The markdown has its defense and ε columns only where some group is defended (reports of undefended
    results read as before); the CSV always has them (defense, epsilon), right after `attack`.
    """
    ordered = sorted(groups.values(), key=lambda g: g.key)
    defended = any(g.defense.label != "none" for g in ordered)  # every missing cell has its group
    vary = differing(groups)  # grid, budget, victim set: shown where they differ (always in the CSV)
    shown = (["defense", "ε"] if defended else []) + [
        {"grid": "grid", "budget": "budget", "victims": "victim set", "steps": "T"}[k] for k in vary
    ]
    head = ["data", "model", "p", "attack", *shown, "cells", "victims", "diverged"] + [
        f"{name} {arrow}" for _, name, arrow in _metrics()
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
        ]
        + [f"{m}_{s}" for m, _, _ in _metrics() for s in ("mean", "std", "n")]
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
                + [_fmt(g.stats(m), m) for m, _, _ in _metrics()]
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
        ]
        for m, _, _ in _metrics():
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
        ],
    )
    mw.writeheader()
    mw.writerows(missing)
    return "\n".join(text) + "\n", out.getvalue(), miss.getvalue()


def figures(groups: dict[tuple, Group], out: Path) -> list[Path]:
    """figures/<metric>_vs_dropout.png of the undefended groups (defended ones: `defense_figures`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vary = differing(groups)
    groups = {k: g for k, g in groups.items() if g.defense.label == "none"}
    panels = sorted(
        {(g.data, g.model) for g in groups.values() if g.runs},
        key=lambda p: (_rank("data", p[0]), _rank("model", p[1])),
    )
    attacks = sorted(
        {(g.attack, g.variant(vary)) for g in groups.values() if g.runs}, key=lambda a: (_rank("attack", a[0]), a[1])
    )
    written = []
    if not panels:
        return written
    out.mkdir(parents=True, exist_ok=True)
    for metric, name, arrow in _metrics():
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
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out / f"{metric}_vs_dropout.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _ssim_curve(folder: Path) -> dict[int, list[float]]:
    """{iteration: [eval/ssim of each group of problems]} from a run's curves.jsonl ({} without one;
    unreadable lines are skipped: curves are a picture, not a result)."""
    points: dict[int, list[float]] = {}
    path = folder / "curves.jsonl"
    if not path.is_file():
        return points
    try:
        lines = read_regular(path).decode("utf-8", errors="replace").splitlines()
    except OSError as exc:
        warn(f"{path} cannot be read ({exc}); its curve is skipped")
        return points
    for line in lines:
        try:
            row = json.loads(line)
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


def curve_figures(groups: dict[tuple, Group], out: Path) -> list[Path]:
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
    for data, model in sorted({k[:2] for k in curves}, key=lambda p: (_rank("data", p[0]), _rank("model", p[1]))):
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
                {k[3] for k in curves if k[:3] == (data, model, rate)}, key=lambda a: (_rank("attack", a[0]), a[1])
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
        axes.flat[0].legend(fontsize=7)
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


def defense_figures(groups: dict[tuple, Group], out: Path) -> list[Path]:
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
        attacks = sorted({r["attack"] for r in mine}, key=lambda a: _rank("attack", a))
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        colors = {a: cycle[i % len(cycle)] for i, a in enumerate(dict.fromkeys(a.split(" ")[0] for a in attacks))}
        for metric, name, arrow in _metrics()[:3]:
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
            fig.legend(handles.values(), handles.keys(), loc="upper right", fontsize=7, ncol=len(handles))
            fig.suptitle(f"{data} / {model}: {name} against defense strength", fontsize=10, x=0.3)
            fig.tight_layout(rect=(0, 0, 1, 0.98))
            path = out / f"defense_{metric}_{data}_{model}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def montage_figure(run: dict[str, Any], max_victims: int = 16) -> Any:
    """The montage of a run as a matplotlib Figure (None when its reconstructions.pt is missing or unreadable):
    originals above reconstructions, each with its SSIM, under a title the figure is wide enough to show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    tensors_file = Path(run["folder"]) / "reconstructions.pt"
    if not tensors_file.is_file():
        return None
    try:
        with io.BytesIO(read_regular(tensors_file)) as f:
            t = torch.load(f, map_location="cpu", weights_only=True)
        orig, rec = t["originals"][:max_victims], t["reconstructions"][:max_victims]
        if orig.dim() != 4 or orig.shape != rec.shape or orig.shape[1] not in (1, 3):
            raise ValueError(f"tensors of shapes {tuple(orig.shape)} and {tuple(rec.shape)}")
    except Exception as exc:
        warn(
            f"{tensors_file} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}); montage skipped"
        )
        return None
    n = orig.shape[0]
    steps = run["client"].get("local_steps", 1) if isinstance(run.get("client"), dict) else 1
    title = (
        f"{run['attack'].upper()} on {run['model']}/{run['data']}, p={run['dropout']:g}"
        + (f", T={steps}" if steps != 1 else "")
        + f"  ({Path(run['folder']).name})"
    )
    width = max(
        1.3 * n + 0.4, 0.075 * len(title) + 0.6
    )  # a few victims: as wide as the title (9 pt: ~0.075 in a character)
    fig, axes = plt.subplots(2, n, figsize=(width, 3.0), squeeze=False)
    for i in range(n):
        for row, img in enumerate((orig[i], rec[i])):
            ax = axes[row][i]
            x = img.clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(x[..., 0] if x.shape[2] == 1 else x, cmap="gray" if x.shape[2] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        v = run["victims"][i] if i < len(run["victims"]) else {}
        ssim = v.get("ssim")
        axes[1][i].set_xlabel(f"SSIM {ssim:.2f}" if isinstance(ssim, (int, float)) else "", fontsize=7)
    axes[0][0].set_ylabel("original", fontsize=8)
    axes[1][0].set_ylabel("reconstr.", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def montage(run: dict[str, Any], path: Path, max_victims: int = 16) -> Path | None:
    """montages/<run>.png (see `montage_figure`)."""
    import matplotlib.pyplot as plt

    fig = montage_figure(run, max_victims)
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build(root: Path, out: Path | None = None, montages: bool = True) -> dict[str, Any]:
    """Write the report to `out` (default RESULTS/report) atomically: built in a hidden folder beside it, then swapped in."""
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
