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

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dia import attacks, clients, config
from dia.attacks import ATTACKS, InvertingGradients, Part, settings_of
from dia.clients import Simulation, client_masks, client_problems
from dia.engine import AttackResult
from dia.errors import UserError
from dia.metrics import mean_metrics
from dia.problems import Problems, infer_labels
from dia.run import record
from dia.run.folder import RunFolder
from dia.run.runs import resolve_device
from dia.scores import score
from dia.updates import ClientUpdate, as_gradients, capturable, classes_of, clients_of, labels_of, local_training, stack


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
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"input_shape={tuple(input_shape)}: give (channels, height, width) of one image")
    mean_t, std_t = _normalization(mean, std, shape[0])
    cls = ATTACKS.get(attack) if isinstance(attack, str) else attack
    if not (isinstance(cls, type) and issubclass(cls, InvertingGradients)):
        raise UserError(f"attack={attack!r}: a registered name ({', '.join(ATTACKS.names())}) or an attack class")
    cfg = settings_of(cls, **settings)
    twin = capturable(model, torch.zeros(1, *shape))
    grads = as_gradients(twin, update, kind=kind, lr=lr)
    num_classes = classes_of(twin, torch.zeros(1, *shape))
    if labels is None:
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
    seen = cls.view(problems)  # what its server sees (an oracle without the client's masks: one line)
    res = attacks.attack(twin, [Part(cls(cfg=cfg), seen)], device=resolve_device(device), progress=progress).result()
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


def _normalization(mean: Any, std: Any, channels: int) -> tuple[Tensor, Tensor]:
    """`mean`/`std` (sequences or tensors of one value per channel) as (C, 1, 1) tensors, checked."""

    def values(v: Any, default: float) -> list[Any]:
        if v is None:
            return [default] * channels
        if isinstance(v, Tensor):
            return v.detach().flatten().tolist()
        return list(v) if isinstance(v, (list, tuple)) else [v]

    mean, std = values(mean, 0.0), values(std, 1.0)
    for key, v in (("mean", mean), ("std", std)):
        if len(v) != channels or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
        ):
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
    rows = _rows(reconstruction, originals, masks=masks, lpips=lpips)
    return {"mean": mean_metrics(rows), "victims": rows}


def _rows(reconstruction: Reconstruction, originals: Any, *, masks: Any, lpips: bool) -> list[dict[str, Any]]:
    if originals is not None:
        originals = torch.as_tensor(originals).float()
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
    tensors = {"reconstructions": rec.images, "labels": rec.labels.flatten()}
    tensors |= {f"masks/{k}": v for k, v in (rec.masks or {}).items()}
    if originals is not None:
        tensors["originals"] = torch.as_tensor(originals).float()
    path = Path(folder)
    run = RunFolder(path.parent if str(path.parent) else Path("."), path.name)
    if run.state == "done":
        raise UserError(f"out: '{path}' already exists; choose another folder")
    if not run.acquire():
        raise UserError(f"out: '{path}' is being written by another process")
    try:
        run.open(text)
        record.write_config(run.partial, text)
        record.write_tensors(run.partial, tensors)
        title = f"{rec.attack.upper()} on {rec.model}: {len(rows)} reconstruction(s)"
        record.write_picture(run.partial, tensors.get("originals"), rec.images, record.titles(rows), title=title)
        record.write_metrics(run.partial, content)
        rec.folder = run.finish()
    finally:
        run.release()
    return rec.folder


__all__ = ["Simulation", "simulate", "Reconstruction", "reconstruct", "evaluate", "save"]
