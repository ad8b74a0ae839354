"""Inverting Gradients (Geiping et al., 2020) as a LightningModule: the base every attack extends.

"Training" optimizes K problems' dummy inputs at once (see dia.engine) so that their gradient matches the
captured one: cosine gradient distance over all parameters + TV, signed Adam, images boxed to the valid
range. The attacker's model runs without dropout (eval mode), as in the paper's IG baseline.

Read top to bottom: what an attack *is* (the hooks a subclass overrides: per dropout site what the
attacker's copy applies, how trainable masks start, their regularizer weight; the gradient distance and the
image prior), how a module is built (one attack's problems, or a pack of several attacks' problems: dia.attacks.rows),
the objective, the Lightning hooks that run the engine, and the rows changing hands while a program runs.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dia.attacks import register
from dia.attacks.rows import MASK, Part, Rows
from dia.config import Check, run_checks
from dia.defenses import surviving
from dia.engine import AttackResult, AttackState, Layout, Schedule, advance
from dia.gradients import problem_gradients
from dia.losses import cosine_distance, keep_rate_penalty, total_variation
from dia.problems import Problems

INITS = {
    "randn": lambda shape, g: torch.randn(shape, generator=g),
    "rand": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1,
}
OBJECTIVE = ("objective", "distance", "prior", "regularizer")  # what makes an attack's program its own


@register("ig")
class InvertingGradients(L.LightningModule):
    """IG: optimize dummies only; the attacker's copy of the model runs without dropout.

    A module attacks the problems of one or more `Part`s in one vectorized program. Each row (problem) says
    per dropout site what the attacker's copy applies there: nothing (IG), the client's mask (WIIG) or a
    trained mask (DIA), at its own rate. So IG, WIIG and DIA at every rate of one model share one program.

    Use it like any LightningModule: `lightning.Trainer(max_epochs=1).fit(attack)`, then `attack.result()`.
    """

    name: ClassVar[str] = "ig"  # set by dia.attacks.register
    needs_client_masks: ClassVar[bool] = False  # True only for the oracle (WIIG)
    checks: ClassVar[list[Check]] = [("init", lambda v: v in INITS, f"must be one of: {', '.join(INITS)}")]

    # ---- what an attack is: subclasses override these ---------------------------------------------
    @classmethod
    def site_role(cls, part: Part, site: str) -> str | None:
        """Per dropout site the part drops at: 'train' (a trainable mask), 'client' (the client's mask) or
        None (no dropout there)."""
        return None

    @classmethod
    def init_mask(cls, part: Part, site: str, generators: list[torch.Generator]) -> Tensor:
        """Initial mask parameters (n, B, ...) of the part's rows at a site it trains."""
        return torch.ones(len(generators), *part.problems.mask_shapes[site])

    @classmethod
    def mask_weight(cls, part: Part) -> float:
        """Weight of the keep-rate penalty for the part's rows."""
        return 0.0

    @classmethod
    def attacker_rate(cls, part: Part, site: str) -> float:
        """The dropout rate the part's attacker uses at a site it trains (scale 1/(1-p), keep-rate target;
        the start of a learned rate): the model's own p."""
        return part.problems.rates.get(site, 0.0)

    @classmethod
    def learns_rate(cls, part: Part) -> bool:
        """Whether the part's rows learn their dropout rate per site (a trainable logit) instead of fixing it."""
        return False

    @classmethod
    def mask_parametrization(cls, part: Part) -> str:
        """How the part's trained masks are parametrized: 'clip' (values clipped to [0, 1]) or 'sigmoid'."""
        return "clip"

    def distance(self, grads: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        """Per problem, how far the dummies' gradient is from the captured one: IG's cosine distance (K,)."""
        return cosine_distance(grads, targets)

    def prior(self, x: Tensor) -> Tensor:
        """Per problem, the image prior: total variation weighted by `tv_weight` (K,)."""
        return self.cfg.tv_weight * total_variation(x)

    # ---- construction --------------------------------------------------------------------------------
    def __init__(
        self,
        model: nn.Module,
        problems: Problems | None = None,
        cfg: Any = None,
        *,
        lower: Tensor | None = None,
        upper: Tensor | None = None,
        parts: Sequence[Part] = (),
        expect: Sequence[Part] = (),
        **settings: Any,
    ) -> None:
        """The attack on `problems` (as the server sees them: `view`), with settings `cfg` (the attack section
        of a run config) or the attack's defaults updated by keyword `settings`; images are kept in
        [`lower`, `upper`] (normalized space; default: the problems' own bounds). `parts` instead of
        `problems`: a pack (see `pack`); `expect`: parts that may take rows later (`admit`)."""
        super().__init__()
        if not parts:
            if problems is None:
                raise ValueError(f"{type(self).__name__}: give the problems to attack")
            if cfg is None:
                from dia.config import attack_settings

                cfg = attack_settings(type(self), **settings)
            elif settings:
                raise TypeError(f"{type(self).__name__}: give either cfg or keyword settings, not both")
            parts = [Part(type(self), problems, cfg)]
        self.automatic_optimization = False
        for part in parts:
            if not part.problems.rates and part.attack.site_role.__func__ is not InvertingGradients.site_role.__func__:
                warnings.warn(
                    f"{part.attack.__name__}: the model has no dropout (p=0 everywhere), so there are no masks "
                    "to use: it behaves as IG",
                    stacklevel=2,
                )
        self.rows = Rows(parts, expect)
        cfg = parts[0].cfg  # a pack shares every setting but the attack's own (dia.run.pack checks it)
        self.cfg = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg  # a plain object: cheap to read
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # the caller's model stays untouched
        # The client normalizes with batch statistics (train mode); so does the attacker's copy, without
        # running-stat updates (which vmap cannot batch).
        torch.func.replace_all_batch_norm_modules_(self.model)
        first = parts[0].problems
        lower = first.lower if lower is None else lower
        upper = first.upper if upper is None else upper
        if lower is None or upper is None:
            raise ValueError(f"{type(self).__name__}: the valid image range (lower, upper) is unknown; give it")
        self.register_buffer("lower", torch.as_tensor(lower).clone())
        self.register_buffer("upper", torch.as_tensor(upper).clone())
        self.schedule = Schedule(
            lr=self.cfg.lr,
            signed=frozenset({"x"}) if self.cfg.signed_gradients else frozenset(),
            lr_factor=self.cfg.lr_factor,
            lr_patience=self.cfg.lr_patience,
            early_stop_patience=self.cfg.early_stop_patience,
            loss_threshold=self.cfg.loss_threshold,
            max_iterations=self.cfg.max_iterations,
        )
        self.state: AttackState | None = None
        self.resume: dict[str, Tensor] | None = None  # a saved AttackState.as_dict() to continue from
        self.done = 0  # steps this program ran (host-side copy of state.iteration: no sync to read it)
        self.horizon = self.cfg.max_iterations  # steps after which the program ends at the latest
        self.expected: int | None = None  # steps it is expected to take (progress bar), when not the horizon
        self.waiting = 0  # problems waiting for free rows (dia.run.pack): the program runs on while any wait

    @classmethod
    def view(cls, problems: Problems) -> Problems:
        """`problems` as this attack's server sees them: the client's masks only for the oracle."""
        return problems if cls.needs_client_masks else problems.public()

    @classmethod
    def for_problems(cls, model: nn.Module, problems: Problems, cfg: Any = None, **kwargs: Any) -> InvertingGradients:
        """The attack on `problems` as its server sees them (`view`)."""
        return cls(model, cls.view(problems), cfg, **kwargs)

    @classmethod
    def program(cls) -> type[InvertingGradients]:
        """The class whose objective this attack's rows are optimized under: attacks with the same program
        can share one (a pack); an attack that overrides the objective has its own."""
        return next(k for k in cls.__mro__ if any(name in vars(k) for name in OBJECTIVE))

    @staticmethod
    def pack(
        model: nn.Module,
        parts: Sequence[Part],
        *,
        lower: Tensor | None = None,
        upper: Tensor | None = None,
        expect: Sequence[Part] = (),
    ) -> InvertingGradients:
        """One module for several parts (attacks, rates, victims) of one model, one program and equal shared
        settings; `expect`: parts that may take rows later. Built as the parts' own attack class when they
        share one, else as their common program class."""
        classes = {p.attack for p in list(parts) + list(expect)}
        programs = {c.program() for c in classes}
        if len(programs) > 1:
            raise ValueError(
                f"attacks with different objectives cannot share a program: {sorted(c.__name__ for c in classes)}"
            )
        cls = classes.pop() if len(classes) == 1 else programs.pop()
        return cls(model, parts=parts, expect=expect, lower=lower, upper=upper)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """One-line UserError for a setting out of range: the checks of this class and its bases."""
        for klass in reversed(cls.__mro__):
            run_checks(cfg, vars(klass).get("checks", []), prefix="attack.")

    # ---- the objective -------------------------------------------------------------------------------
    def objective(self, params: dict[str, Tensor]) -> Tensor:
        """Reconstruction loss per problem (K,): gradient distance + image prior + the masks' regularizer."""
        masks = self.rows.masks(params)
        applied = self.rows.applied(masks, params)
        grads = problem_gradients(
            self.model,
            self.model_params,
            params["x"],
            self.rows.labels,
            applied,
            "apply" if applied else "off",
            self.rows.local,
        )
        grads = surviving(grads, self.rows.targets) if self.cfg.model_defense else grads
        return self.distance(grads, self.rows.targets) + self.prior(params["x"]) + self.regularizer(masks, params)

    def regularizer(self, masks: dict[str, Tensor] | None, params: dict[str, Tensor]) -> Tensor | float:
        """The keep-rate penalty of the trained masks toward each row's rate (learned ones from `params`),
        weighted per row (0 for rows that train none)."""
        if not self.rows.trained:
            return 0.0
        rates = self.rows.rates(params) if self.rows.learned else self.rows.tables["rate"]
        return self.rows.weights * keep_rate_penalty({s: masks[s] for s in self.rows.trained}, rates, self.rows.steps)

    def project(self, params: dict[str, Tensor]) -> None:
        """Keep trainables in their valid set (in place): images in the box, clipped masks in [0, 1]."""
        if self.cfg.boxed:
            x = params["x"]
            x.copy_(torch.maximum(torch.minimum(x, self.upper), self.lower))
        self.rows.clip_masks(params)
        self.rows.clamp_rates(params)

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
        return CompiledOrEager(program, strict=self.cfg.compile is True, mode=self.cfg.compile_mode)

    # ---- Lightning hooks: the engine under a Trainer ------------------------------------------------
    def on_fit_start(self) -> None:
        dev = self.device
        self.rows.to(dev)
        self.model_params = {n: p.detach() for n, p in self.model.named_parameters()}
        params = {n: t.to(dev) for n, t in self.start().items()}
        if self.resume is not None:
            self.state = AttackState.from_dict(self.resume, Layout.of(params), dev)
        else:
            self.state = AttackState.create(params, self.cfg.lr)
            with torch.no_grad():
                self.project(self.state.params)
        self.signed_columns = self.state.layout.columns(self.schedule.signed, dev)
        self.done = 0
        self.gradient = self.gradient_program()

    def configure_optimizers(self) -> None:
        """None: the per-problem signed Adam and plateau schedule live in the AttackState (dia.engine)."""
        return None

    def train_dataloader(self) -> range:
        """One 'batch' per `iterations_per_step` iterations; the data are the captured gradients held by the module."""
        return range(math.ceil(max(0, self.horizon) / self.cfg.iterations_per_step))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        n = min(self.cfg.iterations_per_step, self.horizon - self.done)
        for _ in range(n):
            self.step()
        before, self.done = self.done, self.done + n
        if self.done // self.cfg.check_every > before // self.cfg.check_every or self.done >= self.horizon:
            # the only host sync: is any problem still running (or waiting to enter)?
            self.log("loss", self.state.best_loss.mean(), prog_bar=True, on_step=True, logger=False)
            if not self.waiting and not bool(self.state.active.any()):
                self.trainer.should_stop = True

    def step(self) -> Tensor:
        """One iteration for all problems (objective, double backward, engine update); returns the losses."""
        state = self.state
        grad, losses = self.gradient(state.flat.detach())
        advance(state, losses, grad, self.schedule, self.project, self.signed_columns)
        return losses

    # ---- where problems start, and rows changing hands while a program runs ------------------------
    def start(self) -> dict[str, Tensor]:
        """Every row's start, in row order (of the parts the program was built with)."""
        starts = [self.start_of(part) for part in self.rows.parts]
        return {k: torch.cat([s[k] for s in starts]) for k in starts[0]}

    def start_of(self, part: Part) -> dict[str, Tensor]:
        """The part's rows' start, each from its own seed (dummies, then trained sites' masks)."""
        return self.rows.start_of(part, INITS[self.cfg.init])

    def fresh_state(self, part: Part) -> AttackState:
        """The state of `part`'s rows at their start (projected into the valid set), on this module's device."""
        state = AttackState.create({k: v.to(self.device) for k, v in self.start_of(part).items()}, self.cfg.lr)
        with torch.no_grad():
            self.project(state.params)
        return state

    def fits(self, part: Part) -> bool:
        """Whether `part`'s problems can take rows of this program without changing it (see `Rows.fits`)."""
        return self.rows.fits(part)

    def admit(self, part: Part, rows: Tensor, resume: AttackState | None = None) -> None:
        """`part`'s problems take rows `rows` (whose problems have left) from their start, or from `resume`
        (their saved state). Their trajectories are those they would have alone: every problem counts its
        own steps. Call `fits` first."""
        self.rows.admit(part, rows, self.device)
        self.state.put(rows.to(self.device), self.fresh_state(part) if resume is None else resume)

    def retire(self, part: Part) -> AttackResult:
        """`part`'s result; its rows are free for `admit` (its problems must have stopped)."""
        out = self.rows.result(part, self.state)
        self.rows.release(part)
        return out

    @property
    def parts(self) -> list[Part]:
        """The parts now in the program."""
        return self.rows.parts

    def rows_of(self, part: Part) -> Tensor:
        return self.rows.rows_of(part)

    def curves(self, rows: Tensor | slice = slice(None)) -> dict[str, Tensor]:
        return self.rows.curves(self.state, rows)

    def results(self) -> list[AttackResult]:
        """Each part's result, in part order."""
        return [self.rows.result(part, self.state) for part in self.rows.parts]

    def result(self) -> AttackResult:
        """All problems' result (one part, or the parts concatenated)."""
        return AttackResult.cat(self.results())


class CompiledOrEager:
    """`torch.compile(fn)`, falling back to `fn` (with one notice) when compilation fails and not `strict`.

    `compile_s` is the wall time of the first call (tracing + compiling, or loading from the persistent
    cache, plus one run), logged as a notice.
    """

    def __init__(self, fn: Any, *, strict: bool, mode: str = "default") -> None:
        self.fn, self.strict = fn, strict
        self.compiled: Any = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
        self.compile_s: float | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args)
        try:
            if self.compile_s is not None:
                return self.compiled(*args)
            started = time.perf_counter()
            out = self.compiled(*args)
            self.compile_s = time.perf_counter() - started
            logging.getLogger("dia").info("torch.compile: first call %.1f s", self.compile_s)
            return out
        except Exception as exc:
            if self.strict:
                raise
            warnings.warn(
                f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                "running eagerly (set attack.compile=false to skip the attempt)",
                stacklevel=2,
            )
            self.compiled = None
            return self.fn(*args)


__all__ = ["InvertingGradients", "Part", "MASK", "INITS", "CompiledOrEager"]
