"""dia as a library: attack your own model and what a client sent, simulate clients, check, evaluate.

    r = dia.reconstruct(model, grads, labels=y, input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
                        attack="dia", max_iterations=1500)
    r.images                      # (N, C, H, W) in [0, 1]
    dia.evaluate(r, originals)    # the metrics of a run's metrics.json

The command line, grids and Slurm tasks use these same functions (`simulate` builds every run's problems;
`reconstruct` runs the same attack modules under the same Trainer harness as `dia.train`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dia.data import Victims, load_victims, normalizer
from dia.errors import UserError
from dia.problems import LocalTraining, Problems, infer_labels, simulate_clients


@dataclass
class Simulation:
    """One run's inputs: the victims, the client's model and what each client sent (the problems, with the
    clients' true masks for evaluation), in the normalized space of `mean`/`std`."""

    cfg: DictConfig
    victims: Victims | None  # None: a captured update (captured.file) without its images
    model: nn.Module
    problems: Problems
    mean: Tensor
    std: Tensor

    @property
    def lower(self) -> Tensor:
        return (0 - self.mean) / self.std

    @property
    def upper(self) -> Tensor:
        return (1 - self.mean) / self.std


def simulate(*overrides: str, config: DictConfig | None = None) -> Simulation:
    """The victims, model and clients of a run config (`config`, or command-line style `overrides` such as
    "model=vit", "data=cifar10", "victims=[0,1]"): what `python -m dia.train` attacks.

    Each consecutive group of `batch_size` victims is one client: it runs its model in train mode (dropout
    drawn at random and recorded), applies its defense, and sends its gradient (dia.problems).
    """
    from dia.config import compose
    from dia.models import build_for

    cfg = config if config is not None else compose(list(overrides))
    if cfg.captured.file is not None:
        return captured(cfg)
    victims = load_victims(
        cfg.data,
        indices=None if cfg.victims is None else list(cfg.victims),
        count=cfg.num_victims,
        seed=cfg.victim_seed,
    )
    model = build_for(cfg)
    if victims.labels.max() >= cfg.data.num_classes:
        raise UserError(f"data.num_classes={cfg.data.num_classes} but a victim has label {int(victims.labels.max())}")
    seed_everything(cfg.run.seed)
    mean, std = normalizer(cfg.data)
    problems = simulate_clients(
        model,
        (victims.images - mean) / std,
        victims.labels,
        batch_size=cfg.batch_size,
        seed=cfg.run.seed,
        defense=cfg.defense,
        lower=(0 - mean) / std,
        upper=(1 - mean) / std,
        local=LocalTraining.of(cfg.client, cfg.batch_size),
    )
    if cfg.attack.labels == "infer":
        if cfg.batch_size != 1:
            raise UserError(
                f"attack.labels=infer supports batch_size=1 only (the last-layer sign rule); got batch_size={cfg.batch_size}"
            )
        problems = replace(problems, labels=infer_labels(problems.targets, cfg.data.num_classes).view(-1, 1))
    return Simulation(cfg, victims, model, problems, mean, std)


def captured(cfg: DictConfig) -> Simulation:
    """The one problem of a captured update file (`captured.file`), for the config's model (its checkpoint) and
    data (image shape, normalization, classes): what `python -m dia.train captured.file=FILE` attacks.

    A `ClientUpdate` file (dia.capture_update) brings its labels, and, for evaluation only, the client's masks
    and images; a bare gradient/delta/weights file (`captured.kind`, `captured.lr`) needs `attack.labels=infer`.
    """
    from dia.attacks import ATTACKS
    from dia.models import build_for
    from dia.updates import ClientUpdate, as_gradients, labels_of, local_training, read_file, stack

    path = Path(cfg.captured.file)
    if cfg.defense.name != "none":
        raise UserError(
            f"defense={cfg.defense.name}: defenses apply to simulated clients; captured.file is attacked as it "
            "was sent (leave defense=none; attack.model_defense still models one)"
        )
    model = build_for(cfg)
    seed_everything(cfg.run.seed)
    mean, std = normalizer(cfg.data)
    shape = (int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    flat = read_file(path)
    saved = ClientUpdate.from_tensors(flat) if isinstance(flat, dict) and "labels" in flat else None
    where = f"captured.file '{path}'"
    if saved is None and cfg.captured.kind != "gradient" and cfg.captured.lr is None:
        raise UserError(
            f"captured.lr: captured.kind={cfg.captured.kind} needs the client's local learning rate (a number > 0)"
        )
    if saved is not None:
        grads = as_gradients(model, saved.gradient, where=where)
    else:
        grads = as_gradients(model, flat, kind=cfg.captured.kind, lr=cfg.captured.lr, where=where)
    if cfg.attack.labels == "infer":
        labels = infer_labels(stack(grads), cfg.data.num_classes).view(1, 1)
    elif saved is None:
        raise UserError(
            f"{where}: holds no labels; set attack.labels=infer (one image per client), or save the "
            "update with its labels (dia.capture_update(...).save)"
        )
    else:
        labels = labels_of(saved.labels, 1, num_classes=cfg.data.num_classes)
    masks = saved.masks if saved is not None else None
    if ATTACKS.get(cfg.attack.name).needs_client_masks and not masks:
        raise UserError(
            f"attack={cfg.attack.name}: needs the client's dropout masks; {where} has none "
            "(dia.capture_update records them)"
        )
    b = int(labels.shape[1])
    if saved is not None:  # the file says how the client trained (FedSGD, or T local steps)
        local = (
            local_training(saved.steps, saved.lr, saved.local_batch, b)
            if saved.steps > 1 or saved.local_batch
            else None
        )
    else:  # a bare file: as the config's `client` section says
        local = LocalTraining.of(cfg.client, b)
    problems = client_problems(
        model,
        grads,
        labels,
        shape,
        masks=masks,
        seed=cfg.run.seed,
        lower=(0 - mean) / std,
        upper=(1 - mean) / std,
        local=local,
    )
    victims = None
    if saved is not None and saved.images is not None:
        images = saved.images.float()
        if tuple(images.shape) != problems.input_shape:
            raise UserError(f"{where}: its images are {tuple(images.shape)}; the model takes {problems.input_shape}")
        victims = Victims(
            (images * std + mean).clamp(0, 1), saved.labels.long().flatten(), list(range(images.shape[0]))
        )
    return Simulation(cfg, victims, model, problems, mean, std)


@dataclass
class Reconstruction:
    """What an attack recovered, client after client: `images` (N, C, H, W) in [0, 1] (N = clients x batch),
    the labels it used (K, B), the masks it recovered (DIA; {site: (K, B, ...)}), and per client its best
    loss, status, iterations and the iteration of its best iterate."""

    images: Tensor
    labels: Tensor
    masks: dict[str, Tensor] | None
    loss: Tensor
    status: list[str]
    iterations: Tensor
    best_iteration: Tensor
    attack: str
    settings: Any  # the attack's settings (an attack section of a run config)
    problems: Problems  # what the attack was given (as the server saw it)
    mean: Tensor
    std: Tensor
    folder: Path | None = None

    @property
    def normalized(self) -> Tensor:
        """The reconstructions (K, B, C, H, W) in the attack's normalized space."""
        k, b = self.labels.shape
        return ((self.images - self.mean) / self.std).view(k, b, *self.images.shape[1:])

    def result(self) -> Any:
        """As a `dia.engine.AttackResult` (normalized space)."""
        from dia.engine import AttackResult

        return AttackResult(
            x=self.normalized,
            masks=self.masks,
            best_loss=self.loss,
            best_iteration=self.best_iteration,
            iterations=self.iterations,
            status=list(self.status),
        )


def reconstruct(
    model: nn.Module,
    update: Any,
    *,
    labels: Any = None,
    input_shape: Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attack: Any = "dia",
    kind: str = "gradient",
    lr: float | None = None,
    masks: Any = None,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    progress: bool = False,
    local_steps: int | None = None,
    local_batch: int | None = None,
    **settings: Any,
) -> Reconstruction:
    """Reconstruct the images behind `update`, what one client (or several) sent for `model`.

    - `update`: a gradient as a dict name -> tensor, a list of arrays in `model.parameters()` order (Flower's
      `parameters_to_ndarrays`), a `.pt` (loaded with `weights_only=True`) or `.npz` file, a `ClientUpdate`;
      or a list of those: several clients, attacked together in one vectorized program.
      `kind="delta"` (w_0 - w_1) or `"weights"` (the client's new weights; w_0 are `model`'s) with the
      client's SGD learning rate `lr`: one local step, attacked as a gradient.
    - `local_steps` T > 1 (FedAvg): the client took T SGD steps with learning rate `lr`, each on `local_batch`
      of its images (consecutive chunks; None: all), with fresh dropout masks each; the attack unrolls them.
      Default: a `ClientUpdate`'s own (capture_update records them), else 1.
    - `labels`: per client (B,) or for all (K, B); None infers them from the gradient (batch size 1).
    - `input_shape`: (C, H, W) of one image as the model takes it; `mean`/`std` of that normalization (the
      images are kept in the valid [0, 1] range and returned in it; default: the model takes [0, 1] images).
    - `attack`: "ig", "wiig", "dia", "dlg", any registered name, or an attack class; `settings`: its keys as
      in `configs/attack/` and `python -m dia.train --help` (max_iterations, lr, mask_weight, ...).
    - `masks`: the client's recorded dropout masks, {site: (B, ...) or (K, B, ...)}: needed by "wiig" only.
    - `out`: a folder to write the run into (as dia.train does); nothing is written otherwise.

    Bad input raises `dia.UserError` with one line naming the tensor, key or file.
    """
    from dia.attacks import ATTACKS, InvertingGradients
    from dia.config import attack_settings
    from dia.run.cell import resolve_device
    from dia.run.pack import fit
    from dia.updates import (
        ClientUpdate,
        _num_classes,
        as_gradients,
        capturable,
        clients_of,
        labels_of,
        local_training,
        stack,
    )

    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"input_shape={tuple(input_shape)}: give (channels, height, width) of one image")
    mean_t, std_t = _normalization(mean, std, shape[0])
    cls = ATTACKS.get(attack) if isinstance(attack, str) else attack
    if not (isinstance(cls, type) and issubclass(cls, InvertingGradients)):
        raise UserError(f"attack={attack!r}: a registered name ({', '.join(ATTACKS.names())}) or an attack class")
    cfg = attack_settings(cls, **settings)
    twin = capturable(model, torch.zeros(1, *shape))
    grads = as_gradients(twin, update, kind=kind, lr=lr)
    num_classes = _num_classes(twin, torch.zeros(1, *shape))
    if labels is None:
        from dia.problems import infer_labels

        y = infer_labels(stack(grads), num_classes).view(-1, 1)
    else:
        y = labels_of(labels, len(grads), num_classes=num_classes)
    captured = [u for u in clients_of(update) if isinstance(u, ClientUpdate)]
    if local_steps is None:
        local_steps = captured[0].steps if captured else 1
        local_batch = captured[0].local_batch if captured and local_batch is None else local_batch
    if lr is None and captured:
        lr = captured[0].lr
    local = local_training(local_steps, lr, local_batch, int(y.shape[1]))
    problems = client_problems(
        twin,
        grads,
        y,
        shape,
        masks=masks,
        seed=seed,
        lower=(0 - mean_t) / std_t,
        upper=(1 - mean_t) / std_t,
        local=local,
    )
    if cls.needs_client_masks and problems.true_masks is None:
        raise UserError(f"attack={cls.name}: needs the client's dropout masks (masks=...; capture_update records them)")
    module = cls(twin, cls.view(problems), cfg)
    fit(module, resolve_device(device), title=f"{cls.name.upper()} x{problems.num_problems}", progress=progress)
    res = module.result()
    rec = Reconstruction(
        images=(res.x.flatten(0, 1) * std_t + mean_t).clamp(0, 1),
        labels=y,
        masks=res.masks,
        loss=res.best_loss,
        status=res.status,
        iterations=res.iterations,
        best_iteration=res.best_iteration,
        attack=cls.name,
        settings=cfg,
        problems=cls.view(problems),
        mean=mean_t,
        std=std_t,
    )
    if out is not None:
        save(rec, out)
    return rec


def client_problems(
    model: nn.Module,
    grads: list[dict[str, Tensor]],
    labels: Tensor,
    input_shape: tuple[int, ...],
    *,
    masks: Any = None,
    seed: int = 0,
    lower: Tensor | None = None,
    upper: Tensor | None = None,
    local: LocalTraining | None = None,
) -> Problems:
    """The attack problems of K clients' gradients for a capturable `model`: targets, labels (K, B), the
    dropout sites' shapes and rates (public: the model's), per-problem seeds, the clients' masks if given;
    `local`: the clients' T local steps (FedAvg; each site's masks are then (T * b, ...) per client)."""
    from dia.models.dropout import dropout_control, dropout_sites
    from dia.problems import problem_seed
    from dia.updates import stack

    k, b = labels.shape
    per_step, steps = (b, 1) if local is None else (local.per_step(b), local.steps)
    sites = dropout_sites(model, active_only=True)
    with torch.no_grad(), dropout_control(model, "record") as probe:  # shapes are public: any input of the size works
        model.train()
        model(torch.zeros(per_step, *input_shape))
    shapes = {n: (steps * per_step, *probe.masks[n].shape[1:]) for n in sites if n in probe.masks}
    true = _masks(masks, shapes, k) if masks is not None else None
    return Problems(
        targets=stack(grads),
        labels=labels,
        input_shape=(b, *input_shape),
        mask_shapes=shapes,
        rates={n: sites[n].p for n in shapes},
        kinds={n: sites[n].kind for n in shapes},
        seeds=[problem_seed(seed, j) for j in range(k)],
        true_masks=true,
        lower=lower,
        upper=upper,
        local=local,
    )


def _masks(masks: Any, shapes: dict[str, tuple[int, ...]], k: int) -> dict[str, Tensor]:
    """The clients' masks as {site: (K, B, ...)}, checked against the model's sites."""
    from dia.updates import ClientUpdate

    if isinstance(masks, ClientUpdate):
        masks = masks.masks
    if isinstance(masks, (list, tuple)):  # one dict per client
        masks = {n: torch.stack([torch.as_tensor(m[n]) for m in masks]) for n in (masks[0] or {})}
    if not isinstance(masks, Mapping):
        raise UserError(f"masks: a {type(masks).__name__}; give {{site: keep-mask}} (capture_update records them)")
    if not shapes:
        raise UserError("masks: given, but the model has no dropout")
    unknown = [n for n in masks if n not in shapes]
    missing = [n for n in shapes if n not in masks]
    if unknown or missing:
        raise UserError(
            f"masks: {'unknown site ' + repr(unknown[0]) if unknown else 'no mask for site ' + repr(missing[0])}; "
            f"the model's dropout sites: {', '.join(shapes)}"
        )
    out = {}
    for n, shape in shapes.items():
        m = torch.as_tensor(np.asarray(masks[n]) if not isinstance(masks[n], Tensor) else masks[n]).float()
        if tuple(m.shape) == shape and k == 1:
            m = m.unsqueeze(0)
        if tuple(m.shape) != (k, *shape):
            raise UserError(
                f"masks: '{n}' has shape {tuple(m.shape)}; the site's mask is {shape} per client ({k} client(s))"
            )
        out[n] = m
    return out


def _normalization(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> tuple[Tensor, Tensor]:
    mean = [0.0] * channels if mean is None else list(mean)
    std = [1.0] * channels if std is None else list(std)
    for key, v in (("mean", mean), ("std", std)):
        if len(v) != channels or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            raise UserError(f"{key}={tuple(v)}: give {channels} finite number(s), one per channel")
    if any(s <= 0 for s in std):
        raise UserError(f"std={tuple(std)}: every value must be > 0")
    return torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)


def evaluate(
    reconstruction: Reconstruction, originals: Tensor, *, masks: Any = None, lpips: bool = False
) -> dict[str, Any]:
    """How good a reconstruction is against the `originals` (N, C, H, W) in [0, 1] (client after client):
    the per-victim rows and their means of a run's metrics.json (MSE in normalized space, PSNR, SSIM, LPIPS
    with `lpips`, and, given the clients' true `masks`, how well recovered masks find the dropped units).
    Reconstructions of one client's batch are matched to its originals first."""
    from dia.metrics import load_lpips
    from dia.run.cell import evaluate as evaluate_rows
    from dia.run.summary import mean_metrics

    originals = torch.as_tensor(originals).float()
    if tuple(originals.shape) != tuple(reconstruction.images.shape):
        raise UserError(
            f"originals: shape {tuple(originals.shape)}, the reconstruction's is {tuple(reconstruction.images.shape)}"
        )
    problems = reconstruction.problems
    if masks is not None:
        problems = replace(problems, true_masks=_masks(masks, problems.mask_shapes, problems.num_problems))
    rows, _ = evaluate_rows(
        reconstruction.result(),
        problems,
        originals,
        reconstruction.mean,
        reconstruction.std,
        lpips_fn=load_lpips("alex") if lpips else None,
    )
    return {"mean": mean_metrics(rows), "victims": rows}


def save(
    reconstruction: Reconstruction, folder: str | Path, *, originals: Tensor | None = None, masks: Any = None
) -> Path:
    """Write `reconstruction` as a run folder (the files dia.train writes): built as `.<name>.partial` beside
    `folder` and renamed when complete; an existing `folder` is never replaced."""
    from dia.run.files import save_tensors, write_json, write_text
    from dia.run.folder import RunFolder
    from dia.run.plotting import reconstruction_grid

    path = Path(folder)
    run = RunFolder(path.parent if str(path.parent) else Path("."), path.name)
    if run.state == "done":
        raise UserError(f"out: '{path}' already exists; choose another folder")
    if not run.acquire():
        raise UserError(f"out: '{path}' is being written by another process")
    try:
        from omegaconf import OmegaConf

        run.open(OmegaConf.to_yaml({"attack": OmegaConf.to_container(reconstruction.settings)}))
        write_text(
            run / "config.yaml",
            OmegaConf.to_yaml(
                {
                    "attack": OmegaConf.to_container(reconstruction.settings),
                    "input_shape": list(reconstruction.images.shape[1:]),
                    "mean": reconstruction.mean.flatten().tolist(),
                    "std": reconstruction.std.flatten().tolist(),
                }
            ),
        )
        metrics: dict[str, Any] = {
            "status": "diverged" if "diverged" in reconstruction.status else "completed",
            "attack": reconstruction.attack,
            "clients": int(reconstruction.labels.shape[0]),
            "iterations": int(reconstruction.iterations.max()),
        }
        if originals is not None:
            metrics |= evaluate(reconstruction, originals, masks=masks)
        else:
            b = reconstruction.labels.shape[1]
            metrics["victims"] = [
                {
                    "problem": i // b,
                    "label": int(reconstruction.labels.flatten()[i]),
                    "status": reconstruction.status[i // b],
                    "iterations": int(reconstruction.iterations[i // b]),
                    "loss": float(reconstruction.loss[i // b]),
                }
                for i in range(reconstruction.images.shape[0])
            ]
        tensors = {"reconstructions": reconstruction.images, "labels": reconstruction.labels.flatten()}
        tensors |= {f"masks/{k}": v for k, v in (reconstruction.masks or {}).items()}
        if originals is not None:
            tensors["originals"] = torch.as_tensor(originals)
        save_tensors(run / "reconstructions.pt", tensors)
        titles = [
            f"#{i}" + (f"  SSIM {r['ssim']:.2f}" if originals is not None else "")
            for i, r in enumerate(metrics["victims"])
        ]
        reconstruction_grid(
            run / "reconstructions.png",
            originals,
            reconstruction.images,
            titles,
            title=f"{reconstruction.attack.upper()}: {len(titles)} reconstruction(s)",
        )
        write_json(run / "metrics.json", metrics)
        reconstruction.folder = run.finish()
    finally:
        run.release()
    return reconstruction.folder


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (what Lightning's seed_everything does)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


__all__ = [
    "Simulation",
    "simulate",
    "Reconstruction",
    "reconstruct",
    "client_problems",
    "evaluate",
    "save",
    "seed_everything",
]
