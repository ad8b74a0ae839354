"""`check(cfg)`: what a run needs from the world, checked before anything is built or written.

`dia.config.validate` checks what the config alone decides (ranges, types, names, devices). This module
takes the cheap look at the data and the environment that the rest needs: the data folder exists, the
victim indices are in range, their labels are within `data.num_classes`, the victims split into client
batches, `data.mean`/`data.std` are usable numbers, the images and FedAvg's T local steps fit in memory
(`check_input_memory`, `check_local_steps`), the files a user hands in hold what they must (`model.checkpoint`,
`captured.file`: read and checked as the run will read them, `check_captured`), the W&B settings are ones W&B
accepts (`check_wandb`: checked here, not after the attack) and `logger.wandb.mode=online` has a W&B login.
`dia.grid --validate` calls it for every cell (with a `memo`, so each data config is looked at once) and a run
calls it before it starts, before its folder or lock exists. A problem raises one `UserError` line.
"""

from __future__ import annotations

import json
import math
import netrc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from dia.data import folder_samples, read_embedded, require_folder, require_root, select_indices
from dia.errors import UserError
from dia.registry import Registry

Catalog = Callable[[Any], "list[int]"]  # a data config -> the label of every image the source holds
CATALOGS: Registry[Catalog] = Registry("data.source")


@CATALOGS.register("embedded")
def embedded_labels(data: Any) -> list[int]:
    """The labels of an embedded victim set (read and checked from dia/assets: the sets are small)."""
    images, labels = read_embedded(data.embedded)
    want = (data.image_size, data.image_size, data.channels)
    if tuple(images.shape[1:]) != want:
        raise UserError(
            f"data.embedded: '{data.embedded}' holds images of shape {tuple(images.shape[1:])} (H, W, C) but "
            f"data={data.name} "
            f"declares {want} (data.image_size, data.channels)"
        )
    return [int(v) for v in labels]


@CATALOGS.register("imagefolder")
def folder_labels(data: Any) -> list[int]:
    """The labels of an image folder (class subfolders, or a flat folder and its labels file), images unread."""
    root = require_folder(data)
    samples = folder_samples(root, data.labels_file)
    if not samples:
        raise UserError(f"data.root: '{root}' holds no images in class subfolders or directly")
    return [label for _, label in samples]


def wandb_login() -> bool:
    """Whether W&B has credentials without asking: WANDB_API_KEY, an identity token file, or a netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


WANDB_PROJECT_CHARS = "/\\#?%:"  # wandb.Settings.validate_project refuses these
MAX_WANDB_NAME = 128
MAX_WANDB_TAG = 64


def check_wandb(wb: Any) -> None:
    """`logger.wandb.*` as W&B will take them (project, entity, group, tags), so a bad setting is refused now,
    not by wandb.init after the attack: one UserError line naming the key."""

    def text(key: str, value: Any, *, limit: int, chars: str = "", optional: bool = True) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or not value:
            raise UserError(f"logger.wandb.{key}={value!r}: must be a non-empty string")
        if len(value) > limit:
            raise UserError(f"logger.wandb.{key}: {len(value)} characters; W&B takes at most {limit}")
        bad = sorted({c for c in value if c in chars or ord(c) < 32 or ord(c) == 127})
        if bad:
            raise UserError(
                f"logger.wandb.{key}={value!r}: W&B does not allow {', '.join(map(repr, bad))} in it"
                + (f" (nor any of {' '.join(chars)})" if chars else "")
            )

    text("project", wb.project, limit=MAX_WANDB_NAME, chars=WANDB_PROJECT_CHARS, optional=False)
    text("entity", wb.entity, limit=MAX_WANDB_NAME, chars=WANDB_PROJECT_CHARS)
    text("group", wb.group, limit=MAX_WANDB_NAME)
    tags = list(wb.tags or [])
    for i, tag in enumerate(tags):
        if not isinstance(tag, str):
            raise UserError(
                f"logger.wandb.tags: tag {i} is {OmegaConf.to_container(tag) if OmegaConf.is_config(tag) else tag!r}, "
                "not a string; give a flat list such as logger.wandb.tags=[a,b]"
            )
        if not 1 <= len(tag) <= MAX_WANDB_TAG:
            raise UserError(f"logger.wandb.tags: tag {i} has {len(tag)} characters; W&B takes 1 to {MAX_WANDB_TAG}")
        if any(ord(c) < 32 or ord(c) == 127 for c in tag):
            raise UserError(f"logger.wandb.tags: tag {i} ({tag!r}) holds control characters")


NORMAL = (1e-6, 1e6)  # data.std beyond this (or a non-finite mean/std) makes the normalized images overflow float32


def check_normalization(data: Any) -> None:
    """data.mean finite, data.std finite and within NORMAL (a subnormal std divides the images into inf)."""
    check_mean_std(data.mean, data.std, prefix="data.")


def check_mean_std(mean: Any, std: Any, *, prefix: str = "") -> None:
    """Each mean finite within ±NORMAL[1], each std finite in NORMAL: one UserError line naming `<prefix>mean[i]`."""
    for i, m in enumerate(mean):
        if not (_real(m) and math.isfinite(m) and abs(m) <= NORMAL[1]):
            raise UserError(f"{prefix}mean[{i}]={m!r}: must be a finite number within ±{NORMAL[1]:g}")
    for i, v in enumerate(std):
        if not (_real(v) and math.isfinite(v) and NORMAL[0] <= v <= NORMAL[1]):
            raise UserError(f"{prefix}std[{i}]={v!r}: must be a finite number in [{NORMAL[0]:g}, {NORMAL[1]:g}]")


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check(cfg: DictConfig, *, memo: dict[str, Any] | None = None) -> None:
    """Raise a one-line UserError if `cfg` (validated by dia.config) cannot run here. Reads the labels, and every file
    a user hands in (`model.checkpoint`, `captured.file`), checked as the run will use them.

    `memo` caches each data config's labels (and each model's checks) across calls (dia.grid checks many cells of a
    few data configs).
    """
    memo = {} if memo is None else memo
    check_wandb(cfg.logger.wandb)
    data = cfg.data
    check_normalization(data)
    image = (int(data.channels), int(data.image_size), int(data.image_size))
    check_input_memory(cfg.batch_size, image, str(cfg.run.device), key=f"data.image_size={data.image_size}")
    if cfg.captured.file is not None:  # one captured update: no victims to choose; the file and checkpoint, read
        check_captured(cfg, memo)
        return _check_login(cfg)
    n_victims = None
    if data.source in CATALOGS:
        key = json.dumps(OmegaConf.to_container(data, resolve=True), sort_keys=True)
        if key not in memo:
            memo[key] = CATALOGS.get(data.source)(data)
        labels = memo[key]
        what = f"data={data.name} ({data.source} {data.embedded if data.source == 'embedded' else data.root})"
        chosen = select_indices(
            len(labels), what, None if cfg.victims is None else list(cfg.victims), cfg.num_victims, cfg.victim_seed
        )
        n_victims = len(chosen)
        bad = [labels[i] for i in chosen if not 0 <= labels[i] < data.num_classes]
        if bad:
            raise UserError(
                f"data.num_classes={data.num_classes} but a victim has label {bad[0]} (valid 0..{data.num_classes - 1})"
            )
    elif data.source == "torchvision":
        require_root(data)
    if n_victims is None and cfg.victims is not None:
        n_victims = len(cfg.victims)
    elif n_victims is None:
        n_victims = cfg.num_victims
    if n_victims % cfg.batch_size:
        raise UserError(
            f"batch_size={cfg.batch_size}: {n_victims} victims do not split into client batches of that size"
        )
    if cfg.model.checkpoint:
        model_parameters(cfg, memo)  # builds the model with its checkpoint: the file is read and checked
    check_local_steps(cfg, memo)
    _check_login(cfg)


def check_captured(cfg: DictConfig, memo: dict[str, Any]) -> None:
    """`captured.file` (and `model.checkpoint`) read and checked as the run will read them (dia.clients.captured:
    every defect one line naming the file and the key), and the client's T local steps (the file's own, or the
    config's for a bare file) unrolled within memory."""
    key = "captured:" + json.dumps(
        [OmegaConf.to_container(cfg[k], resolve=True) for k in ("captured", "model", "data", "client", "attack")]
        + [cfg.run.device, cfg.defense.name],
        sort_keys=True,
        default=str,
    )
    if key in memo:
        return
    from dia.clients import captured

    sim = captured(cfg)
    local = sim.problems.local
    if local is not None:
        parameters = sum(p.numel() for p in sim.model.parameters())
        check_unrolled(local.steps, parameters, str(cfg.run.device), key=f"captured.file '{cfg.captured.file}'")
    memo[key] = True


def _check_login(cfg: DictConfig) -> None:
    if cfg.logger.wandb.mode == "online" and not wandb_login():
        raise UserError(
            "logger.wandb.mode=online needs a W&B login (`wandb login` or WANDB_API_KEY); "
            "or use logger.wandb.mode=offline (sync later) or disabled"
        )


# Unrolling T local steps keeps, per problem and step, about this many float32 copies of the model's parameters
# for the double backward (p_t, g_t and their graph; measured 4.9 for the MLP on a CPU, benchmarks/fedavg.py).
STEP_COPIES = 6


def model_parameters(cfg: Any, memo: dict[str, Any]) -> int:
    """How many parameters the run's model has (built once per model config; with `model.checkpoint`, the file is
    read and checked as the run will load it, dia.models.load_checkpoint)."""
    key = "parameters:" + json.dumps(
        [OmegaConf.to_container(cfg.model, resolve=True), cfg.data.channels, cfg.data.image_size, cfg.data.num_classes],
        sort_keys=True,
        default=str,
    )
    if key not in memo:
        from dia.models import build_model

        model = build_model(
            cfg.model,
            channels=cfg.data.channels,
            image_size=cfg.data.image_size,
            num_classes=cfg.data.num_classes,
            seed=0,
        )
        memo[key] = sum(p.numel() for p in model.parameters())
    return memo[key]


def unrolled_bytes(cfg: Any, memo: dict[str, Any] | None = None) -> int:
    """A lower estimate of the memory one problem's unrolled T local steps take in the attack program (bytes)."""
    return int(cfg.client.local_steps) * STEP_COPIES * 4 * model_parameters(cfg, {} if memo is None else memo)


def device_memory(name: str) -> tuple[int, str]:
    """(bytes, description) of the memory a run on device `name` (run.device) can use: the GPU's, or the RAM."""
    import torch

    if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
        index = int(name.split(":")[1]) if ":" in name else 0
        props = torch.cuda.get_device_properties(index)
        return int(props.total_memory), props.name
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def _memory(name: str) -> tuple[int, str] | None:
    try:
        return device_memory(name)
    except (RuntimeError, AssertionError, ValueError):  # no such device: dia.run.runs.resolve_device says so
        return None


def check_local_steps(cfg: Any, memo: dict[str, Any]) -> None:
    """FedAvg: even one problem's T unrolled local steps must fit in the device's memory (else one line saying
    how many steps would)."""
    steps = int(cfg.client.local_steps)
    if steps > 1:
        check_unrolled(steps, model_parameters(cfg, memo), str(cfg.run.device), key=f"client.local_steps={steps}")


def check_unrolled(steps: int, parameters: int, device: str, *, key: str) -> None:
    """One problem's T unrolled local steps of a model of `parameters` fit in `device`'s memory; else one line
    starting with `key` that says how many steps would."""
    if steps <= 1:
        return
    memory = _memory(device)
    need = steps * STEP_COPIES * 4 * parameters
    if memory is not None and need > memory[0]:
        total, what = memory
        fit = max(1, total // (need // steps))
        raise UserError(
            f"{key}: unrolling {steps} local steps needs about {need / 2**30:.1f} GiB per "
            f"problem, more than the {total / 2**30:.1f} GiB of {what}; at most {fit} steps fit"
        )


# Per element of the images being reconstructed, the attack holds at least this many float32 copies: the dummies,
# Adam's two moments, the best iterate, their gradient, and the model's input and its gradient.
INPUT_COPIES = 8
SMALL = 1 << 30  # below this, nothing asks the device (no torch import for the usual sizes)


def check_input_memory(images: int, shape: tuple[int, ...], device: str, *, key: str) -> None:
    """`images` images of `shape` (C, H, W) fit in `device`'s memory as the attack holds them (a lower estimate:
    INPUT_COPIES float32 copies); else one line starting with `key`."""
    need = images * math.prod(shape) * 4 * INPUT_COPIES
    if need < SMALL:
        return
    memory = _memory(device)
    if memory is not None and need > memory[0]:
        raise UserError(
            f"{key}: {images} image(s) of {tuple(shape)} need about {need / 2**30:.1f} GiB in the attack, more than "
            f"the {memory[0] / 2**30:.1f} GiB of {memory[1]}"
        )
