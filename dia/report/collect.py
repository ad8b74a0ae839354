"""Reading results for the report: every run folder's metrics.json and config.yaml (dia.run.record), every grid's
grid.json (the cells it expects), grouped into rows of runs that may be pooled.

A row is one dataset x model x dropout rate x attack (with its settings) x defense x grid x budget x victim set
x local steps x model weights (run.seed, or model.checkpoint) x batch size B: runs that differ in any of these
never pool (results at other weights are not like for like: docs/results.md). Files that are not dia's are
skipped with one warning; folders are walked without following links.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dia.config import compose, group_settings
from dia.config.ids import format_value
from dia.errors import UserError
from dia.files import read_json
from dia.run import record

ORDER = {
    "data": ["mnist", "cifar10", "imagenet"],
    "model": ["mlp", "cnn", "vit", "vit_b16"],
    "attack": ["ig", "wiig", "dia"],
}


def metric_columns() -> list[tuple[str, str, str]]:
    """(key, label, arrow) of the table's metric columns: dia.metrics.METRICS, the one metric table."""
    from dia.metrics import METRICS as TABLE

    return [(m.key, m.label, m.arrow) for m in TABLE if m.column]


def rank(kind: str, value: Any) -> tuple:
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
class Row:
    data: str
    model: str
    dropout: float
    attack: str
    defense: Defense = NONE  # what the clients sent: runs with different defenses never share a group
    grid: str = ""  # the grid (grid.json folder) its runs lie in; "" for runs outside any grid
    budget: int | None = None  # attack.max_iterations (None: unknown)
    victims_set: str = ""  # which victims (`victim_label`)
    steps: int = 1  # the clients' local steps T (client.local_steps; 1: FedSGD)
    weights: str = ""  # the model's weights: 'seed N' (random, seeded by run.seed) or 'checkpoint NAME'; '?' unknown
    batch: int = 1  # B: victims behind one gradient (batch_size)
    runs: list[dict[str, Any]] = field(default_factory=list)
    expected: int = 0  # cells a grid expects (0: no grid.json knows this group)
    missing: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        d = self.defense
        return (
            rank("data", self.data),
            rank("model", self.model),
            self.grid,
            -1 if self.budget is None else self.budget,
            self.victims_set,
            self.steps,
            self.weights,
            self.batch,
            self.dropout,
            rank("attack", self.attack),
            d.kind != "none",
            d.kind.count("+"),
            d.kind,
            d.strength,
            d.label,
        )

    def variant(self, shown: list[str]) -> str:
        """The group's grid, budget, victim set, local steps, weights and batch size where they differ between groups
        (`shown`), for labels."""
        parts = {
            "grid": self.grid or "no grid",
            "budget": f"{self.budget} it" if self.budget is not None else "? it",
            "victims": f"victims {self.victims_set}",
            "steps": f"T={self.steps}",
            "weights": self.weights or "weights ?",
            "batch": f"B={self.batch}",
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
        cfg = compose([])
        return {"data": cfg.data.name, "model": cfg.model.name, "dropout": cfg.model.dropout, "attack": cfg.attack.name}
    except Exception:
        return {"data": "mnist", "model": "mlp", "dropout": 0.25, "attack": "dia"}


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _read_metrics(path: Path) -> dict[str, Any] | None:
    """A run's metrics.json (dia.run.record), or None (with one warning) when it is not one dia wrote."""
    try:
        m = record.read_metrics(path)
        key = (m["data"], m["model"], m["dropout"], m["attack"]), describe_defense(m.get("defense"))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        warn(f"{path} is not a dia metrics.json ({type(exc).__name__}: {str(exc)[:80]}); run skipped")
        return None
    m["key"] = key
    return m


def _grid_cells(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """A grid.json's name and its well-formed cells; a broken grid.json or cell is skipped with one warning."""
    try:
        spec = read_json(path)  # grid.json: dia.grid's
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
    try:
        return record.read_config(folder)
    except ValueError:
        warn(f"{folder / record.CONFIG} cannot be read; its budget and victim set are taken from metrics.json")
        return {}


def victim_label(victims: Any, count: Any, seed: Any) -> str:
    """Which victims a run attacks, as a short label: '0-3' (the first four, or that list), '0,5,9', '16 drawn (seed
    1)'."""
    if isinstance(victims, list) and victims and all(isinstance(v, int) for v in victims):
        if victims == list(range(victims[0], victims[0] + len(victims))):
            return f"{victims[0]}-{victims[-1]}" if len(victims) > 1 else str(victims[0])
        text = ",".join(map(str, victims))
        return text if len(text) <= 24 else f"{len(victims)} listed (#{hashlib.sha1(text.encode()).hexdigest()[:6]})"
    if isinstance(count, int) and count > 0:
        return f"0-{count - 1}" if seed is None else f"{count} drawn (seed {seed})"
    return "?"


class Variant(NamedTuple):
    """What besides its coordinates, attack and defense makes a run comparable with another (the rest of a row's
    key)."""

    budget: int | None  # attack.max_iterations
    victims: str  # `victim_label`
    steps: int  # client.local_steps
    weights: str  # `weights_label`
    batch: int  # batch_size


def weights_label(seed: Any, checkpoint: Any) -> str:
    """The model's weights: 'checkpoint NAME' when loaded from one, else 'seed N' (random, seeded by run.seed);
    '?' when nobody says."""
    if isinstance(checkpoint, str) and checkpoint:
        return f"checkpoint {Path(checkpoint).name}"
    return f"seed {seed}" if isinstance(seed, int) and not isinstance(seed, bool) else "?"


def _count(value: Any, default: int = 1) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _run_variant(folder: Path, m: dict[str, Any]) -> Variant:
    """A run's `Variant`: from its config.yaml, else from what metrics.json says."""
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
    # a key a config.yaml lacks has dia.train's default (every config.yaml dia.train writes has them all)
    run, model = (cfg.get(k) if isinstance(cfg.get(k), dict) else {} for k in ("run", "model"))
    weights = weights_label(run.get("seed", 0), model.get("checkpoint")) if cfg else "?"
    clients = [v.get("problem") for v in m["victims"] if isinstance(v, dict)]
    batch = _count(cfg.get("batch_size", 1)) if cfg else max(1, len(clients) // max(1, len(set(clients))))
    return Variant(budget, label, _count(steps), weights, batch)


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

    args = tuple(f"{k}={format_value(v)}" for k, v in overrides.items() if k == "attack" or k.startswith("attack."))
    return _composed_attack_variant(args) if any(a.startswith("attack.") for a in args) else ""


@functools.cache
def _composed_attack_variant(args: tuple[str, ...]) -> str:
    try:
        from omegaconf import OmegaConf

        return attack_variant(OmegaConf.to_container(compose(list(args)).attack))
    except Exception:
        return ""


def _row(
    groups: dict[tuple, Row], coords: tuple[str, str, float, str], defense: Defense, grid: str, variant: Variant
) -> Row:
    """The group of a run or cell: its data, model, rate and attack, its defense's label, its grid and `Variant`."""
    return groups.setdefault((*coords, defense.label, grid, *variant), Row(*coords, defense, grid, *variant))


VARIANT_KEYS = (
    "attack",
    "attack.max_iterations",
    "victims",
    "num_victims",
    "victim_seed",
    "client.local_steps",
    "run.seed",
    "model.checkpoint",
    "batch_size",
)


def _cell_variant(overrides: dict[str, Any]) -> Variant:
    """The `Variant` a grid cell that has not run yet will have: its overrides composed as dia.train does."""
    keys = [k for k in VARIANT_KEYS if k in overrides]
    return _composed_variant(tuple(f"{k}={format_value(overrides[k])}" for k in keys))


@functools.cache
def _composed_variant(args: tuple[str, ...]) -> Variant:
    try:
        cfg = compose(list(args), code_checks=False)
        return Variant(
            int(cfg.attack.max_iterations),
            victim_label(None if cfg.victims is None else list(cfg.victims), cfg.num_victims, cfg.victim_seed),
            int(cfg.client.local_steps),
            weights_label(int(cfg.run.seed), cfg.model.checkpoint),
            int(cfg.batch_size),
        )
    except Exception:
        return Variant(None, "?", 1, "?", 1)


def _cell_defense(overrides: dict[str, Any]) -> Defense:
    """The defense a grid cell that has not run yet will record: its defense overrides (and its attack, whose
    config holds model_defense's default), composed as dia.train does; none without any."""

    keys = [k for k in overrides if k == "defense" or k.startswith("defense.") or k == "attack.model_defense"]
    keys = ["attack"] * ("attack" in overrides and bool(keys)) + keys
    return _composed_defense(tuple(f"{k}={format_value(overrides[k])}" for k in keys))


@functools.cache
def _composed_defense(args: tuple[str, ...]) -> Defense:
    """`describe_defense` of what dia.defenses.summary records for these overrides (cached: grid cells share them)."""
    try:
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


def collect(root: Path, skip: Path | None = None) -> tuple[dict[tuple, Row], list[dict[str, Any]]]:
    """Groups of finished runs and the grids' missing cells under `root`."""
    if not root.is_dir():
        raise UserError(f"results dir '{root}' does not exist")
    groups: dict[tuple, Row] = {}
    runs: dict[Path, dict[str, Any]] = {}
    files = walk(root, {record.METRICS, "grid.json"}, skip)
    grids = {}  # grid folder -> its grid.json (name, cells)
    for gj in (f for f in files if f.name == "grid.json"):
        grids[gj.parent] = _grid_cells(gj)
    cell_overrides = {(where / c["id"]).resolve(): c["overrides"] for where, (_, cells) in grids.items() for c in cells}
    variants: dict[Path, Variant] = {}
    for path in (f for f in files if f.name == record.METRICS):
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
        variant = _run_variant(folder, m)
        if variant.budget is None and folder.resolve() in cell_overrides:  # no config.yaml: the grid says what it is
            variant = _cell_variant(cell_overrides[folder.resolve()])
        variants[folder.resolve()] = variant
        runs[folder.resolve()] = m
        _row(groups, coords, defense, m["grid"], variant).runs.append(m)
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
            variant = variants[folder] if folder in runs else _cell_variant(cell["overrides"])
            group = _row(groups, key, defense, name, variant)
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
                    "budget": "" if variant.budget is None else variant.budget,
                    "victims": variant.victims,
                    "steps": variant.steps,
                    "weights": variant.weights,
                    "batch": variant.batch,
                    "file": cell.get("file", ""),
                }
                group.missing.append(entry)
                missing.append(entry)
    return groups, missing


def differing(groups: dict[tuple, Row]) -> list[str]:
    """Which of grid, budget, victim set, local steps T, weights and batch size B take more than one value among the
    groups (the columns to show)."""
    ordered = list(groups.values())
    return [
        k
        for k, get in (
            ("grid", lambda g: g.grid),
            ("budget", lambda g: g.budget),
            ("victims", lambda g: g.victims_set),
            ("steps", lambda g: g.steps),
            ("weights", lambda g: g.weights),
            ("batch", lambda g: g.batch),
        )
        if len({get(g) for g in ordered}) > 1
    ]
