"""dia as a library: attack your own model and what a client sent, simulate clients, check, evaluate, save.

    r = dia.reconstruct(model, grads, labels=y, input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
                        attack="dia", max_iterations=1500)
    r.images                      # (N, C, H, W) in [0, 1]
    dia.evaluate(r, originals)    # the metrics of a run's metrics.json

The command line, grids and Slurm tasks run the same science: `simulate` is what `python -m dia.train` attacks
(dia.clients), `reconstruct` builds and fits the same program (dia.attacks.attack), `evaluate` scores as a run
does (dia.scores) and `save` writes a run folder through the same owner of its files (dia.run.record).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dia import attacks, clients, config, tensors
from dia.attacks import ATTACKS, InvertingGradients, Part, settings_of
from dia.clients import Simulation, client_masks, client_problems
from dia.console import interactive
from dia.engine import AttackResult
from dia.errors import UserError
from dia.metrics import mean_metrics
from dia.problems import Problems, infer_labels
from dia.run import checks, record
from dia.run.folder import RunFolder
from dia.run.runs import resolve_device
from dia.scores import score
from dia.updates import (
    ClientUpdate,
    capturable,
    check_digests,
    classes_of,
    gradients_of,
    labels_of,
    local_training,
    read_updates,
    stack,
)


def simulate(*overrides: str, config: DictConfig | None = None) -> Simulation:
    """The victims, model and clients of a run config (`config`, or command-line style `overrides` such as
    "model=vit", "data=cifar10", "victims=[0,1]"): what `python -m dia.train` attacks (dia.clients.simulate)."""
    return clients.simulate(config if config is not None else _compose(list(overrides)))


def _compose(args: list[str]) -> DictConfig:
    return config.compose(args)  # the code's checks are registered: this module imports the attacks and models


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
    model: str = "model"  # the attacked model's class name (a saved run's `model`)
    folder: Path | None = None

    @property
    def normalized(self) -> Tensor:
        """The reconstructions (K, B, C, H, W) in the attack's normalized space."""
        k, b = self.labels.shape
        return ((self.images - self.mean) / self.std).view(k, b, *self.images.shape[1:])

    @property
    def dropout(self) -> float:
        """The model's largest dropout rate (0 without dropout): a saved run's `dropout`."""
        return max(self.problems.rates.values(), default=0.0)

    def result(self) -> AttackResult:
        """As a `dia.engine.AttackResult` (normalized space)."""
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
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attack: Any = "dia",
    kind: str = "gradient",
    lr: float | None = None,
    masks: Any = None,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    progress: bool | None = None,
    local_steps: int | None = None,
    local_batch: int | None = None,
    attack_lr: float | None = None,
    **settings: Any,
) -> Reconstruction:
    """Reconstruct the images behind `update`, what one client (or several) sent for `model`.

    - `update`: a gradient as a dict name -> tensor, a list of arrays in `model.parameters()` order (Flower's
      `parameters_to_ndarrays`), a `.pt` (loaded with `weights_only=True`) or `.npz` file, a `ClientUpdate` (or a
      `.pt` it saved); or a list of those: several clients, attacked together in one vectorized program.
      `kind="delta"` (w_0 - w_1) or `"weights"` (the client's new weights; w_0 are `model`'s) with the
      client's SGD learning rate `lr`: one local step, attacked as a gradient.
    - `local_steps` T > 1 (FedAvg): the client took T SGD steps with learning rate `lr`, each on `local_batch`
      of its images (consecutive chunks; None: all), with fresh dropout masks each; the attack unrolls them.
    - A `ClientUpdate` carries its labels, batch size, T, lr, local batch, the weights it was computed at and its
      images' shape: they are used, and an argument that says otherwise is one line.
    - `labels`: per client (B,) or for all (K, B); None: a ClientUpdate's own, else inferred from the gradient
      (the last-layer sign rule, one image per client).
    - `input_shape`: (C, H, W) of one image as the model takes it (default: a ClientUpdate's images'); `mean`/`std`
      of that normalization (the images are kept in the valid [0, 1] range and returned in it; default: the model
      takes [0, 1] images).
    - `attack`: "ig", "wiig", "dia", "dlg", any registered name, or an attack class; `settings`: its keys as
      in `configs/attack/` and `python -m dia.train --help` (max_iterations, mask_weight, ...); its step size
      `attack.lr` is `attack_lr` (`lr` is the client's).
    - `masks`: the client's recorded dropout masks, {site: (B, ...) or (K, B, ...)}: needed by "wiig" only.
    - `out`: a folder to write the run into (as dia.train does); nothing is written otherwise.
    - `progress`: a bar counting the iterations; None: when a person watches (a notebook, stderr a terminal).

    Every argument is checked before any work (the command line's checks: settings, shapes, labels, masks, the
    model, memory); bad input raises `dia.UserError` with one line naming the argument, tensor, key or file.
    """
    cls, cfg = _attack(attack, settings, attack_lr)
    updates = read_updates(update)
    shape = _input_shape(input_shape, updates)
    mean_t, std_t = _normalization(mean, std, shape[0])
    dev = resolve_device(device)
    checks.check_input_memory(1, shape, str(dev), key=f"input_shape={shape}")
    twin = capturable(model, torch.zeros(1, *shape))
    num_classes = classes_of(twin, torch.zeros(1, *shape))
    grads = gradients_of(twin, updates, kind=kind, lr=lr)
    check_digests(twin, updates)
    steps, lr, local_batch = _training(updates, kind, lr, local_steps, local_batch)
    y = _labels(labels, updates, grads, num_classes)
    local = local_training(steps, lr, local_batch, int(y.shape[1]))
    checks.check_input_memory(y.numel(), shape, str(dev), key=f"input_shape={shape}")
    if local is not None:
        parameters = sum(p.numel() for p in twin.parameters())
        checks.check_unrolled(local.steps, parameters, str(dev), key=f"local_steps={local.steps}")
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
    seen = cls.view(problems)  # what its server sees (an oracle without the client's masks: one line)
    shown = interactive() if progress is None else progress
    res = attacks.attack(twin, [Part(cls(cfg=cfg), seen)], device=dev, progress=shown).result()
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
        problems=seen,
        mean=mean_t,
        std=std_t,
        model=type(model).__name__,
    )
    if out is not None:
        save(rec, out)
    return rec


def _attack(attack: Any, settings: dict[str, Any], attack_lr: Any) -> tuple[type[InvertingGradients], DictConfig]:
    """The attack class and its settings (checked as the command line checks `attack.*`)."""
    cls = ATTACKS.get(attack) if isinstance(attack, str) else attack
    if not (isinstance(cls, type) and issubclass(cls, InvertingGradients)):
        raise UserError(f"attack={attack!r}: a registered name ({', '.join(ATTACKS.names())}) or an attack class")
    if attack_lr is not None:
        settings = {**settings, "lr": attack_lr}
    return cls, settings_of(cls, **settings)


def _input_shape(input_shape: Any, updates: list[tuple[str, Any]]) -> tuple[int, int, int]:
    """(C, H, W) of one image: three positive integers, the same as the images a ClientUpdate carries."""
    carried = {tuple(u.images.shape[1:]): w for w, u in updates if isinstance(u, ClientUpdate) and u.images is not None}
    if input_shape is None:
        if len(carried) == 1:
            return next(iter(carried))  # type: ignore[return-value]
        raise UserError("input_shape: give (channels, height, width) of one image as the model takes it")
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise UserError(f"input_shape={input_shape!r}: give (channels, height, width) of one image") from None
    whole = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in shape)
    if len(shape) != 3 or not whole:
        raise UserError(f"input_shape={shape}: give (channels, height, width) of one image, three positive integers")
    shape = tuple(int(v) for v in shape)
    other = next((w for s, w in carried.items() if s != shape), None)
    if other is not None:
        images = next(s for s, w in carried.items() if w == other)
        raise UserError(f"input_shape={shape}: {other} carries images of shape {images}; give that (or leave it out)")
    return shape  # type: ignore[return-value]


def _training(
    updates: list[tuple[str, Any]], kind: str, lr: Any, steps: Any, batch: Any
) -> tuple[int, float | None, int | None]:
    """(T, lr, local batch) of the clients: a ClientUpdate's own (the arguments may only repeat them), or the
    arguments for bare updates. `lr` is the client's learning rate: given where nothing uses it, one line."""
    if lr is not None:
        tensors.positive(lr, "lr")
    captured = [(w, u) for w, u in updates if isinstance(u, ClientUpdate)]
    if captured:
        steps, own_lr, batch = _carried(captured, updates, lr, steps, batch)
    else:
        steps, own_lr = 1 if steps is None else steps, None
    if lr is not None and own_lr is None and kind == "gradient" and steps == 1 and batch is None:
        raise UserError(
            f"lr={lr}: the client's learning rate, used with kind='delta'/'weights' or local_steps > 1 only; "
            f"the attack's step size is attack_lr={lr}"
        )
    return steps, own_lr if own_lr is not None else lr, batch


def _carried(
    captured: list[tuple[str, ClientUpdate]], updates: list[tuple[str, Any]], lr: Any, steps: Any, batch: Any
) -> tuple[int, float | None, int | None]:
    """(T, lr, local batch) the ClientUpdates carry, the same for all; arguments may only repeat them."""
    if len(captured) < len(updates):
        bare = next(w for w, u in updates if not isinstance(u, ClientUpdate))
        raise UserError(f"{bare}: a bare update beside ClientUpdates; give every client as a ClientUpdate, or none")
    (first, u), own = captured[0], [(u.steps, u.lr, u.local_batch) for _, u in captured]
    other = next((w for (w, _), t in zip(captured, own) if t != own[0]), None)
    if other is not None:
        raise UserError(
            f"{other}: trained otherwise than {first} (local steps, lr, local batch); clients attacked in one call "
            "must have trained alike"
        )
    for name, given, carried in (("local_steps", steps, u.steps), ("local_batch", batch, u.local_batch)):
        if given is not None and given != carried:
            raise UserError(f"{name}={given!r}: {first} says {carried!r}; leave {name} out (the update's own is used)")
    if lr is not None and u.lr is not None and lr != u.lr:
        raise UserError(f"lr={lr}: {first} says lr={u.lr}; leave lr out (the update's own is used)")
    return u.steps, u.lr, u.local_batch


def _labels(labels: Any, updates: list[tuple[str, Any]], grads: list[Any], num_classes: int) -> Tensor:
    """The clients' labels (K, B): `labels`, a ClientUpdate's own (the argument may only repeat them), or inferred
    from the gradient (one image per client)."""
    carried = [(w, u.labels.reshape(-1).long()) for w, u in updates if isinstance(u, ClientUpdate)]
    if carried and any(len(t) != len(carried[0][1]) for _, t in carried):
        w = next(w for w, t in carried if len(t) != len(carried[0][1]))
        raise UserError(
            f"{w}: {len(dict(carried)[w])} images, {carried[0][0]} has {len(carried[0][1])}; clients attacked in "
            "one call have one batch size"
        )
    if labels is not None:
        y = labels_of(labels, len(grads), num_classes=num_classes)
        for k, (w, t) in enumerate(carried):
            if y.shape[1] != len(t) or not torch.equal(y[k], t):
                raise UserError(
                    f"labels: {y[k].tolist()} for {w}, which carries its labels {t.tolist()}; leave labels out"
                )
        return y
    if carried:
        return labels_of(torch.stack([t for _, t in carried]), len(grads), num_classes=num_classes)
    try:
        return infer_labels(stack(grads), num_classes).view(-1, 1)
    except ValueError as exc:
        raise UserError(f"labels: cannot infer them from the update ({exc}); give labels=") from None


def _normalization(mean: Any, std: Any, channels: int) -> tuple[Tensor, Tensor]:
    """`mean`/`std` (sequences or tensors of one value per channel) as (C, 1, 1) tensors, checked as the command line
    checks data.mean/data.std (dia.run.checks.check_mean_std)."""

    def values(v: Any, default: float, key: str) -> list[Any]:
        if v is None:
            return [default] * channels
        if isinstance(v, Tensor):
            return tensors.dense(v, key).detach().cpu().flatten().tolist()
        return list(v) if isinstance(v, (list, tuple)) else [v]

    mean, std = values(mean, 0.0, "mean"), values(std, 1.0, "std")
    for key, v in (("mean", mean), ("std", std)):
        if len(v) != channels:
            raise UserError(f"{key}={tuple(v)}: give {channels} number(s), one per channel")
    checks.check_mean_std(mean, std)
    return torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)


def evaluate(
    reconstruction: Reconstruction, originals: Tensor, *, masks: Any = None, lpips: bool = False
) -> dict[str, Any]:
    """How good a reconstruction is against the `originals` (N, C, H, W) in [0, 1] (client after client):
    the per-victim rows and their means of a run's metrics.json (MSE in normalized space, PSNR, SSIM, LPIPS
    with `lpips`, and, given the clients' true `masks`, how well recovered masks find the dropped units).
    Reconstructions of one client's batch are matched to its originals first."""
    rows = _rows(reconstruction, originals, masks=masks, lpips=lpips)
    return {"mean": mean_metrics(rows), "victims": rows}


def _rows(reconstruction: Reconstruction, originals: Any, *, masks: Any, lpips: bool) -> list[dict[str, Any]]:
    if originals is not None:
        originals = _originals(originals)
        if tuple(originals.shape) != tuple(reconstruction.images.shape):
            raise UserError(
                f"originals: shape {tuple(originals.shape)}, the reconstruction's is "
                f"{tuple(reconstruction.images.shape)}"
            )
    problems = reconstruction.problems
    if masks is not None:
        problems = replace(problems, true_masks=client_masks(masks, problems.mask_shapes, problems.num_problems))
    rec = reconstruction
    rows, _ = score(rec.result(), problems, originals, rec.mean, rec.std, skip=() if lpips else ("lpips",))
    for i, (row, label) in enumerate(zip(rows, rec.labels.flatten().tolist())):
        row.update(index=i, label=label)
    return rows


def _originals(originals: Any) -> Tensor:
    """The original images: finite, in [0, 1] (as the reconstructions are), float32."""
    t = tensors.floating(originals, "originals").detach().cpu().float()
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
        raise UserError(
            f"originals: values in [{float(t.min()):.3g}, {float(t.max()):.3g}]; give the images in [0, 1] (not "
            "normalized, not 0-255)"
        )
    return t


def save(
    reconstruction: Reconstruction, folder: str | Path, *, originals: Tensor | None = None, masks: Any = None
) -> Path:
    """Write `reconstruction` as a run folder (the files dia.train writes, dia.run.record; dia.report reports on
    it): built as `.<name>.partial` beside `folder` and renamed when complete; an existing `folder` is never
    replaced. Its inputs are checked before anything is written."""
    rec = reconstruction
    rows = _rows(rec, originals, masks=masks, lpips=False)  # a bad `originals` or `masks`: nothing written yet
    settings = OmegaConf.to_container(OmegaConf.structured(rec.settings))
    text = OmegaConf.to_yaml(
        {
            "attack": settings,
            "input_shape": list(rec.images.shape[1:]),
            "mean": rec.mean.flatten().tolist(),
            "std": rec.std.flatten().tolist(),
        }
    )
    content = record.summary(
        status="diverged" if "diverged" in rec.status else "completed",
        attack=rec.attack,
        model=rec.model,
        data="custom",
        dropout=rec.dropout,
        rows=rows,
        clients=int(rec.labels.shape[0]),
        iterations=int(rec.iterations.max()),
        max_iterations=int(settings.get("max_iterations", 0)),
    )
    files = {"reconstructions": rec.images, "labels": rec.labels.flatten()}
    files |= {f"masks/{k}": v for k, v in (rec.masks or {}).items()}
    if originals is not None:
        files["originals"] = _originals(originals)
    path = Path(folder)
    run = RunFolder(path.parent if str(path.parent) else Path("."), path.name)
    if run.state == "done":
        raise UserError(f"out: '{path}' already exists; choose another folder")
    if not run.acquire():
        raise UserError(f"out: '{path}' is being written by another process")
    try:
        run.open(text)
        record.write_config(run.partial, text)
        record.write_tensors(run.partial, files)
        title = f"{rec.attack.upper()} on {rec.model}: {len(rows)} reconstruction(s)"
        record.write_picture(run.partial, files.get("originals"), rec.images, record.titles(rows), title=title)
        record.write_metrics(run.partial, content)
        rec.folder = run.finish()
    finally:
        run.release()
    return rec.folder


__all__ = ["Simulation", "simulate", "Reconstruction", "reconstruct", "evaluate", "save"]
