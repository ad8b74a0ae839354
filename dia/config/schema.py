"""The settings schema: what every key of a run's config is, its type and its default. No torch here.

A run's config is the top-level `Config` (with fixed sections such as `client` and `run`) plus one section per
group (`attack`, `model`, `data`, `defense`). Each group has a base dataclass with the keys every choice shares;
a choice's own keys are those of its YAML file, `configs/<group>/<name>.yaml`, typed by their defaults. So a new
attack, model or defense is its code and one YAML that lists its settings with their defaults and comments;
nothing else names it.

The schema lives apart from the code that consumes it (attacks, models, ...) on purpose: composing a config
(`python -m dia.train --help`, `dia.grid --validate`, `dia.report`) then needs neither torch nor Lightning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AttackConfig:
    """Settings every attack shares: the engine (optimizer, schedule, stopping) and the program."""

    name: str = "ig"
    max_iterations: int = 20000
    lr: float = 0.1
    tv_weight: float = 1e-5
    l2_weight: float = 0.0  # weight of a second image prior, the mean square of the (normalized) image (DeepInversion)
    # weight of the BatchNorm prior: the dummies' batch statistics against the client's, where the server knows them
    # (model.bn_stats=true; GradInversion, Yin et al. 2021)
    bn_weight: float = 0.0
    signed_gradients: bool = True
    init: str = "randn"  # randn | rand (uniform in [-1, 1])
    # trained masks at conv sites (masks of 4 or more dims): drawn (the shape the model's dropout draws: per unit for
    # nn.Dropout, per channel for nn.Dropout2d) | channel (one value per channel: (B, C, 1, 1) whatever the model draws)
    conv_masks: str = "drawn"
    restarts: int = 1  # R starts per problem (its own seed each), optimized side by side; the lowest loss is kept
    boxed: bool = True
    lr_factor: float = 0.1
    lr_patience: int = 800
    early_stop_patience: int = 4000
    loss_threshold: float = 1e-5
    parallel: Any = "auto"  # rows of a program (problems at once): an int, or auto (24 on a CPU, what fits on a GPU)
    labels: str = "known"  # known (as in the paper) | infer (from the gradient; B > 1: counts per class)
    compile: Any = "auto"  # torch.compile the gradient program: true | false | auto (try it, fall back to eager)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    # float32 matmuls of the attack: highest | high (TF32 on GPUs) | medium (also oneDNN with bf16 allowed on CPUs
    # that have it: docs/benchmarks.md)
    matmul_precision: str = "highest"
    iterations_per_step: int = 10  # engine iterations per Lightning training_step (amortizes the harness)
    check_every: int = 50  # iterations between host checks whether every problem has stopped (and rows turn over)
    refill: bool = True  # a pack larger than attack.parallel: waiting problems take the rows of stopped ones
    log_every: int = 50  # iterations between logged training curves
    # the attacker models DropPath (stochastic depth) sites: DIA trains their masks, WIIG replays them; IG: no effect
    model_drop_path: bool = False
    model_defense: bool = False  # match only the entries the (defended) shared gradient kept nonzero (dia.defenses)


@dataclass
class ModelConfig:
    """Settings every model shares; a model's own keys (width, depth, ...) come from its YAML."""

    name: str = "mlp"
    dropout: float = 0.25
    checkpoint: str | None = None  # a local state dict (weights_only=True)


@dataclass
class DataConfig:
    name: str = "mnist"
    source: str = "embedded"  # embedded | torchvision | imagefolder
    root: str | None = None  # torchvision cache / ImageFolder root
    download: bool = True  # torchvision: download when missing (needs the internet)
    embedded: str = "mnist_128.npz"  # file under dia/assets for source=embedded
    torchvision_name: str | None = None  # torchvision.datasets class for source=torchvision
    split: str = "test"
    channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    labels_file: str | None = None  # imagefolder without class subfolders: CSV lines `file,label`
    normalize: str = "dataset"  # dataset: the mean/std below | folder: computed from the images (saved with the run)
    mean: list[float] = field(default_factory=lambda: [0.1307])
    std: list[float] = field(default_factory=lambda: [0.3081])


@dataclass
class DefenseConfig:
    """A defense's own keys (clip, ratio, ...) come from its YAML; a composition has the union of its stages'."""

    name: str = "none"


@dataclass
class RunConfig:
    seed: int = 0  # seeds model weights, client dropout, attack initialisation
    output_dir: str = "runs"  # each run writes runs/<attack>-<model>-<data>-p<rate>-<id>/ under it
    name: str | None = None  # folder name instead of the generated one; auto-cell: the grid cell id of the overrides
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    save_tensors: bool = True
    progress: bool = True  # progress bar
    checkpoint_every: int = 500  # iterations between saves of the attack state (0: only on SIGUSR1/SIGTERM; -1: never)
    # torch.compile's persistent cache: a folder, off, or null (<output_dir>/.compile-cache)
    compile_cache: str | None = None


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "dia"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    """Where a run's curves, summary and images go besides its folder (dia.run.loggers): `logger=csv` sets the
    name; several: `logger=wandb+csv`; none: `logger=none`."""

    name: str = "wandb"  # wandb | csv | tensorboard | mlflow | none, or several joined by +
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ClientConfig:
    """How a client trains before it answers: one gradient step (FedSGD, the paper) or T local SGD steps (FedAvg)."""

    local_steps: int = 1  # T: local SGD steps, fresh dropout masks each; the client sends w_0 - w_T (1: its gradient)
    local_lr: float = 0.1  # the clients' SGD learning rate (the server knows it: it sets it)
    # images per local step: full (the whole batch every step) or b dividing batch_size (step t: chunk t mod B/b)
    local_batch: Any = "full"


@dataclass
class MetricsConfig:
    lpips: str = "auto"  # auto (AlexNet LPIPS; null with one warning when its weights cannot be had) | off
    # curves.jsonl (and W&B) get eval/ssim of the best iterates every attack.log_every iterations
    curves_ssim: bool = True


@dataclass
class CapturedConfig:
    """An update captured from a real client (`python -m dia.train captured.file=client.pt`): attacked instead of
    simulated clients; model, checkpoint and data (shape, normalization, classes) come from the config."""

    file: str | None = None  # a ClientUpdate .pt (dia.capture_update), or a gradient/delta/weights .pt or .npz
    kind: str = "gradient"  # gradient | delta (w_0 - w_1) | weights (w_1): see dia.updates.as_gradients
    lr: float | None = None  # the client's local learning rate (delta/weights; a ClientUpdate file carries it)


@dataclass
class Config:
    attack: Any = None
    model: Any = None
    data: Any = None
    defense: Any = None
    victims: list[int] | None = None  # explicit victim indices; None: use num_victims
    num_victims: int = 4  # without `victims`: the first N, or N drawn with victim_seed
    victim_seed: int | None = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    batch_size: int = 1  # victims per client batch: one shared gradient comes from B images
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
