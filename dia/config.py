"""Configuration: a typed schema, the `configs/` tree, and `group=choice key=value` command-line overrides.

`configs/config.yaml` holds the top-level defaults and the default choice of each group;
`configs/<group>/<choice>.yaml` holds one choice. The `name` inside a group file picks the code (and the
schema) from that group's registry, so e.g. a `configs/model/vit_wide.yaml` with `name: vit` is a new
choice without new code. Every value is validated; problems surface as one-line `UserError`s.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import StringNode

from dia.attacks import ATTACKS
from dia.attacks.dia import MASK_PARAMS
from dia.attacks.ig import INITS
from dia.data import SOURCES, DataConfig
from dia.defenses import DEFENSES, check_defense, stage_names
from dia.errors import UserError, did_you_mean
from dia.models import MODELS
from dia.registry import Registry
from dia.grid.sweep import AUTO_CELL, cell_id


@dataclass
class RunConfig:
    seed: int = 0  # seeds model weights, client dropout, attack initialisation
    output_dir: str = "runs"  # each run writes runs/<attack>-<model>-<data>-p<rate>-<id>/ under it
    name: Optional[str] = None  # folder name instead of the generated one; auto-cell: the grid cell id of the overrides
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    save_tensors: bool = True
    progress: bool = True  # progress bar
    checkpoint_every: int = 500  # iterations between saves of the attack state (0: only on SIGUSR1/SIGTERM; -1: never)
    compile_cache: Optional[str] = None  # torch.compile's persistent cache: a folder, off, or null (<output_dir>/.compile-cache)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "dia"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class MetricsConfig:
    lpips: str = "auto"  # auto (AlexNet LPIPS; null with one warning when its weights cannot be had) | off
    curves_ssim: bool = True  # curves.jsonl (and W&B) get eval/ssim of the best iterates every attack.log_every iterations


@dataclass
class Config:
    attack: Any = None
    model: Any = None
    data: Any = None
    defense: Any = None
    victims: Optional[List[int]] = None  # explicit victim indices; None: use num_victims
    num_victims: int = 4  # without `victims`: the first N, or N drawn with victim_seed
    victim_seed: Optional[int] = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    batch_size: int = 1  # victims per client batch: one shared gradient comes from B images
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


GROUPS: dict[str, Registry | None] = {"attack": ATTACKS, "model": MODELS, "data": None, "defense": DEFENSES}
LIST_GROUPS = {"defense": "none"}  # groups whose choice may be a list applied in order (defense=[prune,dpsgd]): their default
WANDB_MODES = ("offline", "online", "disabled")


def config_dir() -> Path:
    """The `configs/` tree: $DIA_CONFIG_DIR, else the one beside the package (a source checkout)."""
    env = os.environ.get("DIA_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "configs"
    if not (path / "config.yaml").is_file():
        raise UserError(f"configs: no config.yaml in '{path}'; set DIA_CONFIG_DIR to the configs/ folder of a dia checkout")
    return path


def choices(group: str, root: Path | None = None) -> list[str]:
    root = root or config_dir()
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - malformed YAML is an input problem
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path}: expected a mapping of keys to values")
    try:
        OmegaConf.resolve(cfg)  # interpolations (${...}, ${oc.env:...}) once, here: a cycle or unset variable is one line
    except OmegaConfBaseException as exc:
        raise UserError(f"{path}: cannot resolve an interpolation ({str(exc).splitlines()[0]})") from None
    return cfg


def _schema(group: str, name: Any) -> type:
    registry = GROUPS[group]
    if registry is None:
        return DataConfig
    entry = registry.entry(str(name))
    assert entry.schema is not None
    return entry.schema


def _typed_group(group: str, node: Any, where: str) -> DictConfig:
    """Validate one group's node against the schema its `name` selects."""
    if not isinstance(node, DictConfig) or "name" not in node:
        raise UserError(f"{where}: the {group} section needs a 'name'")
    typed = OmegaConf.structured(_schema(group, node.name))
    for key in node:
        _set(typed, f"{group}.{key}", node[key], root_prefix=group)
    return typed


def _parse(dotted: str, text: str, node: Any) -> Any:
    """Command-line text for one key: kept as it is for a string key (`run.name=007` is '007', surrounding quotes
    removed: `data.root="a b"` is 'a b'; `null` is None where allowed), else parsed as YAML."""
    if isinstance(node, StringNode) and not (text == "null" and node._is_optional()):
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            try:
                unquoted = yaml.safe_load(text)
            except yaml.YAMLError:
                return text
            return unquoted if isinstance(unquoted, str) else text
        return text
    try:
        value = OmegaConf.from_dotlist([f"v={text}"])["v"]
    except Exception:  # noqa: BLE001 - the parser's errors are many; all mean the same here
        raise UserError(f"{dotted}: cannot parse value '{text}'") from None
    return value


def _set(cfg: DictConfig, dotted: str, value: Any, root_prefix: str = "", *, text: bool = False) -> None:
    """Set one dotted key on a config, recursing into sections, translating OmegaConf's errors into one line.

    The one merge of the module: a section value (a DictConfig) is merged key by key into the section it
    names. With `text`, `value` is command-line text, parsed by the key's type (`_parse`).
    """
    key = dotted[len(root_prefix) + 1:] if root_prefix else dotted
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        node = parent if isinstance(parent, DictConfig) else cfg
        valid = sorted(str(k) for k in node.keys())
        here = f"{dotted.rpartition('.')[0]}." if "." in dotted else ""
        hint = did_you_mean(leaf, valid).replace("'", f"'{here}", 1) if did_you_mean(leaf, valid) else ""
        raise UserError(f"unknown key '{dotted}'{hint}; valid keys here: {', '.join(valid)}")
    if text:
        value = _parse(dotted, value, parent._get_node(leaf))
    try:
        if isinstance(value, DictConfig) and isinstance(parent[leaf], DictConfig):
            for sub in value:
                _set(parent[leaf], f"{dotted}.{sub}", value[sub], root_prefix=dotted)
        else:
            if isinstance(parent[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # `model.dropout=0` means 0.0
            parent[leaf] = value
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        raise UserError(f"{dotted}: invalid value {value!r} ({msg})") from None


def parse_args(args: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Split `group=choice` selections from dotted `key=value` overrides (their text, parsed by `_set`)."""
    selections: dict[str, str] = {}
    overrides: list[tuple[str, str]] = []
    for arg in args:
        if "=" not in arg:
            raise UserError(f"argument '{arg}' is not key=value; see --help")
        key, raw = arg.split("=", 1)
        if not key:
            raise UserError(f"argument '{arg}' has no key; see --help")
        if key in GROUPS:
            selections[key] = raw
        else:
            overrides.append((key, raw))
    return selections, overrides


def compose(args: list[str], *, base: Path | None = None) -> DictConfig:
    """The validated config for command-line `args`, starting from the defaults or a saved config `base`.

    `run.name=auto-cell` names the run with the grid cell id of the other arguments (`dia.grid.sweep.cell_id`),
    so a W&B agent's run and dia.grid's run of the same cell share a folder.
    """
    selections, overrides = parse_args(args)
    cfg = OmegaConf.structured(Config)
    if base is not None:
        if not base.is_file():
            raise UserError(f"--config: no such file '{base}'")
        start = _load_yaml(base)
        defaults: dict[str, Any] = {}
    else:
        root = config_dir()
        start = _load_yaml(root / "config.yaml")
        defaults = dict(start.pop("defaults", {}) or {})
    for group in GROUPS:
        if group in selections or base is None:
            root = config_dir()
            choice = selections.get(group, defaults.get(group, LIST_GROUPS.get(group)))
            node, where = _load_choice(group, choice, root)
        else:
            node = start.get(group, OmegaConf.create({"name": LIST_GROUPS[group]}) if group in LIST_GROUPS else None)
            where = str(base)
        cfg[group] = _typed_group(group, node, where)
    for key in list(start.keys()):  # top-level values; a group section here overrides the group file
        if base is None or key not in GROUPS:
            _set(cfg, str(key), start[key])
    OmegaConf.set_struct(cfg, True)
    for key, raw in overrides:
        _set(cfg, key, raw, text=True)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise UserError(f"the command line: cannot resolve an interpolation ({str(exc).splitlines()[0]})") from None
    if cfg.run.name == AUTO_CELL:
        cfg.run.name = cell_id(dict(a.split("=", 1) for a in args))
    validate(cfg)
    check_defense(cfg.defense)
    return cfg


def _load_choice(group: str, choice: Any, root: Path) -> tuple[DictConfig, str]:
    """A group's choice file; for LIST_GROUPS a list `[a,b]` or `a+b` of choices, merged (name 'a+b')."""
    valid = choices(group, root)
    names = stage_names(choice) if group in LIST_GROUPS else [choice]
    for name in names:
        if name not in valid:
            raise UserError(f"unknown {group} '{name}'{did_you_mean(str(name), valid)}; choose one of: {', '.join(valid)}")
    nodes = [_load_yaml(root / group / f"{name}.yaml") for name in names]
    where = ", ".join(str(root / group / f"{name}.yaml") for name in names)
    if len(nodes) == 1:
        return nodes[0], where
    merged = OmegaConf.merge(*nodes)
    merged.name = "+".join(str(n.get("name", name)) for n, name in zip(nodes, names))
    return merged, where


Check = tuple[str, Callable[[Any], bool], str]
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range
BIG = 10**9  # an upper bound for counts (iterations, patience, ...): larger is a typo, not a plan
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


def _count(lo: int = 1, hi: int = BIG) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


CHECKS: list[Check] = [
    ("model.dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("model.attn_dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("model.drop_path", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    *[(f"model.{k}", _count(1, 10**6), "must be a positive integer (at most 1000000)")
      for k in ("width", "depth", "patch_size", "dim", "heads", "mlp_dim", "dim_head", "conv1", "conv2", "kernel")],
    ("model.hidden", lambda v: all(isinstance(h, int) and 1 <= h <= 10**6 for h in v), "must be positive integers"),
    ("attack.max_iterations", _count(), f"must be a positive integer (at most {BIG})"),
    ("attack.lr", lambda v: 0 < v < float("inf"), "must be > 0"),
    ("attack.tv_weight", lambda v: 0 <= v < float("inf"), "must be >= 0"),
    ("attack.lr_factor", lambda v: 0 < v < 1, "must be in (0, 1)"),
    ("attack.lr_patience", _count(0), f"must be an integer in 0..{BIG}"),
    ("attack.early_stop_patience", _count(), f"must be a positive integer (at most {BIG})"),
    ("attack.loss_threshold", lambda v: 0 <= v < float("inf"), "must be >= 0"),
    ("attack.check_every", _count(), f"must be a positive integer (at most {BIG})"),
    ("attack.labels", lambda v: v in ("known", "infer"), "must be known or infer"),
    ("attack.compile", lambda v: v in ("auto", True, False), "must be true, false or auto"),
    ("attack.compile_mode", lambda v: v in COMPILE_MODES, f"must be one of: {', '.join(COMPILE_MODES)}"),
    ("attack.matmul_precision", lambda v: v in ("highest", "high", "medium"), "must be highest, high or medium"),
    ("attack.iterations_per_step", _count(), f"must be a positive integer (at most {BIG})"),
    ("attack.log_every", _count(), f"must be a positive integer (at most {BIG})"),
    ("attack.init", lambda v: v in INITS, f"must be one of: {', '.join(INITS)}"),
    ("attack.mask_param", lambda v: v in MASK_PARAMS, f"must be one of: {', '.join(MASK_PARAMS)}"),
    ("attack.mask_weight", lambda v: 0 <= v < float("inf"), "must be >= 0"),
    ("attack.parallel", lambda v: v == "auto" or _count()(v), "must be a positive integer or auto"),
    ("data.source", lambda v: v in SOURCES, f"must be one of: {', '.join(SOURCES.names())}"),
    ("data.image_size", _count(1, 10**5), "must be a positive integer (at most 100000)"),
    ("data.normalize", lambda v: v in ("dataset", "folder"), "must be dataset or folder"),
    ("data.channels", _count(1, 4096), "must be a positive integer"),
    ("data.num_classes", _count(2, 10**7), "must be an integer > 1"),
    ("batch_size", _count(1, 10**6), "must be a positive integer"),
    ("num_victims", _count(1, 10**7), "must be a positive integer"),
    ("victims", lambda v: all(isinstance(i, int) and 0 <= i < 2**63 for i in v), "must be a list of indices >= 0"),
    ("victim_seed", _count(0, MAX_SEED), f"must be an integer in 0..{MAX_SEED}"),
    ("run.seed", _count(0, MAX_SEED), f"must be an integer in 0..{MAX_SEED}"),
    ("run.checkpoint_every", _count(-1), f"must be an integer in -1..{BIG}"),
    ("run.device", lambda v: DEVICE.fullmatch(str(v)) is not None, "must be auto, cpu, mps, cuda or cuda:N"),
    ("metrics.lpips", lambda v: v in ("auto", "off"), "must be auto or off"),
    ("logger.wandb.mode", lambda v: v in WANDB_MODES, f"must be one of: {', '.join(WANDB_MODES)}"),
]
MAX_NAME = 128


def check_name(name: str, key: str = "run.name") -> None:
    """A run name is one folder name: no separators, not absolute, not . or .., no leading dot, printable, short."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{key}: must be a non-empty name")
    if len(name) > MAX_NAME:
        raise UserError(f"{key}: {len(name)} characters; at most {MAX_NAME}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UserError(f"{key}={name!r}: control characters are not allowed in a folder name")
    if "/" in name or "\\" in name or os.sep in name or os.path.isabs(name):
        raise UserError(f"{key}={name!r}: must be a folder name, not a path (no '/'); set run.output_dir for the parent folder")
    if name.startswith("."):
        raise UserError(f"{key}={name!r}: must not start with '.' (hidden and in-progress folders do)")


def validate(cfg: DictConfig) -> None:
    """Ranges, types, names and devices: everything that needs no model and no data (see `dia.run.checks`)."""
    for key, ok, rule in CHECKS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not ok(value):
            raise UserError(f"{key}={value!r}: {rule}")
    if cfg.run.name is not None:
        check_name(cfg.run.name)
    for key in ("mean", "std"):
        if len(cfg.data[key]) != cfg.data.channels:
            raise UserError(f"data.{key} has {len(cfg.data[key])} values but data.channels={cfg.data.channels}")
    if cfg.data.normalize == "folder" and cfg.data.source != "imagefolder":
        raise UserError(f"data.normalize=folder needs data.source=imagefolder (got {cfg.data.source})")
    if any(s <= 0 for s in cfg.data.std):
        raise UserError("data.std: every value must be > 0")
    if cfg.attack.labels == "infer" and cfg.batch_size != 1:
        raise UserError(f"attack.labels=infer supports batch_size=1 only (the last-layer sign rule); got batch_size={cfg.batch_size}")
    model = cfg.model
    if "patch_size" in model and cfg.data.image_size % model.patch_size:
        raise UserError(f"model.patch_size={model.patch_size} does not divide data.image_size={cfg.data.image_size}")
    if "heads" in model and model.get("dim_head") is None and model.dim % model.heads:
        raise UserError(f"model.heads={model.heads} does not divide model.dim={model.dim}")


def help_text(args: list[str]) -> str:
    """Groups with their choices, then every key with its value under the current selection."""
    root = config_dir()
    defaults = dict(_load_yaml(root / "config.yaml").get("defaults", {}) or {})
    try:
        cfg = compose(args)
    except UserError:
        cfg = compose([])
    lines = [
        "usage: python -m dia.train [group=choice ...] [key=value ...] [--config FILE] [--describe-model]",
        "",
        "Reconstruct client images from a dropout-perturbed gradient with IG, WIIG or DIA.",
        "",
        "groups (default first):",
    ]
    for group in GROUPS:
        opts = choices(group, root)
        d = defaults.get(group)
        ordered = [d] + [o for o in opts if o != d] if d in opts else opts
        lines.append(f"  {group:<8} {', '.join(ordered)}")
    lines += ["", "keys (with their values for this selection; set with key=value):"]
    for key, value in _flatten(OmegaConf.to_container(cfg)):
        lines.append(f"  {key} = {value}")
    lines += [
        "",
        "options:",
        "  --config FILE     start from a saved config.yaml (e.g. to rerun a run exactly)",
        "  --describe-model  list the model's dropout sites (name, p, mask shape) and exit",
        "  -h, --help        this text",
    ]
    return "\n".join(lines)


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k)) if isinstance(v, dict) else [(f"{prefix}.{k}" if prefix else str(k), v)]
        return out
    return [(prefix, node)]
