"""The settings schema: what every key of a run's config is, its type and its default. No torch here.

A run's config is the top-level `Config` (with fixed sections such as `client` and `run`) plus one section per
group (`attack`, `model`, `data`, `defense`). Each group has a base dataclass with the keys every choice shares;
a choice's own keys are those of its YAML file, `configs/<group>/<name>.yaml`, typed by their defaults. So a new
attack, model or defense is its code and one YAML that lists its settings with their defaults and, beside each, a
comment `# (what it may be) what it does` that `--help` shows; nothing else names it. The keys of the fields here
say the same with `setting(default, help, values)`.

The schema lives apart from the code that consumes it (attacks, models, ...) on purpose: composing a config
(`python -m dia.train --help`, `dia.grid --validate`, `dia.report`) then needs neither torch nor Lightning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def setting(default: Any = dataclasses.MISSING, help: str = "", values: str = "", *, factory: Any = None) -> Any:
    """A field of the schema with what `--help` says of it: `help`, one line of what it does, and `values`, what it
    may be (a choice `a | b`, a range); a range checked in dia.config.CHECKS is read from there when `values` is
    empty."""
    meta = {"help": help, "values": values}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AttackConfig:
    """Settings every attack shares: the engine (optimizer, schedule, stopping) and the program."""

    name: str = setting("ig", "the attack (the group choice attack=NAME)")
    max_iterations: int = setting(20000, "iteration budget of each problem (the paper's: 20000)")
    lr: float = setting(0.1, "Adam learning rate of the dummies (and of trained masks)")
    tv_weight: float = setting(1e-5, "weight of the total-variation image prior")
    l2_weight: float = setting(
        0.0,
        "weight of a second image prior, the mean square of the (normalized) image (DeepInversion's R_l2)",
        ">= 0",
    )
    bn_weight: float = setting(
        0.0,
        "weight of the BatchNorm prior: the dummies' batch statistics against the client's, where the server knows "
        "them (model.bn_stats=true; GradInversion)",
        ">= 0",
    )
    signed_gradients: bool = setting(True, "signed Adam on the dummies (IG's); false: plain Adam")
    init: str = setting("randn", "how the dummies start: randn (normal) or rand (uniform in [-1, 1])", "randn | rand")
    conv_masks: str = setting(
        "drawn",
        "trained masks at conv sites: drawn (the shape the model's dropout draws: per unit for nn.Dropout, per "
        "channel for nn.Dropout2d) or channel (one value per channel, (B, C, 1, 1), whatever the model draws)",
        "drawn | channel",
    )
    restarts: int = setting(
        1, "R starts per problem (its own seed each), optimized side by side; the lowest loss is kept", "1..1000"
    )
    boxed: bool = setting(True, "keep the dummies inside the valid image range")
    lr_factor: float = setting(0.1, "the learning rate's factor at a plateau (ReduceLROnPlateau)")
    lr_patience: int = setting(800, "iterations without improvement before the learning rate drops")
    early_stop_patience: int = setting(4000, "iterations without improvement before a problem stops")
    loss_threshold: float = setting(1e-5, "a problem stops once its loss is below this")
    parallel: Any = setting(
        "auto", "rows of a program (problems at once): auto is 24 on a CPU, what fits on a GPU", "auto | an integer > 0"
    )
    labels: str = setting(
        "known", "known (as in the paper) or inferred from the gradient (B > 1: counts per class)", "known | infer"
    )
    compile: Any = setting(
        "auto",
        "torch.compile the gradient program (auto: when the expected work repays the compile time, judged from the "
        "last compile of the same program on this machine or an estimate; eager if compiling fails)",
        "true | false | auto",
    )
    eager: str = setting(
        "factored",
        "the eager program's per-problem gradients: factored (one batched pass, linear layers' weight gradients as "
        "their factors; where the model's layers allow it and it matches loop at the start, else loop), loop (plain "
        "autograd, one problem after another) or vectorized (torch.func's vmap, as the compiled program)",
        "factored | loop | vectorized",
    )
    compile_mode: str = setting(
        "default",
        "torch.compile mode (reduce-overhead: CUDA graphs)",
        "default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs",
    )
    matmul_precision: str = setting(
        "highest",
        "float32 matmuls of the attack: high is TF32 on GPUs, medium also bf16 oneDNN on CPUs (docs/benchmarks.md)",
        "highest | high | medium",
    )
    iterations_per_step: int = setting(10, "engine iterations per Lightning training_step (amortizes the harness)")
    check_every: int = setting(50, "iterations between checks whether every problem stopped (and rows turn over)")
    refill: bool = setting(True, "waiting problems take the rows of stopped ones (a pack larger than attack.parallel)")
    log_every: int = setting(50, "iterations between points of the training curves (curves.jsonl, loggers)")
    model_drop_path: bool = setting(
        False, "the attacker models DropPath (stochastic depth): DIA trains its masks, WIIG replays them"
    )
    model_defense: bool = setting(False, "match only the entries the defended gradient kept nonzero (dia.defenses)")


@dataclass
class ModelConfig:
    """Settings every model shares; a model's own keys (width, depth, ...) come from its YAML."""

    name: str = setting("mlp", "the model (the group choice model=NAME)")
    dropout: float = setting(0.25, "dropout rate p of the model's dropout sites")
    checkpoint: str | None = setting(
        None, "a state dict to load (weights_only=True); null: random weights (run.seed)", "a file or null"
    )


@dataclass
class DataConfig:
    name: str = setting("mnist", "the data set (the group choice data=NAME)")
    source: str = setting("embedded", "where victims come from", "embedded | torchvision | imagefolder")
    root: str | None = setting(None, "the torchvision cache or the image folder", "a folder or null")
    download: bool = setting(True, "torchvision: download when missing (needs the internet)")
    embedded: str = setting("mnist_128.npz", "the victim file under dia/assets for source=embedded", "a file name")
    torchvision_name: str | None = setting(
        None, "the torchvision.datasets class for source=torchvision", "a class name or null"
    )
    split: str = setting("test", "torchvision: the split victims are drawn from (train, else test)", "test | train")
    channels: int = setting(1, "image channels")
    image_size: int = setting(28, "image height and width (pixels)")
    num_classes: int = setting(10, "classes of the model's output")
    labels_file: str | None = setting(
        None, "an image folder without class subfolders: CSV lines `file,label`", "a file or null"
    )
    normalize: str = setting(
        "dataset",
        "dataset: the mean/std below; folder: computed from the images (saved with the run)",
        "dataset | folder",
    )
    mean: list[float] = setting(
        help="per-channel normalization mean", values="a number per channel", factory=lambda: [0.1307]
    )
    std: list[float] = setting(
        help="per-channel normalization std", values="a number > 0 per channel", factory=lambda: [0.3081]
    )


@dataclass
class DefenseConfig:
    """A defense's own keys (clip, ratio, ...) come from its YAML; a composition has the union of its stages'."""

    name: str = setting("none", "what the client applies to its update (the group choice defense=NAME or [a,b])")


@dataclass
class RunConfig:
    seed: int = setting(0, "seeds model weights, client dropout and the attack's start (43: the authors' weights)")
    output_dir: str = setting("runs", "each run writes <output_dir>/<attack>-<model>-<data>-p<rate>-<id>/", "a folder")
    name: str | None = setting(
        None, "the run folder's name instead of the generated one", "a name, auto-cell (the grid cell's id) or null"
    )
    device: str = setting("auto", "where the attack runs", "auto | cpu | mps | cuda | cuda:N")
    save_tensors: bool = setting(True, "write reconstructions.pt (originals, reconstructions, recovered masks)")
    progress: bool = setting(True, "show a progress bar")
    checkpoint_every: int = setting(
        500, "iterations between saves of the attack state (0: only on SIGUSR1/SIGTERM; -1: never)"
    )
    compile_cache: str | None = setting(
        None, "torch.compile's persistent cache", "a folder, off, or null (<output_dir>/.compile-cache)"
    )


@dataclass
class WandbConfig:
    mode: str = setting(
        "offline", "offline never prompts for a login; online needs `wandb login`", "offline | online | disabled"
    )
    project: str = setting("dia", "the W&B project", "a name")
    entity: str | None = setting(None, "the W&B entity (user or team); null: the default", "a name or null")
    group: str | None = setting(None, "the W&B group (dia.grid: the grid's name)", "a name or null")
    tags: list[str] = setting(help="extra W&B tags", values="a list of strings", factory=list)


@dataclass
class LoggerConfig:
    """Where a run's curves, summary and images go besides its folder (dia.run.loggers): `logger=csv` sets the
    name; several: `logger=wandb+csv`; none: `logger=none`."""

    name: str = setting(
        "wandb", "loggers besides the run folder (logger=NAME)", "wandb | csv | tensorboard | mlflow | none, or a+b"
    )
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ClientConfig:
    """How a client trains before it answers: one gradient step (FedSGD, the paper) or T local SGD steps (FedAvg)."""

    local_steps: int = setting(
        1, "T: local SGD steps, fresh dropout masks each; the client sends w_0 - w_T (1: FedSGD)"
    )
    local_lr: float = setting(0.1, "the clients' SGD learning rate (the server knows it: it sets it)")
    local_batch: Any = setting(
        "full", "images per local step (step t takes chunk t mod B/b)", "full | b dividing batch_size"
    )


@dataclass
class MetricsConfig:
    lpips: str = setting(
        "auto", "AlexNet LPIPS (null with one warning when its weights cannot be had: README)", "auto | off"
    )
    curves_ssim: bool = setting(True, "curves.jsonl (and W&B) get eval/ssim of the best iterates every log_every")


@dataclass
class CapturedConfig:
    """An update captured from a real client (`python -m dia.train captured.file=client.pt`): attacked instead of
    simulated clients; model, checkpoint and data (shape, normalization, classes) come from the config."""

    file: str | None = setting(
        None, "a captured update to attack instead of simulated clients", "a ClientUpdate .pt, a .pt or .npz, or null"
    )
    kind: str = setting("gradient", "what the file holds: see dia.updates.as_gradients", "gradient | delta | weights")
    lr: float | None = setting(
        None, "the client's learning rate (delta/weights; a ClientUpdate file carries it)", "null or > 0"
    )


@dataclass
class Config:
    attack: Any = None
    model: Any = None
    data: Any = None
    defense: Any = None
    victims: list[int] | None = setting(
        None, "explicit victim indices; null: num_victims", "a list [i, j, ...] or null"
    )
    num_victims: int = setting(4, "without victims: the first N, or N drawn with victim_seed")
    victim_seed: int | None = setting(
        None, "draw num_victims at random with this seed; null: the first N", "null or an integer >= 0"
    )
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    batch_size: int = setting(1, "B: victims per client batch (one shared gradient from B images)")
    client: ClientConfig = field(default_factory=ClientConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    captured: CapturedConfig = field(default_factory=CapturedConfig)


# Each group's base schema; a choice adds the keys of its YAML.
GROUPS: dict[str, type] = {"attack": AttackConfig, "model": ModelConfig, "data": DataConfig, "defense": DefenseConfig}
NAMED_SECTIONS = ("logger",)  # fixed sections chosen by name on the command line: `logger=csv` is logger.name=csv
LIST_GROUPS = {
    "defense": "none"
}  # groups whose choice may be a list applied in order (defense=[prune,dpsgd]): their default


def setting_doc(key: str) -> tuple[str, str] | None:
    """(values, help) of a dotted key the schema's fields give (`setting`); None for a key no field has (a choice's
    own keys: their YAML says, dia.config.key_doc)."""
    parts = key.split(".")
    cls: Any = Config
    if parts[0] in GROUPS:
        cls, parts = GROUPS[parts[0]], parts[1:]
    for i, part in enumerate(parts):
        f = next((f for f in dataclasses.fields(cls) if f.name == part), None)
        if f is None:
            return None
        if i == len(parts) - 1:
            return (f.metadata["values"], f.metadata["help"]) if "help" in f.metadata else None
        cls = type(f.default_factory()) if f.default_factory is not dataclasses.MISSING else None
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
    return None


def _type_of(value: Any) -> Any:
    """The schema type of a YAML default: its scalar type, List[...] of uniform scalars, Any for null."""
    for t in (bool, int, float, str):
        if type(value) is t:
            return t
    if isinstance(value, list):
        kinds = {type(v) for v in value}
        return list[kinds.pop()] if len(kinds) == 1 and kinds <= {bool, int, float, str} else list[Any]
    if isinstance(value, dict):
        return dict[str, Any]
    return Any


_SCHEMAS: dict[tuple, type] = {}


def schema(group: str, name: str, defaults: dict[str, Any]) -> type:
    """The dataclass of choice `name` of `group`: the group's base schema plus the keys of `defaults` (the
    choice's YAML, as plain data) that the base does not have, typed and defaulted by their values."""
    base = GROUPS[group]
    known = {f.name for f in dataclasses.fields(base)}
    extra = tuple((k, v) for k, v in defaults.items() if k not in known)
    key = (group, name, repr(extra))
    if key not in _SCHEMAS:
        fields = [(k, _type_of(v), field(default_factory=lambda v=v: _copy(v))) for k, v in extra]
        cls = dataclasses.make_dataclass(f"{group.capitalize()}Config_{_ident(name)}", fields, bases=(base,))
        _SCHEMAS[key] = cls
    return _SCHEMAS[key]


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(name))
