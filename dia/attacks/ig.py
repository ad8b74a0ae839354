"""Inverting Gradients (Geiping et al., 2020) as a LightningModule: the base every attack extends.

"Training" optimizes K problems' dummy inputs at once (see dia.engine) so that their gradient matches the
captured one: cosine gradient distance over all parameters + TV, signed Adam, images boxed to the valid
range. The attacker's model runs without dropout (eval mode), as in the paper's IG baseline.
Subclasses state only what differs: which masks the attacker's model applies, which extra trainables
there are, and their regularizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor, nn

from dia.engine import STATUS, AttackState, Schedule, advance
from dia.gradients import problem_gradients
from dia.losses import cosine_distance, total_variation
from dia.models.dropout import Mode
from dia.problems import Problems


@dataclass
class AttackConfig:
    name: str = "ig"
    max_iterations: int = 20000
    lr: float = 0.1
    tv_weight: float = 1e-5
    signed_gradients: bool = True
    init: str = "randn"  # randn | rand (uniform in [-1, 1])
    boxed: bool = True
    lr_factor: float = 0.1
    lr_patience: int = 800
    early_stop_patience: int = 4000
    loss_threshold: float = 1e-5
    parallel: Any = "auto"  # problems optimized at once: an int, or auto (all on CPU)
    check_every: int = 50  # iterations between host checks whether every problem has stopped
    log_every: int = 50  # iterations between logged training curves


@dataclass
class AttackResult:
    """Best iterate and bookkeeping per problem (all on CPU)."""

    x: Tensor  # (K, B, C, H, W) normalized
    masks: Optional[dict[str, Tensor]]  # recovered masks (K, B, ...) for attacks that optimize them
    best_loss: Tensor
    best_iteration: Tensor
    iterations: Tensor
    status: list[str]


INITS = {
    "randn": lambda shape, g: torch.randn(shape, generator=g),
    "rand": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1,
}


class InvertingGradients(L.LightningModule):
    """IG: optimize dummies only; the attacker's copy of the model runs without dropout."""

    mask_mode: Mode = "off"
    needs_client_masks = False  # True only for the oracle (WIIG)

    def __init__(self, model: nn.Module, problems: Problems, cfg: Any, *, lower: Tensor, upper: Tensor) -> None:
        super().__init__()
        if problems.true_masks is not None and not self.needs_client_masks:
            raise ValueError(f"{type(self).__name__} must not see the client's dropout masks")
        self.automatic_optimization = False
        self.model = model.eval().requires_grad_(False)
        self.problems = problems
        self.cfg = cfg
        self.register_buffer("lower", lower.clone())
        self.register_buffer("upper", upper.clone())
        self.schedule = Schedule(
            lr=cfg.lr, signed=frozenset({"x"}) if cfg.signed_gradients else frozenset(),
            lr_factor=cfg.lr_factor, lr_patience=cfg.lr_patience, early_stop_patience=cfg.early_stop_patience,
            loss_threshold=cfg.loss_threshold, max_iterations=cfg.max_iterations,
        )
        self.state: AttackState | None = None
        self.resume: dict[str, Tensor] | None = None  # a saved AttackState.as_dict() to continue from

    # ---- what subclasses change ------------------------------------------------------------------
    def init_mask_params(self, generators: list[torch.Generator]) -> dict[str, Tensor]:
        """Extra trainables (K, ...) beyond the dummies, keyed 'mask/<site>'."""
        return {}

    def masks(self, params: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The masks the attacker's model applies, {site: (K, B, ...)}; None for no dropout."""
        return None

    def regularizer(self, masks: dict[str, Tensor] | None) -> Tensor | float:
        return 0.0

    def project(self, params: dict[str, Tensor]) -> None:
        """Keep trainables in their valid set (in place)."""
        if self.cfg.boxed:
            x = params["x"]
            x.copy_(torch.maximum(torch.minimum(x, self.upper), self.lower))

    # ---- shared machinery ------------------------------------------------------------------------
    def initial_params(self) -> dict[str, Tensor]:
        gens = [torch.Generator().manual_seed(s) for s in self.problems.seeds]
        x = torch.stack([INITS[self.cfg.init](self.problems.input_shape, g) for g in gens])
        return {"x": x, **self.init_mask_params(gens)}

    def objective(self, params: dict[str, Tensor]) -> Tensor:
        """Reconstruction loss per problem, (K,)."""
        masks = self.masks(params)
        grads = problem_gradients(self.model, self.model_params, params["x"], self.problems.labels, masks, self.mask_mode)
        loss = cosine_distance(grads, self.problems.targets) + self.cfg.tv_weight * total_variation(params["x"])
        return loss + self.regularizer(masks)

    def on_fit_start(self) -> None:
        self.problems = self.problems.to(self.device)
        self.model_params = {n: p.detach() for n, p in self.model.named_parameters()}
        if self.resume is not None:
            self.state = AttackState.from_dict(self.resume, self.device)
        else:
            params = {n: t.to(self.device) for n, t in self.initial_params().items()}
            self.state = AttackState.create(params, self.cfg.lr)
            with torch.no_grad():
                self.project(self.state.params)

    def configure_optimizers(self) -> None:
        """None: the per-problem signed Adam and plateau schedule live in the AttackState (dia.engine)."""
        return None

    def train_dataloader(self) -> range:
        """One 'batch' per iteration; the data are the captured gradients held by the module."""
        start = 0 if self.resume is None else int(self.resume["iteration"])
        return range(max(0, self.cfg.max_iterations - start))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        state = self.state
        trainables = list(state.params.values())
        with torch.enable_grad():
            losses = self.objective(state.params)
            grads = torch.autograd.grad(losses.sum(), trainables)
        advance(state, losses.detach(), dict(zip(state.params, grads)), self.schedule, self.project)
        it = batch_idx + 1
        if self.logger is not None and (it % self.cfg.log_every == 0 or it == 1):
            self.log_dict(self.curves(losses.detach()), prog_bar=False, on_step=True, logger=True)
        if it % self.cfg.check_every == 0:
            self.log("loss", state.best_loss.mean(), prog_bar=True, on_step=True, logger=False)
            if not bool(state.active.any()):
                self.trainer.should_stop = True

    def curves(self, losses: Tensor) -> dict[str, Tensor]:
        """What is worth plotting while an attack runs (means over problems still running)."""
        running = self.state.active.float()
        n = running.sum().clamp(min=1)
        return {
            "attack/loss": torch.nan_to_num((losses * running).sum() / n, nan=float("inf")),
            "attack/best_loss": self.state.best_loss.min(),
            "attack/lr": (self.state.lr * running).sum() / n,
            "attack/running": running.sum(),
        }

    def result(self) -> AttackResult:
        s = self.state
        best_masks = self.masks({k: v for k, v in s.best.items()})
        return AttackResult(
            x=s.best["x"].detach().cpu(),
            masks=None if best_masks is None or self.needs_client_masks else {k: v.detach().cpu() for k, v in best_masks.items()},
            best_loss=s.best_loss.cpu(),
            best_iteration=s.best_iteration.cpu(),
            iterations=s.iterations.cpu(),
            status=[STATUS[int(c)] for c in s.status.cpu()],
        )
