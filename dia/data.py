"""Victim data: the embedded offline sets, torchvision datasets, or an ImageFolder; selection and normalization.

Images are returned as float tensors in [0, 1], shape (N, C, H, W); the attack works in normalized space
((x - mean) / std with the dataset's constants), as the paper's code does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dia import config
from dia.config.schema import DataConfig
from dia.errors import UserError
from dia.registry import Registry


@dataclass
class Victims:
    images: Tensor  # (N, C, H, W) in [0, 1]
    labels: Tensor  # (N,) int64
    indices: list[int]  # positions in the source dataset


Loader = Callable[[DataConfig, list[int] | None, int, int | None], Victims]
SOURCES: Registry[Loader] = Registry("data.source")


def select_indices(n_available: int, what: str, indices: list[int] | None, count: int, seed: int | None) -> list[int]:
    """Explicit indices (checked), else the first `count` (seed None) or `count` distinct ones drawn with `seed`."""
    if indices is not None:
        if len(indices) == 0:
            raise UserError("victims: the list is empty; give at least one index")
        bad = [i for i in indices if not 0 <= int(i) < n_available]
        if bad:
            raise UserError(
                f"victims: index {bad[0]} out of range for {what} ({n_available} images: valid 0..{n_available - 1})"
            )
        return [int(i) for i in indices]
    if not 1 <= count <= n_available:
        raise UserError(f"num_victims={count} out of range for {what} (1..{n_available})")
    if seed is None:
        return list(range(count))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_available, generator=g)[:count].tolist())


def read_embedded(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, C) uint8, labels (N,) int) of the embedded set `name` in dia/assets, checked: anything
    else (a folder, a .npy, object or mis-shaped arrays, a corrupt file) is one UserError naming data.embedded."""
    shipped = sorted(p.name for p in resources.files("dia.assets").iterdir() if p.name.endswith(".npz"))
    ref = resources.files("dia.assets").joinpath(name)
    try:
        with resources.as_file(ref) as path:
            if not Path(path).is_file():
                raise UserError(f"data.embedded: no embedded set '{name}' (not a file); shipped: {', '.join(shipped)}")
            with open(path, "rb") as f:
                loaded = np.load(f, allow_pickle=False)
                if not isinstance(loaded, np.lib.npyio.NpzFile):
                    raise UserError(
                        f"data.embedded: '{name}' is not an .npz archive with images and labels; shipped: "
                        f"{', '.join(shipped)}"
                    )
                with loaded as npz:
                    missing = [k for k in ("images", "labels") if k not in npz.files]
                    if missing:
                        raise UserError(
                            f"data.embedded: '{name}' has no '{missing[0]}' array (it needs images and labels)"
                        )
                    images, labels = npz["images"], npz["labels"]
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"data.embedded: cannot read '{name}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:100] if str(exc) else ''})"
        ) from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) or images.shape[0] == 0:
        raise UserError(
            f"data.embedded: '{name}' images are {images.dtype} of shape {images.shape}; expected uint8 (N, H, W, "
            "1 or 3)"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"data.embedded: '{name}' labels are {labels.dtype} of shape {labels.shape}; expected "
            f"{images.shape[0]} integers"
        )
    if labels.min() < 0:
        raise UserError(f"data.embedded: '{name}' has a negative label ({int(labels.min())})")
    return images, labels


@SOURCES.register("embedded")
def load_embedded(cfg: DataConfig, indices: list[int] | None, count: int, seed: int | None) -> Victims:
    """The victim sets shipped in dia/assets (see PROVENANCE.md there): no network needed."""
    images, labels = read_embedded(cfg.embedded)
    idx = select_indices(len(labels), f"data={cfg.name} (embedded {cfg.embedded})", indices, count, seed)
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255.0
    return Victims(x, torch.from_numpy(labels[idx]).long(), idx)


def require_root(cfg: DataConfig) -> Path:
    """`data.root` as a path (a UserError if unset)."""
    if not cfg.root:
        raise UserError(f"data.root is required for data.source={cfg.source} (data={cfg.name})")
    return Path(cfg.root).expanduser()


def require_folder(cfg: DataConfig) -> Path:
    """`data.root` as an existing folder (a UserError naming what it is otherwise)."""
    root = require_root(cfg)
    if not root.is_dir():
        what = "a file" if root.exists() else "it does not exist"
        raise UserError(
            f"data.root: '{root}' is not a directory ({what}); give the folder that holds the images (data={cfg.name})"
        )
    return root


@SOURCES.register("torchvision")
def load_torchvision(cfg: DataConfig, indices: list[int] | None, count: int, seed: int | None) -> Victims:
    """A torchvision dataset's split under `data.root` (downloaded there when `data.download` and online)."""
    import torchvision

    root = require_root(cfg)
    cls_name = cfg.torchvision_name or cfg.name.upper()
    cls = getattr(torchvision.datasets, cls_name, None)
    if cls is None:
        raise UserError(f"data.torchvision_name: torchvision has no dataset '{cls_name}'")
    try:
        ds = cls(str(root), train=cfg.split == "train", download=cfg.download)
    except Exception as exc:
        hint = "" if cfg.download else " (set data.download=true to fetch it)"
        raise UserError(
            f"data.root: cannot load {cls_name} from '{root}'{hint}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    idx = select_indices(len(ds), f"data={cfg.name} ({cls_name} {cfg.split})", indices, count, seed)
    to_tensor = torchvision.transforms.functional.to_tensor
    images, labels = zip(*(ds[i] for i in idx))
    return Victims(torch.stack([to_tensor(im) for im in images]), torch.tensor(labels, dtype=torch.long), idx)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def folder_samples(root: Path, labels_file: str | None) -> list[tuple[Path, int]]:
    """(image, label) pairs: class subfolders (sorted names -> 0, 1, ...), else the images directly in
    `root` with labels from `labels_file` (CSV lines `file,label`) or 0."""

    def image(f: Path) -> bool:  # regular files only: a FIFO or device named x.png would block the reader forever
        return f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()

    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if classes:
        return [(f, c) for c, d in enumerate(classes) for f in sorted(d.rglob("*")) if image(f)]
    files = sorted(f for f in root.iterdir() if image(f))
    table: dict[str, int] = {}
    if labels_file:
        path = Path(labels_file).expanduser()
        if not path.is_file():
            what = "no such file" if not path.exists() else "not a regular file"
            raise UserError(f"data.labels_file: {what} '{labels_file}'")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"data.labels_file: '{labels_file}' is not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise UserError(f"data.labels_file: cannot read '{labels_file}' ({exc.strerror})") from None
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.startswith("#"):
                name, _, label = line.partition(",")
                if not re.fullmatch(r"[0-9]{1,9}", label.strip()):  # ASCII digits: int() takes '٣' but not '²'
                    raise UserError(
                        f"data.labels_file: line {n} of '{labels_file}' is not 'file,label' with a label >= 0"
                    )
                table[name.strip()] = int(label)
        missing = [f.name for f in files if f.name not in table]
        if missing:
            raise UserError(f"data.labels_file: no label for '{missing[0]}' in '{labels_file}'")
    return [(f, table.get(f.name, 0)) for f in files]


@SOURCES.register("imagefolder")
def load_imagefolder(cfg: DataConfig, indices: list[int] | None, count: int, seed: int | None) -> Victims:
    """Your own images under `data.root` (class subfolders, or a flat folder with an optional label file),
    resized and center-cropped to `data.image_size`."""
    from PIL import Image
    from torchvision import transforms as T

    root = require_folder(cfg)
    samples = folder_samples(root, cfg.labels_file)
    if not samples:
        raise UserError(
            f"data.root: '{root}' holds no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...) in class subfolders or "
            "directly"
        )
    tf = T.Compose([T.Resize(int(cfg.image_size * 256 / 224)), T.CenterCrop(cfg.image_size), T.ToTensor()])
    idx = select_indices(len(samples), f"data={cfg.name} (folder '{root}')", indices, count, seed)
    mode = "L" if cfg.channels == 1 else "RGB"
    images = []
    for i in idx:
        path = samples[i][0]
        try:
            with Image.open(path) as im:
                images.append(tf(im.convert(mode)))
        except Exception as exc:
            raise UserError(f"data.root: cannot read image '{path}' ({type(exc).__name__})") from None
    return Victims(torch.stack(images), torch.tensor([samples[i][1] for i in idx], dtype=torch.long), idx)


def folder_statistics(cfg: DataConfig, limit: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to `limit` images of an image folder (for `data.normalize=folder`)."""
    n = len(folder_samples(require_folder(cfg), cfg.labels_file))
    images = load_imagefolder(cfg, list(range(min(n, limit))), 0, None).images
    return images.mean(dim=(0, 2, 3)).tolist(), images.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()


def load_victims(cfg: DataConfig, *, indices: list[int] | None, count: int, seed: int | None) -> Victims:
    """Load the victims that `cfg` and the selection name, checking they match the declared shape."""
    victims = SOURCES.get(cfg.source)(cfg, indices, count, seed)
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if tuple(victims.images.shape[1:]) != want:
        raise UserError(
            f"data: images have shape {tuple(victims.images.shape[1:])} but data={cfg.name} declares {want} "
            "(data.channels, data.image_size)"
        )
    return victims


def normalizer(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """Mean and std as (C, 1, 1) tensors."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)
    return mean, std


def check_source(cfg: Any) -> None:
    """compose's code check for `data.source`: a registered loader."""
    if cfg.data.source not in SOURCES:
        raise UserError(f"data.source={cfg.data.source!r}: must be one of: {', '.join(SOURCES.names())}")


config.register_check("data", check_source)
