"""The clients of a run, as the server's attack sees them: victims -> model -> clients -> problems.

`simulate(cfg)` plays the clients of a run config (each consecutive group of `batch_size` victims is one client:
it runs its model in train mode, dropout drawn at random and recorded, applies its defense and sends its
gradient or, with T local steps, its weight update); `captured(cfg)` reads what a real client sent
(`captured.file`); `client_problems` turns any clients' gradients for a capturable model into problems.
Everything a run attacks comes from here; the attack itself is dia.attacks, the run's plumbing dia.run.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dia.data import Victims, load_victims, normalizer
from dia.defenses import defend, per_example_gradients, split_defense
from dia.errors import UserError
from dia.gradients import client_gradients, client_update
from dia.models import build_for
from dia.models.dropout import dropout_control, dropout_sites
from dia.problems import LocalTraining, Problems, infer_labels, problem_seed
from dia.updates import (
    ClientUpdate,
    check_digests,
    gradients_of,
    keep_mask,
    labels_of,
    local_training,
    read_updates,
    stack,
)


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


def simulate(cfg: DictConfig) -> Simulation:
    """The victims, model and clients of a run config: what `python -m dia.train` attacks (`captured` for a
    `captured.file`).

    Each consecutive group of `batch_size` victims is one client: it runs its model in train mode (dropout
    drawn at random and recorded), applies its defense, and sends its gradient (`simulate_clients`).
    """
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
        inferred = infer_labels(problems.targets, cfg.data.num_classes, cfg.batch_size)
        problems = replace(problems, labels=inferred.view(-1, cfg.batch_size))
    return Simulation(cfg, victims, model, problems, mean, std)


def captured(cfg: DictConfig) -> Simulation:
    """The one problem of a captured update file (`captured.file`), for the config's model (its checkpoint) and
    data (image shape, normalization, classes): what `python -m dia.train captured.file=FILE` attacks.

    A `ClientUpdate` file (dia.capture_update) brings its labels, its training (T local steps, lr, local batch) and
    the weights it was computed at, and, for evaluation only, the client's masks and images; what the config says
    against it is one line. A bare gradient/delta/weights file (`captured.kind`, `captured.lr`, the `client`
    section) needs `attack.labels=infer` (one image).
    """
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
    [(where, sent)] = read_updates(path, where="captured.file")
    saved = sent if isinstance(sent, ClientUpdate) else None
    grads, labels, local = _saved_client(cfg, model, where, saved) if saved else _bare_client(cfg, model, where, sent)
    problems = client_problems(
        model,
        grads,
        labels,
        shape,
        masks=saved.masks if saved is not None else None,
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


def _saved_client(cfg: DictConfig, model: nn.Module, where: str, saved: ClientUpdate) -> tuple[Any, Tensor, Any]:
    """A saved ClientUpdate's gradient, labels and local training, checked against the model and the config."""
    b = saved.batch
    if cfg.captured.kind != "gradient" or (cfg.captured.lr is not None and cfg.captured.lr != saved.lr):
        raise UserError(
            f"captured.kind={cfg.captured.kind}, captured.lr={cfg.captured.lr}: {where} is a saved ClientUpdate, "
            f"which carries its own (a gradient, lr={saved.lr}); leave captured.kind and captured.lr unset"
        )
    if cfg.client.local_steps != 1 and cfg.client.local_steps != saved.steps:
        raise UserError(
            f"client.local_steps={cfg.client.local_steps}: {where} says its client took {saved.steps} local step(s); "
            "leave client.local_steps unset (the file's own is used)"
        )
    grads = gradients_of(model, [(where, saved)])
    check_digests(model, [(where, saved)])
    labels = labels_of(saved.labels, 1, num_classes=cfg.data.num_classes)
    if cfg.attack.labels == "infer":
        if b != 1:
            raise UserError(
                f"attack.labels=infer: {where} carries its {b} labels, and inferring supports one image; "
                "leave attack.labels=known"
            )
        labels = infer_labels(stack(grads), cfg.data.num_classes).view(1, 1)
    local = (
        local_training(saved.steps, saved.lr, saved.local_batch, b) if saved.steps > 1 or saved.local_batch else None
    )
    return grads, labels, local


def _bare_client(cfg: DictConfig, model: nn.Module, where: str, sent: Any) -> tuple[Any, Tensor, Any]:
    """A bare update file's gradient, inferred label (one image) and local training (the config's `client`)."""
    if cfg.captured.kind != "gradient" and cfg.captured.lr is None:
        raise UserError(
            f"captured.lr: captured.kind={cfg.captured.kind} needs the client's local learning rate (a number > 0)"
        )
    grads = gradients_of(model, [(where, sent)], kind=cfg.captured.kind, lr=cfg.captured.lr)
    if cfg.attack.labels != "infer":
        raise UserError(
            f"{where}: holds no labels; set attack.labels=infer (one image per client), or save the "
            "update with its labels (dia.capture_update(...).save)"
        )
    labels = infer_labels(stack(grads), cfg.data.num_classes).view(1, 1)
    return grads, labels, LocalTraining.of(cfg.client, 1)


def simulate_clients(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    seed: int,
    defense: Any = None,
    lower: Tensor | None = None,
    upper: Tensor | None = None,
    local: LocalTraining | None = None,
) -> Problems:
    """Each consecutive group of `batch_size` (normalized) images is one client's batch and one problem.
    `lower`/`upper`: the valid image range in that normalized space (public: the attack keeps images in it).

    `defense` (a `defense` config section, see dia.defenses) is applied to what each client sends, with
    its own generator per client; None or `name: none` leaves the gradients as computed.
    `local`: FedAvg clients (T local SGD steps on their own model copy, fresh masks each step; DP-SGD per step,
    the other defenses on the final update); None: one gradient step (FedSGD).
    """
    n = images.shape[0]
    k = n // batch_size
    targets: list[dict[str, Tensor]] = []
    masks: list[dict[str, Tensor]] = []
    for j in range(k):  # one-time work per client; the attack itself is vectorized over problems
        sl = slice(j * batch_size, (j + 1) * batch_size)
        gen = torch.Generator(device=images.device).manual_seed(problem_seed(seed, j) + 1)
        noise = torch.Generator(device=images.device).manual_seed(problem_seed(seed, j) + 2)
        if local is None:
            g, m = client_gradients(model, images[sl], labels[sl], generator=gen)
            g = defend(
                g,
                defense,
                noise,
                None if batch_size == 1 else lambda sl=sl, m=m: per_example_gradients(model, images[sl], labels[sl], m),
            )
        else:
            per_step, final = split_defense(defense)
            g, m = client_update(
                model,
                images[sl],
                labels[sl],
                local,
                generator=gen,
                defend_step=lambda grads, mdl, x, y, mk, per_step=per_step, noise=noise: defend(
                    grads, per_step, noise, None if len(y) == 1 else lambda: per_example_gradients(mdl, x, y, mk)
                ),
            )
            g = defend(g, final, noise)
        targets.append(g)
        masks.append(m)
    sites = dropout_sites(model, active_only=True)
    rates = {name: site.p for name, site in sites.items()}
    per_step = batch_size if local is None else local.per_step(batch_size)
    with torch.no_grad(), dropout_control(model, "record") as probe:  # shapes are public: any input of the size works
        model(torch.zeros_like(images[:per_step]))
    steps = 1 if local is None else local.steps
    return Problems(
        targets={name: torch.stack([g[name] for g in targets]) for name in targets[0]},
        labels=labels[: k * batch_size].view(k, batch_size),
        input_shape=tuple(images[:batch_size].shape),
        mask_shapes={name: (steps * per_step, *probe.masks[name].shape[1:]) for name in rates},
        rates=rates,
        kinds={name: site.kind for name, site in sites.items()},
        seeds=[problem_seed(seed, j) for j in range(k)],
        true_masks={name: torch.stack([m[name] for m in masks]) for name in rates},
        lower=lower,
        upper=upper,
        local=local,
    )


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
    k, b = labels.shape
    per_step, steps = (b, 1) if local is None else (local.per_step(b), local.steps)
    sites = dropout_sites(model, active_only=True)
    with torch.no_grad(), dropout_control(model, "record") as probe:  # shapes are public: any input of the size works
        model.train()
        model(torch.zeros(per_step, *input_shape))
    shapes = {n: (steps * per_step, *probe.masks[n].shape[1:]) for n in sites if n in probe.masks}
    true = client_masks(masks, shapes, k) if masks is not None else None
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


def client_masks(masks: Any, shapes: dict[str, tuple[int, ...]], k: int) -> dict[str, Tensor]:
    """The clients' masks as {site: (K, B, ...)}, checked against the model's sites: {site: (B, ...) or (K, B, ...)},
    one such dict (or ClientUpdate) per client, or a ClientUpdate; recorded keep-masks of 0 and 1 only."""
    masks = _per_site(masks, k)
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
        m = keep_mask(masks[n], f"masks: '{n}'")
        if tuple(m.shape) == shape and k == 1:
            m = m.unsqueeze(0)
        if tuple(m.shape) != (k, *shape):
            raise UserError(
                f"masks: '{n}' has shape {tuple(m.shape)}; the site's mask is {shape} per client ({k} client(s)); "
                "masks of another batch size or number of local steps?"
            )
        out[n] = m
    return out


def _per_site(masks: Any, k: int) -> Mapping[str, Any]:
    """`masks` as one {site: mask} dict: a ClientUpdate's, or one dict (or ClientUpdate) per client stacked."""
    if isinstance(masks, ClientUpdate):
        if masks.masks is None:
            raise UserError("masks: the ClientUpdate holds no masks (capture_update records them)")
        masks = masks.masks
    if isinstance(masks, (list, tuple)):  # one dict per client
        per = [m.masks if isinstance(m, ClientUpdate) else m for m in masks]
        if len(per) != k or not all(isinstance(m, Mapping) and m for m in per):
            raise UserError(
                f"masks: a list of {len(per)}; give one {{site: keep-mask}} (or ClientUpdate with masks) per client "
                f"({k}), or one dict of (K, B, ...) masks"
            )
        sites = list(per[0])
        if any(list(m) != sites for m in per):
            raise UserError("masks: the clients' mask dicts name different sites; give the same sites for every client")
        masks = {n: _stack([keep_mask(m[n], f"masks {i}: '{n}'") for i, m in enumerate(per)], n) for n in sites}
    if not isinstance(masks, Mapping):
        raise UserError(f"masks: a {type(masks).__name__}; give {{site: keep-mask}} (capture_update records them)")
    return masks


def _stack(masks: list[Tensor], site: str) -> Tensor:
    if any(m.shape != masks[0].shape for m in masks):
        shapes = sorted({tuple(m.shape) for m in masks})
        raise UserError(f"masks: '{site}' has shapes {shapes[:2]} across the clients; give every client's at one shape")
    return torch.stack(masks)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (what Lightning's seed_everything does)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


__all__ = [
    "Simulation",
    "simulate",
    "captured",
    "simulate_clients",
    "client_problems",
    "client_masks",
    "seed_everything",
]
