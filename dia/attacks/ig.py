"""Inverting Gradients (Geiping et al., 2020) as a LightningModule: the base every attack extends.

"Training" optimizes K problems' dummy inputs at once (see dia.engine) so that their gradient matches the
captured one: cosine gradient distance over all parameters + TV, signed Adam, images boxed to the valid
range. The attacker's model runs without dropout (eval mode), as in the paper's IG baseline.
Subclasses state only what differs: which masks the attacker's model applies, which extra trainables
there are, and their regularizer.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
from omegaconf import DictConfig, OmegaConf
import torch
from torch import Tensor, nn

from dia.defenses import surviving
from dia.engine import STATUS, AttackState, Layout, Schedule, advance
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
    labels: str = "known"  # known (as in the paper) | infer (from the gradient; batch_size=1)
    compile: Any = "auto"  # torch.compile the gradient program: true | false | auto (try it, fall back to eager)
    iterations_per_step: int = 10  # engine iterations per Lightning training_step (amortizes the harness)
    check_every: int = 50  # iterations between host checks whether every problem has stopped
    log_every: int = 50  # iterations between logged training curves
    model_defense: bool = False  # match only the entries the (defended) shared gradient kept nonzero (dia.defenses)


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


class CompiledOrEager:
    """`torch.compile(fn)`, falling back to `fn` (with one notice) when compilation fails and not `strict`."""

    def __init__(self, fn: Any, *, strict: bool) -> None:
        self.fn, self.strict = fn, strict
        self.compiled: Any = torch.compile(fn, fullgraph=True, dynamic=False)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - no compiler toolchain, an unsupported op, ...
            if self.strict:
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                          "running eagerly (set attack.compile=false to skip the attempt)", stacklevel=2)
            self.compiled = None
            return self.fn(*args)


class InvertingGradients(L.LightningModule):
    """IG: optimize dummies only; the attacker's copy of the model runs without dropout."""

    mask_mode: Mode = "off"
    needs_client_masks = False  # True only for the oracle (WIIG)

    def __init__(self, model: nn.Module, problems: Problems, cfg: Any, *, lower: Tensor, upper: Tensor) -> None:
        super().__init__()
        if problems.true_masks is not None and not self.needs_client_masks:
            raise ValueError(f"{type(self).__name__} must not see the client's dropout masks")
        self.automatic_optimization = False
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # the caller's model stays untouched
        # The client normalizes with batch statistics (train mode); so does the attacker's copy, without
        # running-stat updates (which vmap cannot batch).
        torch.func.replace_all_batch_norm_modules_(self.model)
        self.problems = problems
        self.cfg = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg  # plain dataclass: cheap to read
        self.register_buffer("lower", lower.clone())
        self.register_buffer("upper", upper.clone())
        self.schedule = Schedule(
            lr=cfg.lr, signed=frozenset({"x"}) if cfg.signed_gradients else frozenset(),
            lr_factor=cfg.lr_factor, lr_patience=cfg.lr_patience, early_stop_patience=cfg.early_stop_patience,
            loss_threshold=cfg.loss_threshold, max_iterations=cfg.max_iterations,
        )
        self.state: AttackState | None = None
        self.resume: dict[str, Tensor] | None = None  # a saved AttackState.as_dict() to continue from
        self.done = 0  # iterations run so far (host-side copy of state.iteration: no sync to read it)

    @classmethod
    def for_problems(cls, model: nn.Module, problems: Problems, cfg: Any, *, lower: Tensor, upper: Tensor) -> "InvertingGradients":
        """The attack on `problems` as the server sees them: the client's masks only for the oracle."""
        return cls(model, problems if cls.needs_client_masks else problems.public(), cfg, lower=lower, upper=upper)

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
        grads = surviving(grads, self.problems.targets) if self.cfg.model_defense else grads
        loss = cosine_distance(grads, self.problems.targets) + self.cfg.tv_weight * total_variation(params["x"])
        return loss + self.regularizer(masks)

    def on_fit_start(self) -> None:
        self.problems = self.problems.to(self.device)
        self.model_params = {n: p.detach() for n, p in self.model.named_parameters()}
        params = {n: t.to(self.device) for n, t in self.initial_params().items()}
        if self.resume is not None:
            self.state = AttackState.from_dict(self.resume, Layout.of(params), self.device)
        else:
            self.state = AttackState.create(params, self.cfg.lr)
            with torch.no_grad():
                self.project(self.state.params)
        self.signed_columns = self.state.layout.columns(self.schedule.signed, self.device)
        self.done = 0 if self.resume is None else int(self.resume["iteration"])
        self.gradient = self.gradient_program()

    def gradient_program(self) -> Any:
        """flat (K, D) -> (d sum(loss) / d flat, losses): the whole double-backward program, optionally compiled.

        torch.func all the way down (grad of vmap of grad), so torch.compile captures it as one graph
        and fuses its hundreds of small kernels: the attack is launch-bound, not compute-bound.
        """
        layout = self.state.layout

        def total(flat: Tensor) -> tuple[Tensor, Tensor]:
            losses = self.objective(layout.views(flat))
            return losses.sum(), losses

        program = torch.func.grad(total, has_aux=True)
        if self.cfg.compile is False:
            return program
        return CompiledOrEager(program, strict=self.cfg.compile is True)

    def configure_optimizers(self) -> None:
        """None: the per-problem signed Adam and plateau schedule live in the AttackState (dia.engine)."""
        return None

    def train_dataloader(self) -> range:
        """One 'batch' per `iterations_per_step` iterations; the data are the captured gradients held by the module."""
        start = 0 if self.resume is None else int(self.resume["iteration"])
        return range(math.ceil(max(0, self.cfg.max_iterations - start) / self.cfg.iterations_per_step))

    def step(self) -> Tensor:
        """One iteration for all problems (objective, double backward, engine update); returns the losses."""
        state = self.state
        grad, losses = self.gradient(state.flat.detach())
        advance(state, losses, grad, self.schedule, self.project, self.signed_columns)
        return losses

    def training_step(self, batch: Any, batch_idx: int) -> None:
        n = min(self.cfg.iterations_per_step, self.cfg.max_iterations - self.done)
        for _ in range(n):
            losses = self.step()
        before, self.done = self.done, self.done + n

        def crossed(every: int) -> bool:
            return self.done // every > before // every or self.done == self.cfg.max_iterations

        if self.logger is not None and (crossed(self.cfg.log_every) or before == 0):
            self.log_dict(self.curves(losses), prog_bar=False, on_step=True, logger=True)
        if crossed(self.cfg.check_every):  # the only host sync: is any problem still running?
            self.log("loss", self.state.best_loss.mean(), prog_bar=True, on_step=True, logger=False)
            if not bool(self.state.active.any()):
                self.trainer.should_stop = True

    def curves(self, losses: Tensor) -> dict[str, Tensor]:
        """What is worth plotting while an attack runs: means over all problems (stopped ones at their last value)."""
        s = self.state
        return {
            "attack/loss": s.last_loss.mean(),
            "attack/best_loss": s.best_loss.mean(),
            "attack/lr": s.lr.mean(),
            "attack/running": s.active.sum(),
            **self.mask_curves(),
        }

    def mask_curves(self) -> dict[str, Tensor]:
        """Curves about the masks this attack optimizes (none for IG)."""
        return {}

    def result(self) -> AttackResult:
        s = self.state
        best = s.best_params
        best_masks = self.masks(best)
        return AttackResult(
            x=best["x"].detach().cpu(),
            masks=None if best_masks is None or self.needs_client_masks else {k: v.detach().cpu() for k, v in best_masks.items()},
            best_loss=s.best_loss.cpu(),
            best_iteration=s.best_iteration.cpu(),
            iterations=s.iterations.cpu(),
            status=[STATUS[int(c)] for c in s.status.cpu()],
        )
