"""Configuration: the `configs/` tree, `group=choice key=value` command-line overrides, validation, help.

`configs/config.yaml` holds the top-level defaults and the default choice of each group;
`configs/<group>/<choice>.yaml` holds one choice. The `name` inside a group file picks the code, and the
YAML of that name (`configs/<group>/<name>.yaml`) lists the code's own settings with their defaults
(dia.config.schema), so e.g. a `configs/model/vit_wide.yaml` with `name: vit` is a new choice without new
code. Every value is validated; problems surface as one-line `UserError`s.

Composing a config imports neither torch nor Lightning (`--help` is instant). Checks that need the code
(an attack's own settings, a defense composition, a data source) run in `check_code`, which `compose` calls
unless asked not to.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import StringNode

from dia.config.ids import AUTO_CELL, cell_id, format_value
from dia.config.schema import GROUPS, LIST_GROUPS, NAMED_SECTIONS, Config, schema, setting_doc
from dia.errors import UserError, did_you_mean

WANDB_MODES = ("offline", "online", "disabled")


def config_dir() -> Path:
    """The `configs/` tree: $DIA_CONFIG_DIR, else the one shipped inside the package (a wheel install), else
    the one beside the package (a source checkout)."""
    env = os.environ.get("DIA_CONFIG_DIR")
    here = Path(__file__).resolve().parent.parent  # the dia package
    path = (
        Path(env)
        if env
        else next((p for p in (here / "configs", here.parent / "configs") if p.is_dir()), here / "configs")
    )
    if not (path / "config.yaml").is_file():
        raise UserError(f"configs: no config.yaml in '{path}'; set DIA_CONFIG_DIR to a dia configs/ folder")
    return path


def choices(group: str, root: Path | None = None) -> list[str]:
    root = root or config_dir()
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path}: expected a mapping of keys to values")
    try:
        OmegaConf.resolve(
            cfg
        )  # interpolations (${...}, ${oc.env:...}) once, here: a cycle or unset variable is one line
    except OmegaConfBaseException as exc:
        raise UserError(f"{path}: cannot resolve an interpolation ({str(exc).splitlines()[0]})") from None
    return cfg


def stage_names(name: Any) -> list[str]:
    """A list-group choice as its stages, in application order: 'prune+dpsgd', '[prune,dpsgd]' or
    ['prune', 'dpsgd'] -> ['prune', 'dpsgd']."""
    if isinstance(name, str):
        return [p.strip() for p in name.strip().strip("[]").replace("+", ",").split(",") if p.strip()] or [name]
    return [str(p) for p in name]


# Choices registered by code (an attack class a notebook or test defined, without a YAML of its own): group ->
# name -> the names whose YAML gives its settings, nearest first. Filled from above (dia.attacks.register):
# config never imports the code.
_REGISTERED: dict[str, dict[str, list[str]]] = {}
# Checks that need a choice's code (an attack's own settings, a model, a data source, a defense composition):
# group -> check(cfg), registered by the package that has the code when it is imported (`check_code`).
_CODE_CHECKS: dict[str, Callable[[DictConfig], None]] = {}


def register_choice(group: str, name: str, *, settings_of: list[str]) -> None:
    """Make `name` a choice of `group` in this process; its settings are the YAML of the first of
    `settings_of` that has one (its own name first)."""
    _REGISTERED.setdefault(group, {})[name] = list(settings_of)


def unregister_choice(group: str, name: str) -> None:
    _REGISTERED.get(group, {}).pop(name, None)


def register_check(group: str, check: Callable[[DictConfig], None]) -> None:
    """Run `check(cfg)` (a one-line UserError for bad settings) in `check_code` for every config."""
    _CODE_CHECKS[group] = check


def _registered(group: str, name: str) -> bool:
    """Whether `name` is a choice registered in this process (`register_choice`)."""
    return name in _REGISTERED.get(group, {})


def _setting_files(group: str, name: str, root: Path) -> list[Path]:
    """The YAML files that give the settings of the code `name` of `group`: its own (every stage's, for a
    composition); for an attack registered in this process without a YAML, that of the nearest base class that
    has one (a subclass of DIA has DIA's)."""
    stages = stage_names(name) if group in LIST_GROUPS else [name]
    if not (root / group / f"{name}.yaml").is_file() and _registered(group, name):
        stages = [next((n for n in _REGISTERED[group][name] if (root / group / f"{n}.yaml").is_file()), name)]
    return [root / group / f"{stage}.yaml" for stage in stages if (root / group / f"{stage}.yaml").is_file()]


def _defaults(group: str, name: str, root: Path) -> dict[str, Any]:
    """The settings of the code `name` of `group`, with their defaults (`_setting_files`), as plain data; {} when
    it has none."""
    out: dict[str, Any] = {}
    for path in _setting_files(group, name, root):
        out.update(OmegaConf.to_container(_load_yaml(path), resolve=True))
    out.pop("name", None)
    return out


def _typed_group(group: str, node: Any, where: str, root: Path) -> DictConfig:
    """One group's node, typed by the schema its `name` selects (dia.config.schema)."""
    if not isinstance(node, DictConfig) or "name" not in node:
        raise UserError(f"{where}: the {group} section needs a 'name'")
    name = str(node.name)
    defaults = _defaults(group, name, root) or OmegaConf.to_container(node, resolve=True)
    typed = OmegaConf.structured(schema(group, name, defaults | {"name": name}))
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
    except Exception:
        raise UserError(f"{dotted}: cannot parse value '{text}'") from None
    return value


def _set(cfg: DictConfig, dotted: str, value: Any, root_prefix: str = "", *, text: bool = False) -> None:
    """Set one dotted key on a config, recursing into sections, translating OmegaConf's errors into one line.

    The one merge of the module: a section value (a DictConfig) is merged key by key into the section it
    names. With `text`, `value` is command-line text, parsed by the key's type (`_parse`).
    """
    key = dotted[len(root_prefix) + 1 :] if root_prefix else dotted
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        node = parent if isinstance(parent, DictConfig) else cfg
        valid = sorted(str(k) for k in node)
        here = f"{dotted.rpartition('.')[0]}." if "." in dotted else ""
        hint = did_you_mean(leaf, valid).replace("'", f"'{here}", 1) if did_you_mean(leaf, valid) else ""
        raise UserError(f"unknown key '{dotted}'{hint}; valid keys here: {', '.join(valid)}")
    if text:
        value = _parse(dotted, value, parent._get_node(leaf))
    try:
        if dotted in NAMED_SECTIONS and isinstance(value, (str, list, ListConfig)):
            parent[leaf].name = "+".join(stage_names(value))  # `logger=csv`: a section named by its choice
        elif isinstance(value, DictConfig) and isinstance(parent[leaf], DictConfig):
            for sub in value:
                _set(parent[leaf], f"{dotted}.{sub}", value[sub], root_prefix=dotted)
        else:
            if isinstance(parent[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # `model.dropout=0` means 0.0
            with warnings.catch_warnings():  # OmegaConf's FutureWarning on 'nan' -> float: the checks refuse it
                warnings.simplefilter("ignore", FutureWarning)
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


def compose(
    args: list[str], *, base: Path | None = None, code_checks: bool = True, validated: bool = True
) -> DictConfig:
    """The validated config for command-line `args`, starting from the defaults or a saved config `base`.

    `run.name=auto-cell` names the run with the grid cell id of the other arguments (`dia.grid.sweep.cell_id`),
    so a W&B agent's run and dia.grid's run of the same cell share a folder. `code_checks=False` skips the
    checks that import the code (`check_code`): composing then needs neither torch nor Lightning; `validated=False`
    skips `validate` too (`--help model=vit_b16` shows that model's keys, though its patch does not fit MNIST).
    """
    selections, overrides = parse_args(args)
    cfg = OmegaConf.structured(Config)
    root = config_dir()
    if base is not None:
        if not base.is_file():
            raise UserError(f"--config: no such file '{base}'")
        start = _load_yaml(base)
        defaults: dict[str, Any] = {}
    else:
        start = _load_yaml(root / "config.yaml")
        defaults = dict(start.pop("defaults", {}) or {})
    for group in GROUPS:
        if group in selections or base is None:
            choice = selections.get(group, defaults.get(group, LIST_GROUPS.get(group)))
            node, where = _load_choice(group, choice, root)
        else:
            node = start.get(group, OmegaConf.create({"name": LIST_GROUPS[group]}) if group in LIST_GROUPS else None)
            where = str(base)
        cfg[group] = _typed_group(group, node, where, root)
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
    if validated:
        validate(cfg)
    if code_checks:
        check_code(cfg)
    return cfg


def _load_choice(group: str, choice: Any, root: Path) -> tuple[DictConfig, str]:
    """A group's choice file; for LIST_GROUPS a list `[a,b]` or `a+b` of choices, merged (name 'a+b'). An attack
    registered in this process without a YAML (`_registered`) is a choice too."""
    valid = choices(group, root)
    names = stage_names(choice) if group in LIST_GROUPS else [str(choice)]
    if len(names) == 1 and names[0] not in valid and _registered(group, names[0]):
        return OmegaConf.create({"name": names[0]}), f"{group} {names[0]} (registered in this process)"
    for name in names:
        if name not in valid:
            raise UserError(
                f"unknown {group} '{name}'{did_you_mean(str(name), valid)}; choose one of: {', '.join(valid)}"
            )
    if len(set(names)) != len(names):
        raise UserError(f"{group}={'+'.join(names)}: a choice is listed twice")
    nodes = [_load_yaml(root / group / f"{name}.yaml") for name in names]
    where = ", ".join(str(root / group / f"{name}.yaml") for name in names)
    if len(nodes) == 1:
        return nodes[0], where
    merged = OmegaConf.merge(*nodes)
    merged.name = "+".join(str(n.get("name", name)) for n, name in zip(nodes, names))
    return merged, where


Check = tuple[str, Callable[[Any], bool], str]
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range
MAX_STEPS = 10**6  # client.local_steps: beyond memory anyway (dia.run.checks says how many fit)
BIG = 10**9  # an upper bound for counts (iterations, patience, ...): larger is a typo, not a plan
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


def _count(lo: int = 1, hi: int = BIG) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


CHECKS: list[Check] = [
    ("model.dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("model.attn_dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("model.drop_path", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    *[
        (f"model.{k}", _count(1, 10**6), "must be a positive integer (at most 1000000)")
        for k in ("width", "depth", "patch_size", "dim", "heads", "mlp_dim", "dim_head", "conv1", "conv2", "kernel")
    ],
    ("model.hidden", lambda v: all(isinstance(h, int) and 1 <= h <= 10**6 for h in v), "must be positive integers"),
    ("model.conv_dropout", lambda v: v in ("none", "unit", "channel"), "must be one of: none, unit, channel"),
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
    ("attack.eager", lambda v: v in ("factored", "loop", "vectorized"), "must be one of: factored, loop, vectorized"),
    ("attack.compile_mode", lambda v: v in COMPILE_MODES, f"must be one of: {', '.join(COMPILE_MODES)}"),
    ("attack.matmul_precision", lambda v: v in ("highest", "high", "medium"), "must be highest, high or medium"),
    ("attack.iterations_per_step", _count(), f"must be a positive integer (at most {BIG})"),
    ("attack.log_every", _count(), f"must be a positive integer (at most {BIG})"),
    ("attack.parallel", lambda v: v == "auto" or _count()(v), "must be a positive integer or auto"),
    ("data.image_size", _count(1, 10**5), "must be a positive integer (at most 100000)"),
    ("data.normalize", lambda v: v in ("dataset", "folder"), "must be dataset or folder"),
    ("data.channels", _count(1, 4096), "must be a positive integer"),
    ("data.num_classes", _count(2, 10**7), "must be an integer > 1"),
    ("batch_size", _count(1, 10**6), "must be a positive integer"),
    ("client.local_steps", _count(1, MAX_STEPS), f"must be an integer in 1..{MAX_STEPS}"),
    ("client.local_lr", lambda v: 0 < v < float("inf"), "must be a finite number > 0"),
    ("client.local_batch", lambda v: v == "full" or _count(1, 10**6)(v), "must be full or a positive integer"),
    ("num_victims", _count(1, 10**7), "must be a positive integer"),
    ("victims", lambda v: all(isinstance(i, int) and 0 <= i < 2**63 for i in v), "must be a list of indices >= 0"),
    ("victim_seed", _count(0, MAX_SEED), f"must be an integer in 0..{MAX_SEED}"),
    ("run.seed", _count(0, MAX_SEED), f"must be an integer in 0..{MAX_SEED}"),
    ("run.checkpoint_every", _count(-1), f"must be an integer in -1..{BIG}"),
    ("run.device", lambda v: DEVICE.fullmatch(str(v)) is not None, "must be auto, cpu, mps, cuda or cuda:N"),
    ("metrics.lpips", lambda v: v in ("auto", "off", "false"), "must be auto or off"),  # YAML reads off as false
    ("logger.wandb.mode", lambda v: v in WANDB_MODES, f"must be one of: {', '.join(WANDB_MODES)}"),
    ("captured.kind", lambda v: v in ("gradient", "delta", "weights"), "must be gradient, delta or weights"),
    ("captured.lr", lambda v: v is None or (math.isfinite(v) and v > 0), "must be a finite number > 0"),
    ("captured.file", lambda v: v is None or Path(v).is_file(), "no such file"),
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
        raise UserError(
            f"{key}={name!r}: must be a folder name, not a path (no '/'); set run.output_dir for the parent folder"
        )
    if name.startswith("."):
        raise UserError(f"{key}={name!r}: must not start with '.' (hidden and in-progress folders do)")


def validate(cfg: DictConfig) -> None:
    """Ranges, types, names and devices: everything that needs no model and no data (see `dia.run.checks`)."""
    run_checks(cfg, CHECKS)
    if cfg.run.name is not None:
        check_name(cfg.run.name)
    for key in ("mean", "std"):
        if len(cfg.data[key]) != cfg.data.channels:
            raise UserError(f"data.{key} has {len(cfg.data[key])} values but data.channels={cfg.data.channels}")
    if cfg.data.normalize == "folder" and cfg.data.source != "imagefolder":
        raise UserError(f"data.normalize=folder needs data.source=imagefolder (got {cfg.data.source})")
    if any(s <= 0 for s in cfg.data.std):
        raise UserError("data.std: every value must be > 0")
    if cfg.attack.labels == "infer" and cfg.batch_size > 1 and cfg.client.local_steps > 1:
        raise UserError(
            f"attack.labels=infer with batch_size={cfg.batch_size} counts labels from one gradient step: it needs "
            f"client.local_steps=1 (got {cfg.client.local_steps})"
        )
    if cfg.client.local_batch != "full" and cfg.batch_size % cfg.client.local_batch:
        raise UserError(
            f"client.local_batch={cfg.client.local_batch} does not divide batch_size={cfg.batch_size} "
            "(the images each local step takes; or full: the whole batch every step)"
        )
    model = cfg.model
    if "patch_size" in model and cfg.data.image_size % model.patch_size:
        raise UserError(f"model.patch_size={model.patch_size} does not divide data.image_size={cfg.data.image_size}")
    if "heads" in model and model.get("dim_head") is None and model.dim % model.heads:
        raise UserError(f"model.heads={model.heads} does not divide model.dim={model.dim}")


def run_checks(cfg: Any, checks: list[Check], prefix: str = "") -> None:
    """Apply (key, ok, rule) checks to the keys of `cfg` that are set; a value of the wrong type fails its rule."""
    for key, ok, rule in checks:
        value = OmegaConf.select(cfg, key, default=None) if isinstance(cfg, DictConfig) else getattr(cfg, key, None)
        if value is None:
            continue
        try:
            good = bool(ok(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise UserError(f"{prefix}{key}={value!r}: {rule}")


def check_code(cfg: DictConfig) -> None:
    """The checks that need the code a config names: those its packages registered (`register_check`: the
    attack's own settings, the model, the data source, the defense composition). The commands, the API and
    every run import those packages first (dia.run); a check whose code was never imported does not run."""
    for check in _CODE_CHECKS.values():
        check(cfg)


def group_settings(group: str, name: str, **overrides: Any) -> DictConfig:
    """The settings section of choice `name` of `group` (its YAML, typed), with keyword `overrides` (values, or
    command-line text for string keys), checked like a composed config's. A choice without a YAML (an
    attack registered in this process) has the group's shared settings."""
    root = config_dir()
    path = root / group / f"{name}.yaml"
    node = _load_yaml(path) if path.is_file() else OmegaConf.create({"name": name})
    typed = _typed_group(group, node, str(path), root)
    for key, value in overrides.items():
        _set(typed, f"{group}.{key}", value, root_prefix=group)
    wrapped = OmegaConf.create({group: OmegaConf.to_container(typed)})
    run_checks(wrapped, [c for c in CHECKS if c[0].startswith(f"{group}.")])
    return typed


def help_text(args: list[str]) -> str:
    """Groups with their choices, then every key with its value under the current selection, what it may be and
    what it does (`key_doc`)."""
    root = config_dir()
    defaults = dict(_load_yaml(root / "config.yaml").get("defaults", {}) or {})
    try:
        cfg = compose(args, code_checks=False, validated=False)
    except UserError:
        cfg = compose([], code_checks=False)
    lines = [
        "usage: python -m dia.train [group=choice ...] [key=value ...] [--config FILE] [--describe-model]",
        "",
        "Reconstruct client images from a dropout-perturbed gradient (attacks: IG, WIIG, DIA, DLG, ...).",
        "",
        "groups (default first):",
    ]
    for group in GROUPS:
        opts = choices(group, root)
        d = defaults.get(group)
        ordered = [d] + [o for o in opts if o != d] if d in opts else opts
        lines.append(f"  {group:<8} {', '.join(ordered)}")
    lines += ["", "keys (key = value for this selection  (what it may be) what it does; set with key=value):"]
    for key, value in _flatten(OmegaConf.to_container(cfg)):
        values, text = key_doc(key, cfg, root)
        lines.append(f"  {key} = {format_value(value)}  " + (f"({values}) " if values else "") + text)
    lines += [
        "",
        "options:",
        "  --config FILE     start from a saved config.yaml (e.g. to rerun a run exactly)",
        "  --describe-model  list the model's dropout sites (name, p, mask shape) and exit",
        "  -h, --help        this text",
    ]
    return "\n".join(lines)


def key_doc(key: str, cfg: DictConfig, root: Path | None = None) -> tuple[str, str]:
    """(what it may be, what it does) of a dotted key of `cfg`: from the schema's fields (dia.config.schema), and
    for a choice's own keys from the comments beside them in its YAML (`key: value  # (values) what it does`); the
    values of a range checked in CHECKS from its rule, of a group's name its choices. ("", "") when nobody says."""
    root = root or config_dir()
    section, _, leaf = key.partition(".")
    doc = setting_doc(key)
    if doc is None and section in GROUPS and leaf:
        for path in _setting_files(section, str(cfg[section].name), root):
            doc = _yaml_docs(path).get(leaf, doc)
    values, text = doc or ("", "")
    if not values and section in GROUPS and leaf == "name":
        values = " | ".join(choices(section, root)) + (", or a list [a,b] applied in order" * (section in LIST_GROUPS))
    if not values:
        rule = next((r for k, _, r in CHECKS if k == key), "")
        values = re.sub(r"\s*\(at most \d+\)$", "", rule.removeprefix("must be ")) or (
            "true | false" if isinstance(OmegaConf.select(cfg, key), bool) else ""
        )
    return values, text


_YAML_KEY = re.compile(r"([A-Za-z_][\w-]*):(.*)$")


def _yaml_docs(path: Path) -> dict[str, tuple[str, str]]:
    """The comments beside the top-level keys of a choice's YAML, key -> (values, what it does): `key: value  #
    (a | b) what it does`; an indented comment line below a key's continues its comment."""
    comments: dict[str, str] = {}
    last = None
    for line in path.read_text().splitlines():
        key = _YAML_KEY.match(line)
        if key:
            last = key.group(1)
            value, hash_, comment = key.group(2).partition(" #")
            if hash_:
                comments[last] = comment.strip().lstrip("#").strip()
            continue
        more = re.match(r"\s+#\s?(.*)$", line)
        if more and last in comments:
            comments[last] += " " + more.group(1).strip()
        else:
            last = None
    return {k: _values_and_text(v) for k, v in comments.items()}


def _values_and_text(comment: str) -> tuple[str, str]:
    """'(a | b) what it does' -> ('a | b', 'what it does'); a comment without a leading (...) is all text."""
    if not comment.startswith("("):
        return "", comment
    depth = 0
    for i, c in enumerate(comment):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(c, 0)  # intervals: [0, 1) and (0, 1] nest as well
        if depth == 0:
            return comment[1:i], comment[i + 1 :].strip()
    return "", comment


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            out += (
                _flatten(v, f"{prefix}.{k}" if prefix else str(k))
                if isinstance(v, dict)
                else [(f"{prefix}.{k}" if prefix else str(k), v)]
            )
        return out
    return [(prefix, node)]
