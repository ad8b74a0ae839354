"""`check(cfg)`: what a run needs from the world, checked before anything is built or written.

`dia.config.validate` checks what the config alone decides (ranges, types, names, devices). This module
takes the cheap look at the data and the environment that the rest needs: the data folder exists, the
victim indices are in range, their labels are within `data.num_classes`, the victims split into client
batches, and `logger.wandb.mode=online` has a W&B login. `dia.grid --validate` calls it for every cell
(with a `memo`, so each data config is looked at once) and a run calls it before it starts.
A problem raises one `UserError` line.
"""

from __future__ import annotations

import json
import netrc
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dia.data import folder_samples, require_folder, require_root, select_indices
from dia.errors import UserError
from dia.registry import Registry

Catalog = Callable[[Any], "list[int]"]  # a data config -> the label of every image the source holds
CATALOGS: Registry[Catalog] = Registry("data.source")


@CATALOGS.register("embedded")
def embedded_labels(data: Any) -> list[int]:
    """The labels of an embedded victim set (one small array read from dia/assets)."""
    try:
        with resources.as_file(resources.files("dia.assets").joinpath(data.embedded)) as p, np.load(p, allow_pickle=False) as npz:
            return [int(v) for v in npz["labels"]]
    except (FileNotFoundError, KeyError, ValueError):
        shipped = sorted(p.name for p in resources.files("dia.assets").iterdir() if p.name.endswith(".npz"))
        raise UserError(f"data.embedded: no embedded set '{data.embedded}'; shipped: {', '.join(shipped)}") from None


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


def check(cfg: DictConfig, *, memo: dict[str, Any] | None = None) -> None:
    """Raise a one-line UserError if `cfg` (validated by dia.config) cannot run here; nothing is loaded but labels.

    `memo` caches each data config's labels across calls (dia.grid checks many cells of a few data configs).
    """
    memo = {} if memo is None else memo
    data = cfg.data
    n_victims = None
    if data.source in CATALOGS:
        key = json.dumps(OmegaConf.to_container(data, resolve=True), sort_keys=True)
        if key not in memo:
            memo[key] = CATALOGS.get(data.source)(data)
        labels = memo[key]
        what = f"data={data.name} ({data.source} {data.embedded if data.source == 'embedded' else data.root})"
        chosen = select_indices(len(labels), what, None if cfg.victims is None else list(cfg.victims),
                                cfg.num_victims, cfg.victim_seed)
        n_victims = len(chosen)
        bad = [labels[i] for i in chosen if not 0 <= labels[i] < data.num_classes]
        if bad:
            raise UserError(f"data.num_classes={data.num_classes} but a victim has label {bad[0]} (valid 0..{data.num_classes - 1})")
    elif data.source == "torchvision":
        require_root(data)
    if n_victims is None and cfg.victims is not None:
        n_victims = len(cfg.victims)
    elif n_victims is None:
        n_victims = cfg.num_victims
    if n_victims % cfg.batch_size:
        raise UserError(f"batch_size={cfg.batch_size}: {n_victims} victims do not split into client batches of that size")
    if cfg.logger.wandb.mode == "online" and not wandb_login():
        raise UserError("logger.wandb.mode=online needs a W&B login (`wandb login` or WANDB_API_KEY); "
                        "or use logger.wandb.mode=offline (sync later) or disabled")
