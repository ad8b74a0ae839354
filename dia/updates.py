"""What a client sends, as the server receives it: reading it, capturing it, checking it.

An update is what one client sent after training on its batch: its gradient (FedSGD), or its weights after
the local step(s), or the difference of its weights. `as_gradients` turns any of these, in any of the forms
a federated stack hands them over (a dict name -> tensor, a list of arrays in `model.parameters()` or
`state_dict()` order as Flower's `parameters_to_ndarrays` gives, a `.pt` file loaded with
`weights_only=True`, a `.npz`), into the gradient of the client's mean loss, checked against the model.

`capture_update` plays a real client (one training step of your model on your batch, dropout active) and
keeps, for evaluation only, the masks it drew; `check_update` recomputes a client's gradient at the true
inputs and names the usual reasons when it does not match what was sent.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dia import tensors
from dia.errors import UserError
from dia.files import save_tensors
from dia.gradients import client_gradients, client_update
from dia.models import check_model, logits_classes
from dia.models.capture import ModelInputError, UncapturableModel, make_capturable
from dia.models.dropout import dropout_control, dropout_sites
from dia.problems import LocalTraining, infer_labels

KINDS = ("gradient", "delta", "weights")  # what an update holds: see `as_gradients`
MAX_STEPS = 10**6  # local steps a saved update may claim (dia.config's client.local_steps bound)
Grads = dict[str, Tensor]


@dataclass
class ClientUpdate:
    """One client's update: the gradient of its mean cross-entropy loss over its batch (after `steps` T > 1 local
    SGD steps: (w_0 - w_T) / lr, the sum of the T gradients along its trajectory), the labels it used, and, for
    evaluation only (a real server never has them), the dropout masks it drew and its images. `model_digest`
    names the weights w_0 it was computed at (the function `model_digest`), so an update is never attacked with
    another model's weights."""

    gradient: Grads
    labels: Tensor  # (B,)
    masks: Grads | None = None  # {site: (B, ...)} keep-masks ((T * b, ...): T steps' masks), evaluation (and WIIG) only
    images: Tensor | None = None  # (B, C, H, W) the client's batch as its model took it, evaluation only
    lr: float | None = None  # the local learning rate, when it stepped
    steps: int = 1  # T: local SGD steps (FedAvg), each with fresh dropout masks
    # images per local step (consecutive chunks, step t takes chunk t mod B/b); None: all B
    local_batch: int | None = None
    model_digest: str | None = None  # sha256 of the weights w_0 it was computed at (hex); None: unknown

    @property
    def batch(self) -> int:
        """B: the images of the client's batch."""
        return int(self.labels.numel())

    def delta(self) -> Grads:
        """w_0 - w_T after its T SGD steps with `lr`: what a FedAvg client sends."""
        if self.lr is None:
            raise UserError("ClientUpdate.delta: no learning rate (capture_update(..., lr=...))")
        return {n: self.lr * g for n, g in self.gradient.items()}

    def check(self, where: str = "update") -> ClientUpdate:
        """What it says about itself, checked (its gradient is checked against a model by `as_gradients`): labels
        B >= 1 integers, lr a finite number > 0, T in 1..MAX_STEPS, local_batch dividing B, images (B, C, H, W)
        finite, masks finite keep-masks of 0 and 1. One UserError line naming the field."""
        if not isinstance(self.gradient, Mapping) or not self.gradient:
            raise UserError(f"{where}: holds no gradient (a ClientUpdate's gradient is {{param name: tensor}})")
        labels = tensors.integers(self.labels, f"{where}: 'labels'")
        if labels.dim() != 1 or not len(labels) or int(labels.min()) < 0:
            raise UserError(f"{where}: 'labels' {tuple(labels.shape)}: give the batch's B >= 1 class indices (B,)")
        b = len(labels)
        if self.lr is not None:
            tensors.positive(self.lr, f"{where}: lr")
        steps = tensors.whole(self.steps, f"{where}: local_steps", low=1, high=MAX_STEPS)
        if self.local_batch is not None and b % tensors.whole(self.local_batch, f"{where}: local_batch", low=1, high=b):
            raise UserError(f"{where}: local_batch={self.local_batch} does not divide its {b} images")
        if (steps > 1 or self.local_batch not in (None, b)) and self.lr is None:
            raise UserError(f"{where}: {steps} local step(s) but no lr; a FedAvg update needs the client's lr")
        if self.images is not None:
            images = tensors.floating(self.images, f"{where}: 'images'")
            if images.dim() != 4 or len(images) != b:
                raise UserError(f"{where}: 'images' {tuple(images.shape)}: give its {b} image(s) (B, C, H, W)")
        for site, m in (self.masks or {}).items():
            keep_mask(m, f"{where}: mask '{site}'")
        return self

    def save(self, path: str | Path) -> Path:
        """A `.pt` of tensors only (`gradient/<param>`, `labels`, `masks/<site>`, `images`, `lr`): readable with
        `weights_only=True`, and by `dia.reconstruct` and `python -m dia.train captured.file=FILE`."""
        flat = {f"gradient/{n}": g for n, g in self.gradient.items()} | {"labels": self.labels}
        flat |= {f"masks/{n}": m for n, m in (self.masks or {}).items()}
        if self.images is not None:
            flat["images"] = self.images
        if self.lr is not None:
            flat["lr"] = torch.tensor(float(self.lr), dtype=torch.float64)  # the learning rate exactly
        if self.steps != 1 or self.local_batch is not None:
            flat["local_steps"] = torch.tensor(int(self.steps))
            flat["local_batch"] = torch.tensor(0 if self.local_batch is None else int(self.local_batch))
        if self.model_digest is not None:
            flat["model_digest"] = torch.tensor(list(bytes.fromhex(self.model_digest)), dtype=torch.uint8)
        return save_tensors(Path(path), flat)

    @classmethod
    def load(cls, path: str | Path) -> ClientUpdate:
        """An update written by `save`."""
        flat = _load_file(Path(path))
        if not isinstance(flat, dict) or "labels" not in flat:
            raise UserError(
                f"update '{path}': not a saved ClientUpdate (no 'labels'); give the gradient itself instead"
            )
        return cls.from_tensors(flat, where=f"update '{path}'")

    @classmethod
    def from_tensors(cls, flat: Mapping[Any, Any], where: str = "update") -> ClientUpdate:
        """An update from the tensors `save` writes (a dict holding 'labels'), checked (`check`)."""
        odd = next((k for k in flat if not isinstance(k, str)), None)
        if odd is not None:
            raise UserError(f"{where}: has the key {odd!r} ({type(odd).__name__}); an update maps names to tensors")
        part = lambda prefix: {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}  # noqa: E731
        lr, steps, batch = flat.get("lr"), flat.get("local_steps", 1), flat.get("local_batch", 0)
        batch = tensors.whole(batch, f"{where}: 'local_batch'", low=0, high=MAX_STEPS)
        digest = flat.get("model_digest")
        if digest is not None:
            digest = tensors.integers(digest, f"{where}: 'model_digest'")
            if digest.shape != (32,) or int(digest.min()) < 0 or int(digest.max()) > 255:
                raise UserError(f"{where}: 'model_digest' {tuple(digest.shape)} is not a sha256 digest (32 bytes)")
            digest = bytes(digest.tolist()).hex()
        return cls(
            part("gradient/"),
            flat["labels"],
            part("masks/") or None,
            flat.get("images"),
            None if lr is None else tensors.positive(lr, f"{where}: 'lr'"),
            tensors.whole(steps, f"{where}: 'local_steps'", low=1, high=MAX_STEPS),
            batch or None,
            digest,
        ).check(where)


def keep_mask(value: Any, where: str) -> Tensor:
    """A recorded dropout keep-mask: finite, every value 0 (dropped) or 1 (kept); as float32."""
    m = tensors.dense(value, where)
    m = tensors.floating(m, where).float() if m.is_floating_point() or m.is_complex() else m.float()
    if m.numel() and not bool(((m == 0) | (m == 1)).all()):
        odd = m[(m != 0) & (m != 1)][0].item()
        raise UserError(f"{where} holds {odd!r}; a recorded keep-mask holds 0 (dropped) and 1 (kept) only")
    return m


def model_digest(model: nn.Module) -> str:
    """sha256 (hex) of the model's parameters' values (float32, in parameter order): which weights an update is for."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_digests(model: nn.Module, updates: Sequence[tuple[str, Any]]) -> None:
    """Every ClientUpdate among `updates` ((where, update) pairs) that names its weights was computed at `model`'s."""
    own = None
    for where, u in updates:
        if isinstance(u, ClientUpdate) and u.model_digest is not None:
            own = own or model_digest(model)
            if u.model_digest != own:
                raise UserError(
                    f"{where}: an update from another model (computed at other weights than the model's, its "
                    "model_digest says); attack each update with the model the client had"
                )


# ---- reading updates ---------------------------------------------------------------------------------
def clients_of(sent: Any) -> list[Any]:
    """`sent` as a list of per-client updates: one update (a dict, a list of arrays, a file, a ClientUpdate)
    is one client; a list of such updates is several."""
    if isinstance(sent, (Mapping, ClientUpdate, str, Path)):
        return [sent]
    if isinstance(sent, (list, tuple)):
        if not sent:
            raise UserError("update: empty; give a gradient or weights (dict, list of arrays, .pt or .npz file)")
        if all(isinstance(x, (np.ndarray, Tensor)) for x in sent):
            return [sent]
        if all(isinstance(x, (Mapping, ClientUpdate, str, Path, list, tuple)) for x in sent):
            return list(sent)
    raise UserError(
        f"update: a {type(sent).__name__} is not an update; give a dict name -> tensor, a list of arrays "
        "in model.parameters() order, a .pt/.npz file, a ClientUpdate, or a list of those (several clients)"
    )


def read_updates(sent: Any, where: str = "update") -> list[tuple[str, Any]]:
    """Each client's update in `sent` (see `clients_of`), files read once, as (where, update): a `ClientUpdate`
    (an object, or a file it saved: checked, `ClientUpdate.check`) or the values a client sent (dict or list)."""
    items = clients_of(sent)
    several = isinstance(sent, (list, tuple)) and not all(isinstance(x, (np.ndarray, Tensor)) for x in sent)
    out = []
    for k, raw in enumerate(items):
        here = f"{where} {k}" if several else where
        if isinstance(raw, ClientUpdate):
            out.append((here, raw.check(here)))
        elif isinstance(raw, (str, Path)):
            flat = _load_file(Path(raw))
            here = f"{here} '{raw}'"
            if isinstance(flat, dict) and "labels" in flat:
                out.append((here, ClientUpdate.from_tensors(flat, where=here)))
            elif isinstance(flat, dict) and any(str(k).startswith("gradient/") for k in flat):  # no labels
                out.append((here, {k[9:]: v for k, v in flat.items() if str(k).startswith("gradient/")}))
            else:
                out.append((here, flat))
        else:
            out.append((here, raw))
    return out


def as_gradients(
    model: nn.Module, sent: Any, *, kind: str = "gradient", lr: float | None = None, where: str = "update"
) -> list[Grads]:
    """Each client's update in `sent` as the gradient of its mean loss, {param name: tensor} in the model's
    parameter order, checked: every parameter present with its shape, floating point, finite, not all zero.

    `kind`: "gradient" (what FedSGD sends), "delta" (w_0 - w_1 after one local SGD step with `lr`) or
    "weights" (the client's weights w_1 after that step, as a Flower client's fit returns them; w_0 are
    `model`'s). A multi-step client's delta is attacked as such by the FedAvg client model (dia.config `client`).
    A `ClientUpdate` holds its gradient: `kind` must be "gradient".
    """
    return gradients_of(model, read_updates(sent, where), kind=kind, lr=lr)


def gradients_of(
    model: nn.Module, updates: Sequence[tuple[str, Any]], *, kind: str = "gradient", lr: float | None = None
) -> list[Grads]:
    """`as_gradients` of updates already read (`read_updates`)."""
    if kind not in KINDS:
        raise UserError(f"kind={kind!r}: must be one of: {', '.join(KINDS)}")
    if kind != "gradient" and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"lr={lr!r}: kind={kind} needs the client's local learning rate, a finite number > 0")
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = []
    for where, raw in updates:
        if isinstance(raw, ClientUpdate) and kind != "gradient":
            raise UserError(f"kind={kind!r}: {where} is a ClientUpdate, which holds a gradient; leave kind='gradient'")
        values = _named(model, raw.gradient if isinstance(raw, ClientUpdate) else raw, where)
        if kind == "gradient":
            grads = values
        elif kind == "delta":
            grads = {n: v / lr for n, v in values.items()}
        else:
            grads = {n: (params[n].cpu() - v) / lr for n, v in values.items()}
        if not any(bool(g.any()) for g in grads.values()):
            raise UserError(
                f"{where}: every value is 0; an all-zero update carries nothing to attack (a client that did not "
                "train, weights sent back unchanged, or a lost message)"
            )
        out.append(grads)
    return out


def read_file(path: str | Path) -> Any:
    """An update file's tensors, read once: a dict (a saved ClientUpdate has 'labels') or a list."""
    return _load_file(Path(path))


def _load_file(path: Path) -> Any:
    """A `.pt` (weights_only=True: tensors, dicts and lists only) or `.npz` (no pickles) update file."""
    if not path.is_file():
        raise UserError(f"update: no such file '{path}'")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                keys = list(npz.files)
                if keys and all(k == f"arr_{i}" for i, k in enumerate(keys)):  # np.savez(*arrays): parameter order
                    return [npz[k] for k in keys]
                return {k: npz[k] for k in keys}
        with warnings.catch_warnings():  # torch's notes on what the file holds: the checks below say what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"update: cannot read '{path}' as tensors ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); "
            "give a .pt of tensors (torch.save of a dict or list) or a .npz"
        ) from None


def _named(model: nn.Module, values: Any, where: str) -> Grads:
    """`values` (a dict by parameter or state_dict name, or a list in parameters() or state_dict() order) as
    {param name: float tensor}, checked against the model."""
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if isinstance(values, Mapping):
        items = _by_name(model, values, where)
    elif isinstance(values, (list, tuple)):
        order = (
            names
            if len(values) == len(names)
            else list(model.state_dict())
            if len(values) == len(model.state_dict())
            else None
        )
        if order is None:
            raise UserError(
                f"{where}: {len(values)} arrays, but the model has {len(names)} parameters "
                f"({len(model.state_dict())} state_dict entries); an update from another model?"
            )
        items = [(n, v) for n, v in zip(order, values) if n in shapes]
    else:
        raise UserError(f"{where}: a {type(values).__name__}; give a dict name -> tensor or a list of arrays")
    out: Grads = {}
    for name, value in items:
        t = _tensor(value, f"{where}: '{name}'")
        if tuple(t.shape) != shapes[name]:
            raise UserError(
                f"{where}: '{name}' has shape {tuple(t.shape)}, the model's parameter has {shapes[name]}; "
                "an update from another model, or arrays in another order?"
            )
        out[name] = t
    return out


def _by_name(model: nn.Module, values: Mapping[Any, Any], where: str) -> list[tuple[str, Any]]:
    """A dict update's entries in the model's parameter order, its names checked (buffers are skipped)."""
    names = [n for n, _ in model.named_parameters()]
    buffers = {n for n, _ in model.named_buffers()}
    odd = next((k for k in values if not isinstance(k, str)), None)
    if odd is not None:
        raise UserError(f"{where}: has the key {odd!r} ({type(odd).__name__}); an update maps names to tensors")
    extra = [k for k in values if k not in names and k not in buffers]
    missing = [n for n in names if n not in values]
    if extra or missing:
        what = (
            (f"unknown name{'s' * (len(extra) > 1)} {extra[:3]}" if extra else "")
            + ("; " if extra and missing else "")
            + (f"missing {missing[:3]}" if missing else "")
        )
        raise UserError(
            f"{where}: does not fit this model: {what}{' ...' if len(extra) > 3 or len(missing) > 3 else ''} "
            f"(the model has {len(names)} parameters: {names[:3]}...); an update from another model?"
        )
    return [(n, values[n]) for n in names]


def _tensor(value: Any, where: str) -> Tensor:
    return tensors.floating(value, where).detach().to("cpu", torch.float32)


def labels_of(labels: Any, clients: int, *, num_classes: int) -> Tensor:
    """Labels given per client ((K, B), or (K * B,), or (B,) for one client) as a (K, B) int64 tensor, checked."""
    if not isinstance(labels, Tensor):
        try:
            labels = np.asarray(labels)
        except (TypeError, ValueError):
            raise UserError(f"labels: cannot read {type(labels).__name__} as integers") from None
    t = tensors.integers(labels, "labels").detach().cpu()
    if t.numel() == 0 or t.dim() > 2:
        raise UserError(f"labels: shape {tuple(t.shape)}; give class indices per client (B,) or for all (K, B)")
    if t.dim() == 2 and t.shape[0] != clients:
        raise UserError(f"labels: shape {tuple(t.shape)} for {clients} client(s); give (K, B) = ({clients}, B)")
    if t.numel() % clients:
        raise UserError(f"labels: {t.numel()} labels do not split over {clients} client(s)")
    t = t.reshape(clients, -1).long()
    if int(t.min()) < 0 or int(t.max()) >= num_classes:
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise UserError(
            f"labels: label {bad} out of range for a model with {num_classes} classes (valid 0..{num_classes - 1})"
        )
    return t


# ---- a real client's step -------------------------------------------------------------------------------
def capturable(model: nn.Module, example: Tensor) -> nn.Module:
    """A copy of `model` whose stochastic sites (nn.Dropout*, DropPath, functional dropout) can record,
    replay or be given masks (dia.models.capture); site names are module paths. The model itself is untouched.
    The model is checked first (`dia.models.check_model`: weights with values, finite), and must take `example`
    and return logits (batch, classes)."""
    import copy

    check_model(model)
    twin = copy.deepcopy(model).cpu()
    classes_of(twin, example)
    if dropout_sites(twin):
        return twin
    try:
        return make_capturable(twin, example)
    except ModelInputError as exc:
        raise UserError(f"input_shape {tuple(example.shape[1:])}: the model cannot take it ({exc})") from None
    except UncapturableModel as exc:
        raise UserError(f"model: {str(exc).splitlines()[0]}") from None


def capture_update(
    model: nn.Module,
    images: Tensor,
    labels: Any,
    *,
    lr: float | None = None,
    seed: int | None = None,
    local_steps: int = 1,
    local_batch: int | None = None,
) -> ClientUpdate:
    """What a client sends after one training step of `model` on its batch (`images` as the model takes them,
    `labels`): the gradient of the mean cross-entropy with the model in train mode (dropout drawn at random,
    from a generator seeded with `seed` if given), and for evaluation only the masks it drew. `model` is not
    changed (the step runs on a copy).

    FedAvg: `local_steps` T > 1 plain SGD steps with learning rate `lr`, each on `local_batch` of the images
    (consecutive chunks, step t takes chunk t mod B/b; None: all of them) with fresh masks; the update holds
    (w_0 - w_T) / lr and the T steps' masks, stacked along the batch axis."""
    images = _tensor(images, "images")
    if images.dim() != 4 or not len(images):
        raise UserError(f"images: shape {tuple(images.shape)}; give the client's batch (B, C, H, W)")
    twin = capturable(model, images[:1])
    num_classes = classes_of(twin, images[:1])
    y = labels_of(labels, 1, num_classes=num_classes).view(-1)
    if len(y) != len(images):
        raise UserError(f"labels: {len(y)} labels for {len(images)} images")
    if lr is not None:
        tensors.positive(lr, "lr")
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    local = local_training(local_steps, lr, local_batch, len(y))
    digest = model_digest(twin)
    if local is None:
        grads, masks = client_gradients(twin, images, y, generator=gen)
    else:
        grads, masks = client_update(twin, images, y, local, generator=gen)
    return ClientUpdate(grads, y, masks or None, images.clone(), lr, int(local_steps), local_batch, digest)


def local_training(steps: Any, lr: Any, batch: Any, images: int) -> Any:
    """A FedAvg client's local training (`dia.problems.LocalTraining`) from the API's keywords, checked; None for
    one full-batch step (FedSGD)."""
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise UserError(f"local_steps={steps!r}: must be an integer >= 1")
    if batch is not None and not (
        isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1 and images % batch == 0
    ):
        raise UserError(
            f"local_batch={batch!r}: must be a positive integer dividing the {images} images per client (or None: all)"
        )
    if steps == 1 and batch in (None, images):
        return None
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"lr={lr!r}: local_steps={steps} needs the client's local learning rate, a finite number > 0")
    return LocalTraining(steps, float(lr), batch)


def classes_of(model: nn.Module, example: Tensor) -> int:
    """How many classes the model's logits have (`dia.models.logits_classes`); an input it cannot take: one line."""
    try:
        return logits_classes(model, example)
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UserError(
            f"input_shape {tuple(example.shape[1:])}: the model cannot take it ({type(exc).__name__}: {first})"
        ) from None


# ---- checking an update against the truth ----------------------------------------------------------------
@dataclass
class UpdateCheck:
    """How well a recomputation at the true inputs explains what a client sent: per parameter the cosine and
    the relative error; `culprits`: the usual reasons that explain a mismatch, best first."""

    layers: list[dict[str, Any]]
    cosine: float
    rel_error: float
    culprits: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return self.cosine > 0.9999 and self.rel_error < 1e-3

    def __str__(self) -> str:
        head = (
            f"update {'consistent' if self.consistent else 'NOT consistent'} with a recomputation at the true inputs: "
            f"cosine {self.cosine:.6f}, relative error {self.rel_error:.2e}"
        )
        rows = [f"  {r['name']:<32} cosine {r['cosine']:.6f}  rel. error {r['rel_error']:.2e}" for r in self.layers]
        why = [f"  likely: {c}" for c in self.culprits]
        return "\n".join([head, *why, *rows])


def check_update(
    model: nn.Module,
    update: Any,
    images: Tensor,
    labels: Any,
    *,
    masks: Mapping[str, Tensor] | None = None,
    kind: str = "gradient",
    lr: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> UpdateCheck:
    """Recompute one client's gradient at its true inputs (`images` as its model took them, `labels`, its
    dropout `masks` if you recorded them) and compare it with what it sent (`update`, read as in
    `dia.reconstruct`). When they disagree, tries the usual culprits and names those that explain it: the loss
    reduction (sum instead of mean), the learning rate of a weight update, train/eval mode (dropout or
    BatchNorm), the dropout masks, the normalization (`mean`/`std`), the labels."""
    if isinstance(update, ClientUpdate) and (update.steps > 1 or update.local_batch is not None):
        raise UserError(
            f"update: a client update of {update.steps} local steps; check_update recomputes one full-batch "
            "step (FedSGD) only: replay a multi-step update with dia.reconstruct(..., attack='wiig')"
        )
    images = images.detach().cpu().float()
    twin = capturable(model, images[:1])
    y = labels_of(labels, 1, num_classes=classes_of(twin, images[:1])).view(-1)
    sent = as_gradients(twin, update, kind=kind, lr=lr)
    if len(sent) != 1:
        raise UserError(f"update: check_update takes one client's update, got {len(sent)}")
    sent_g = sent[0]
    sites = dropout_sites(twin, active_only=True)
    if masks and not sites:
        raise UserError("masks: given, but the model has no dropout")

    def gradient(
        x: Tensor, y: Tensor, mode: str = "replay", m: Mapping[str, Tensor] | None = None, train: bool = True
    ) -> Grads:
        twin.train(train)
        params = dict(twin.named_parameters())
        with dropout_control(twin, mode, dict(m or {})):
            loss = F.cross_entropy(twin(x), y)
        return dict(zip(params, (g.detach() for g in torch.autograd.grad(loss, list(params.values())))))

    mode = "replay" if masks else "off"
    reference = gradient(images, y, mode, masks)
    cos, rel, layers = _compare(sent_g, reference)
    out = UpdateCheck(layers, cos, rel)
    if out.consistent:
        return out
    b = len(y)
    candidates = _scale_culprits(sent_g, reference, cos, b)
    if sites and not masks:
        candidates.append(
            (
                "dropout: the client's model drew dropout masks this check does not know; pass masks= "
                "(capture_update records them) to check exactly",
                reference,
            )
        )
    if sites and masks:
        candidates.append(("train/eval mode: the client ran without dropout (eval mode)", gradient(images, y, "off")))
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in twin.modules()):
        candidates.append(
            (
                "BatchNorm: the client normalized with running statistics (eval mode)",
                gradient(images, y, mode, masks, train=False),
            )
        )
    if mean is not None and std is not None:
        mu = torch.tensor(list(mean)).view(-1, 1, 1)
        sd = torch.tensor(list(std)).view(-1, 1, 1)
        candidates.append(
            (
                "normalization: the client's model took (x - mean) / std of these images",
                gradient((images - mu) / sd, y, mode, masks),
            )
        )
        candidates.append(
            (
                "normalization: the client's model took un-normalized images (x * std + mean)",
                gradient(images * sd + mu, y, mode, masks),
            )
        )
    if b == 1:
        guess = infer_labels({n: g.unsqueeze(0) for n, g in sent_g.items()}, classes_of(twin, images[:1]))
        if int(guess[0]) != int(y[0]):
            candidates.append(
                (
                    f"labels: the gradient says label {int(guess[0])}, not {int(y[0])}",
                    gradient(images, guess, mode, masks),
                )
            )
    scored = []
    for text, g in candidates:
        c, r, _ = _compare(sent_g, g)
        if g is reference or r < min(rel / 10, 1e-2):  # explains (most of) the mismatch
            scored.append((r if g is not reference else math.inf, text))
    out.culprits = [t for _, t in sorted(scored)]
    return out


def _scale_culprits(sent: Grads, reference: Grads, cos: float, b: int) -> list[tuple[str, Grads]]:
    """A sent gradient in the right direction but of another length: the loss reduction, or a scale."""
    ratio = _norm(sent) / max(_norm(reference), 1e-30)
    if not (cos > 0.9999 and abs(ratio - 1) > 1e-3):
        return []
    if b > 1 and abs(ratio - b) / b < 1e-3:
        text = (
            f"loss reduction: the update is {b}x the mean-loss gradient (reduction='sum'); divide it by the batch size"
        )
        return [(text, {n: g * b for n, g in reference.items()})]
    text = (
        f"scale: the update is {ratio:.4g}x the gradient; a wrong learning rate (lr) for a weight update, or another "
        "loss scaling"
    )
    return [(text, {n: g * ratio for n, g in reference.items()})]


def _norm(g: Grads) -> float:
    return math.sqrt(sum(float(v.pow(2).sum()) for v in g.values()))


def _compare(sent: Grads, ref: Grads) -> tuple[float, float, list[dict[str, Any]]]:
    layers = []
    for n, r in ref.items():
        s = sent[n].flatten().double()
        r = r.flatten().double()
        cos = float(torch.dot(s, r) / (s.norm() * r.norm() + 1e-30))
        layers.append({"name": n, "cosine": cos, "rel_error": float((s - r).norm() / (r.norm() + 1e-30))})
    s = torch.cat([sent[n].flatten().double() for n in ref])
    r = torch.cat([ref[n].flatten().double() for n in ref])
    return float(torch.dot(s, r) / (s.norm() * r.norm() + 1e-30)), float((s - r).norm() / (r.norm() + 1e-30)), layers


def stack(grads: Iterable[Grads]) -> Grads:
    """Per-client gradients as {name: (K, ...)}."""
    grads = list(grads)
    return {n: torch.stack([g[n] for g in grads]) for n in grads[0]}
