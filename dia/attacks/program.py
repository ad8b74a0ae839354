"""The program: one LightningModule that optimizes the problems of one or more attacks at once (the plumbing).

An attack (dia.attacks.ig and its subclasses) is science: per dropout site what the attacker's copy applies,
how trained masks start and are parametrized, the gradient distance and the image prior, each read from its
own settings. A program runs K problems, one per row of the engine state (dia.engine), in parts: the problems
of one attack with its settings (`Part`). Rows say what each applies (dia.attacks.rows), so IG, WIIG and DIA at
every rate of one model share one program (a *pack*). Its jobs: the rows, the engine state, the objective
assembled from the parts' attack, the Lightning hooks, and rows changing hands while it runs (`admit`,
`retire`).

`attack(model, parts, device=...)` builds and fits a program: the one way the API, dia.train, dia.grid and packs
run attacks. An attack used on its own (`DropoutInversionAttack(model, problems)`) is itself a program of one
part, so `lightning.Trainer().fit(attack)` works too.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from dia.attacks.compiling import (
    FACTORED_SPEEDUP,
    SPEEDUP,
    CompiledOrEager,
    CostBook,
    book_dir,
    cold_guess,
    pays,
    seconds_per_call,
    signature,
)
from dia.attacks.progress import AttackProgressBar
from dia.attacks.rows import MASK, Part, Rows
from dia.console import hush, quiet
from dia.defenses import surviving
from dia.engine import AttackResult, AttackState, Layout, Schedule, advance
from dia.gradients import (
    FactorPlan,
    NotFactorable,
    each_problem_gradient,
    factored_problem_gradients,
    problem_gradients,
)
from dia.losses import keep_rate_penalty
from dia.models.batchnorm import shares_statistics
from dia.models.dropout import dropout_sites

log = logging.getLogger("dia")
GradientFunction = Callable[[Tensor], tuple[Tensor, Tensor]]  # flat (K, D) -> (d sum(loss) / d flat, losses (K,))
INITS = {
    "randn": lambda shape, g: torch.randn(shape, generator=g),
    "rand": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1,
}


class Program(L.LightningModule):
    """Optimizes the problems of `parts` (attacks with their settings, each on its problems as its server sees
    them) in one vectorized program; `expect`: parts that may take rows later (`admit`). Images are kept in
    [`lower`, `upper`] (normalized space; default: the problems' own bounds).

    Every part's attack must have the same objective (`objective_key`): the distance and prior are computed
    once for all rows. The engine settings (optimizer, schedule, stopping, compile) are the first part's; a
    pack's runs agree on them (dia.run.pack's key).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        parts: Sequence[Part] = (),
        *,
        expect: Sequence[Part] = (),
        lower: Tensor | None = None,
        upper: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.rows: Rows | None = None
        self.on_iteration: Callable[[int], None] | None = None  # called after each iteration (a progress bar)
        self.unhush: Callable[[], None] | None = None
        if model is not None:
            self.assemble(model, parts, expect=expect, lower=lower, upper=upper)

    def assemble(
        self,
        model: nn.Module,
        parts: Sequence[Part],
        *,
        expect: Sequence[Part] = (),
        lower: Tensor | None = None,
        upper: Tensor | None = None,
    ) -> None:
        """Take `model` (copied) and the rows of `parts`."""
        if not parts:
            raise ValueError("a program needs the problems of at least one attack")
        keys = {p.attack.objective_key(p.cfg) for p in [*parts, *expect]}
        if len(keys) > 1:
            raise ValueError(
                "attacks with different objectives (or objective settings) cannot share a program: "
                + ", ".join(sorted({type(p.attack).__name__ for p in [*parts, *expect]}))
            )
        for part in parts:
            part.attack.check_problems(part.problems)
        # the objective's owner (every part's gives the same, checked above); not a submodule: an attack used on
        # its own is its own program
        self.__dict__["science"] = parts[0].attack
        self.rows = Rows(parts, expect)
        self.cfg = parts[0].cfg  # the engine's settings: a pack shares them (dia.run.pack)
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

    # ---- the objective -------------------------------------------------------------------------------
    def objective(self, params: dict[str, Tensor], *, how: str = "vectorized") -> Tensor:
        """Reconstruction loss per problem (K,): gradient distance + image prior + the masks' regularizer.

        `how` the problems' gradients are taken: "vectorized" by vmap (what torch.compile takes); "loop" one after
        another with plain autograd (`each_problem_gradient`), each problem's distance taken as soon as its
        gradient is there (no (K, ...) stack of them); "factored" from one batched pass, linear layers' weight
        gradients as their factors (`factored_problem_gradients`, with `self.plan`). The eager ones do without
        torch.func's per-operation overhead (docs/benchmarks.md)."""
        masks = self.rows.masks(params)
        applied = self.rows.applied(masks, params)
        mode = "apply" if applied else "off"
        targets = self.rows.targets
        x, labels = params["x"], self.rows.labels
        if how == "vectorized":
            grads = problem_gradients(self.model, self.model_params, x, labels, applied, mode, self.rows.local)
            distance = self.distance(grads, targets)
        elif how == "factored":
            distance = self.distance(
                factored_problem_gradients(self.model, self.plan, x, labels, applied, mode), targets
            )
        else:
            each = each_problem_gradient(self.model, x, labels, applied, mode)
            distance = torch.cat(
                [self.distance(g, {n: t[k : k + 1] for n, t in targets.items()}) for k, g in enumerate(each)]
            )
        return distance + self.science.prior(x) + self.regularizer(masks, params)

    def distance(self, grads: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        """The science's gradient distance (K,), on the surviving entries only under `attack.model_defense`."""
        return self.science.distance(surviving(grads, targets) if self.cfg.model_defense else grads, targets)

    def regularizer(self, masks: dict[str, Tensor] | None, params: dict[str, Tensor]) -> Tensor | float:
        """The keep-rate penalty of the trained masks toward each row's rate (learned ones from `params`),
        weighted per row by its attack's `mask_weight` (0 for rows that train none)."""
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

    def gradient_function(self) -> Any:
        """flat (K, D) -> (d sum(loss) / d flat, losses): the whole double backward, compiled when it pays.

        Compiled, it is torch.func all the way down (grad of vmap of grad), so torch.compile captures it as one
        graph and fuses its hundreds of small kernels: the attack is launch-bound, not compute-bound. Eager, it is
        plain autograd, which does without torch.func's per-operation overhead: by default (`attack.eager=factored`)
        one batched pass of all problems with linear layers' weight gradients kept as factors, where the model
        allows it and it matches the loop at the start (`factored_if_exact`), else the problems one after another
        (`attack.eager=loop`); `attack.eager=vectorized` keeps vmap. `attack.compile=auto` compiles when the
        expected work repays the expected compile time (dia.attacks.compiling).
        """
        layout = self.state.layout

        def total(flat: Tensor) -> tuple[Tensor, Tensor]:
            losses = self.objective(layout.views(flat))
            return losses.sum(), losses

        def plain(how: str) -> GradientFunction:
            def gradient(flat: Tensor) -> tuple[Tensor, Tensor]:
                flat = flat.detach().requires_grad_(True)
                with torch.enable_grad():
                    losses = self.objective(layout.views(flat), how=how)
                    if not losses.requires_grad:  # a measured, detached objective (a closed form): nothing to follow
                        return torch.zeros_like(flat), losses.detach()
                    (grad,) = torch.autograd.grad(losses.sum(), flat, allow_unused=True, materialize_grads=True)
                return grad, losses.detach()

            return gradient

        vectorized = torch.func.grad(total, has_aux=True)
        eager, factored = vectorized, None
        # FedAvg's unrolled steps and BatchNorm statistics the server knows stay vectorized (torch.func)
        if self.cfg.eager in ("loop", "factored") and self.rows.local is None and not shares_statistics(self.model):
            self.model.requires_grad_(True)  # the loop differentiates the copy's own parameters
            eager = plain("loop")
            if self.cfg.eager == "factored":
                factored = plain("factored")
                eager = self.factored_if_exact(eager, factored)
        if self.cfg.compile is False:
            return eager
        if self.cfg.compile == "auto" and (
            routed := [s.describe() for s in dropout_sites(self.model).values() if s.kind == "functional"]
        ):  # sites found by walking the call stack (dia.models.capture), which torch.compile cannot trace
            log.info("attack.compile=auto: running eagerly (%s: a routed dropout call does not compile)", routed[0])
            return eager
        book = CostBook(book_dir())
        kind = "factored" if eager is factored else "vectorized" if eager is vectorized else "loop"  # eager program
        key = signature(
            self.model,
            self.state.flat,
            (self.science.objective_key(self.cfg), self.rows.scheme_key(), str(self.cfg.compile_mode), kind),
        )
        guess = cold_guess(self.model, self.device)
        if self.cfg.compile == "auto":
            t_eager = seconds_per_call(eager, self.state.flat.detach(), calls=1)
            compiles, why = pays(
                horizon=self.horizon,
                t_eager=t_eager,
                known=book.get(key),
                cold=guess,
                # measured on a CPU only; on a GPU the eager program is launch-bound and compiling fuses its kernels
                speedup=FACTORED_SPEEDUP if kind == "factored" and self.device.type == "cpu" else SPEEDUP,
            )
            book.put(key, t_eager=t_eager)
            log.info("attack.compile=auto: %s (%s)", "compiling" if compiles else "running eagerly", why)
            if not compiles:
                return eager
        strict = self.cfg.compile is True
        return CompiledOrEager(
            vectorized, strict=strict, mode=self.cfg.compile_mode, eager=eager, book=book, signature=key, guess=guess
        )

    def factored_if_exact(self, loop: GradientFunction, factored: GradientFunction) -> GradientFunction:
        """`factored` (attack.eager=factored) where the model allows it and it gives what `loop` gives at the start,
        else `loop`, with the reason logged: the batched pass is exact only for a model that treats the rows of a
        batch independently (dia.gradients.factored_problem_gradients), and only a distance that knows factored
        gradients (dia.losses.cosine_distance) can take them."""
        why = None
        if self.cfg.model_defense:
            why = "attack.model_defense compares the surviving entries of whole gradients"
        else:
            try:
                self.plan = FactorPlan.of(self.model)
            except NotFactorable as exc:
                why = str(exc)
        if why is None:
            flat = self.state.flat.detach()
            g_loop, l_loop = loop(flat)
            try:
                g_fact, l_fact = factored(flat)
            except Exception as exc:  # whatever stops the batched pass (a model's own forward, a distance): the loop
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            else:
                if not (
                    torch.allclose(l_fact, l_loop, rtol=1e-4, atol=1e-6)
                    and (g_fact - g_loop).norm() <= 1e-3 * g_loop.norm() + 1e-12
                ):
                    why = "one batched pass differs from the problems' own gradients (the model mixes a batch's rows?)"
        if why is not None:
            log.info("attack.eager=factored: one problem after another (%s)", why)
            return loop
        self.model.requires_grad_(False)  # factored gradients need no parameter gradients
        return factored

    # ---- Lightning hooks: the engine under a Trainer ------------------------------------------------
    def setup(self, stage: str) -> None:
        """Under the user's own Trainer too: the warnings Lightning gives this module (no optimizer, a model in
        eval mode, few batches) and torch's noise are hushed until `teardown` (dia.console.hush)."""
        if self.unhush is None:
            self.unhush = hush()

    def teardown(self, stage: str) -> None:
        if self.unhush is not None:
            self.unhush()
            self.unhush = None

    def on_fit_start(self) -> None:
        if self.rows is None:
            raise ValueError(f"{type(self).__name__}: built from settings only; give it a model and problems")
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
        self.gradient = self.gradient_function()

    def configure_optimizers(self) -> None:
        """None: the per-problem signed Adam and plateau schedule live in the AttackState (dia.engine)."""
        return None

    def train_dataloader(self) -> range:
        """One 'batch' per `iterations_per_step` iterations; the data are the captured gradients held here."""
        return range(math.ceil(max(0, self.horizon) / self.cfg.iterations_per_step))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        n = min(self.cfg.iterations_per_step, self.horizon - self.done)
        tick = self.on_iteration
        for i in range(n):
            self.step()
            if tick is not None:  # a progress bar: moves every iteration, from the host-side count (no sync)
                tick(self.done + i + 1)
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
        return self.rows.fits(part) and part.attack.objective_key(part.cfg) == self.science.objective_key(self.cfg)

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


# ---- building and fitting: the one entry point ---------------------------------------------------------
# The Trainer arguments an attack runs under (besides the device, the bar and the callbacks): one epoch over the
# program's steps, and none of Lightning's logging, checkpoints or model summary (dia's run folder records the
# run). `lightning.Trainer(**TRAINER)` is the quiet way to fit an attack yourself (docs/api.md).
TRAINER: dict[str, Any] = {
    "max_epochs": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """torch's float32 matmul precision set to `precision` (attack.matmul_precision) inside, restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def fit(
    program: Program, device: torch.device, *, title: str, progress: bool, callbacks: Sequence[Callback] = ()
) -> None:
    """Run `program` to its end (or a stop) under a Lightning Trainer on `device`."""
    cfg = program.cfg
    with matmul_precision(cfg.matmul_precision), quiet():  # the attacker's program only: clients at full precision
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=[device.index or 0] if device.type == "cuda" else 1,
            **TRAINER,
            enable_progress_bar=progress,
            callbacks=([AttackProgressBar(title)] if progress else []) + list(callbacks),
            plugins=[LightningEnvironment()],  # no SLURM auto-requeue inside Lightning: dia checkpoints itself
        )
        # SIGTERMException: Lightning's own reaction to SIGTERM, after our callback saved and stopped
        with suppress(SIGTERMException):
            trainer.fit(program)


def attack(
    model: nn.Module,
    parts: Sequence[Part],
    *,
    device: torch.device,
    expect: Sequence[Part] = (),
    lower: Tensor | None = None,
    upper: Tensor | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
    title: str | None = None,
) -> Program:
    """Build the program of `parts` (see `Program`) and fit it on `device`; returns it (`result()`, `results()`).

    The one way the API, dia.train, dia.grid and packs run attacks; `callbacks` (Lightning's) watch and steer the
    program (a pack's turnover sets `resume`, `horizon` and `waiting` in its `on_fit_start`)."""
    program = Program(model, parts, expect=expect, lower=lower, upper=upper)
    if title is None:
        counts: dict[str, int] = {}
        for part in parts:
            counts[part.attack.name.upper()] = counts.get(part.attack.name.upper(), 0) + part.problems.num_problems
        title = " ".join(f"{k} x{v}" for k, v in counts.items())
    fit(program, device, title=title, progress=progress, callbacks=callbacks)
    return program


__all__ = ["Program", "Part", "MASK", "INITS", "TRAINER", "CompiledOrEager", "attack", "fit", "matmul_precision"]
