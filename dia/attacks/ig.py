"""Inverting Gradients (Geiping et al., 2020) as a LightningModule: the base every attack extends.

"Training" optimizes K problems' dummy inputs at once (see dia.engine) so that their gradient matches the
captured one: cosine gradient distance over all parameters + TV, signed Adam, images boxed to the valid
range. The attacker's model runs without dropout (eval mode), as in the paper's IG baseline.
Subclasses state only what differs, per dropout site: whether the attacker's copy applies the client's
mask there (WIIG) or a trainable one (DIA), how trainable masks start, and the weight of their regularizer.
Because that is per problem, one module can attack a *pack*: IG, WIIG and DIA problems at several dropout
rates of the same model, in one vectorized program (`InvertingGradients.pack`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import lightning as L
from omegaconf import DictConfig, OmegaConf
import torch
from torch import Tensor, nn

from dia.defenses import surviving
from dia.engine import STATUS, AttackResult, AttackState, Layout, Schedule, advance
from dia.gradients import problem_gradients
from dia.losses import cosine_distance, keep_rate_penalty, total_variation
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
    parallel: Any = "auto"  # rows of a program (problems at once): an int, or auto (24 on a CPU, what fits on a GPU)
    labels: str = "known"  # known (as in the paper) | infer (from the gradient; batch_size=1)
    compile: Any = "auto"  # torch.compile the gradient program: true | false | auto (try it, fall back to eager)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    matmul_precision: str = "highest"  # float32 matmuls of the attack: highest | high (TF32 on GPUs) | medium
    iterations_per_step: int = 10  # engine iterations per Lightning training_step (amortizes the harness)
    check_every: int = 50  # iterations between host checks whether every problem has stopped (and rows turn over)
    refill: bool = True  # a pack larger than attack.parallel: waiting problems take the rows of stopped ones
    log_every: int = 50  # iterations between logged training curves
    model_defense: bool = False  # match only the entries the (defended) shared gradient kept nonzero (dia.defenses)


INITS = {
    "randn": lambda shape, g: torch.randn(shape, generator=g),
    "rand": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1,
}


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
        except Exception as exc:  # noqa: BLE001 - no compiler toolchain, an unsupported op, ...
            if self.strict:
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                          "running eagerly (set attack.compile=false to skip the attempt)", stacklevel=2)
            self.compiled = None
            return self.fn(*args)


@dataclass(frozen=True)
class Part:
    """Problems of one attack inside a module: a module attacks one part, or several at once (a pack).

    `problems` are as the server sees them (see `InvertingGradients.view`); `cfg` is the attack's config.
    """

    attack: type["InvertingGradients"]
    problems: Problems
    cfg: Any


class InvertingGradients(L.LightningModule):
    """IG: optimize dummies only; the attacker's copy of the model runs without dropout.

    A module attacks the problems of one or more `Part`s in one vectorized program. Each row (problem) says
    per dropout site what the attacker's copy applies there: nothing (IG), the client's mask (WIIG) or a
    trained mask (DIA), at its own rate. So IG, WIIG and DIA at every rate of one model share one program.
    """

    needs_client_masks = False  # True only for the oracle (WIIG)

    def __init__(self, model: nn.Module, problems: Problems | None, cfg: Any, *, lower: Tensor, upper: Tensor,
                 parts: Sequence[Part] | None = None, expect: Sequence[Part] = ()) -> None:
        super().__init__()
        parts = list(parts) if parts else [Part(type(self), problems, cfg)]
        for part in parts:
            _check_view(part)
        self.parts = parts  # the parts now in the program, and their rows (see `admit`, `retire`)
        sizes = [p.problems.num_problems for p in parts]
        self.part_rows = [torch.arange(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(parts))]
        self.automatic_optimization = False
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # the caller's model stays untouched
        # The client normalizes with batch statistics (train mode); so does the attacker's copy, without
        # running-stat updates (which vmap cannot batch).
        torch.func.replace_all_batch_norm_modules_(self.model)
        first = parts[0].problems
        self.targets = {n: torch.cat([p.problems.targets[n] for p in parts]) for n in first.targets}
        self.labels = torch.cat([p.problems.labels for p in parts])
        self.input_shape = first.input_shape
        cfg = parts[0].cfg  # a pack shares every setting but the attack's own (dia.run.pack checks it)
        self.cfg = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg  # plain dataclass: cheap to read
        trainer_cfg = next((p.cfg for p in parts + list(expect) if p.attack.trains_masks()), None)
        self.mask_param = getattr(trainer_cfg, "mask_param", "clip")
        self._scheme(parts + list(expect))
        *tables, weights = zip(*[self._tables(part) for part in parts])  # per table, one dict per part
        self.train, self.scale, self.rate, self.client = ({s: torch.cat([d[s] for d in table]) for s in table[0]}
                                                          for table in tables)
        self.weights = torch.cat(weights)
        self.register_buffer("lower", lower.clone())
        self.register_buffer("upper", upper.clone())
        self.schedule = Schedule(
            lr=cfg.lr, signed=frozenset({"x"}) if cfg.signed_gradients else frozenset(),
            lr_factor=cfg.lr_factor, lr_patience=cfg.lr_patience, early_stop_patience=cfg.early_stop_patience,
            loss_threshold=cfg.loss_threshold, max_iterations=cfg.max_iterations,
        )
        self.state: AttackState | None = None
        self.resume: dict[str, Tensor] | None = None  # a saved AttackState.as_dict() to continue from
        self.done = 0  # steps this program ran (host-side copy of state.iteration: no sync to read it)
        self.horizon = cfg.max_iterations  # steps after which the program ends at the latest
        self.expected: int | None = None  # steps it is expected to take (progress bar), when not the horizon
        self.waiting = 0  # problems waiting for free rows (dia.run.pack): the program runs on while any wait

    @classmethod
    def view(cls, problems: Problems) -> Problems:
        """`problems` as this attack's server sees them: the client's masks only for the oracle."""
        return problems if cls.needs_client_masks else problems.public()

    @classmethod
    def for_problems(cls, model: nn.Module, problems: Problems, cfg: Any, *, lower: Tensor, upper: Tensor) -> "InvertingGradients":
        """The attack on `problems` as the server sees them."""
        return cls(model, cls.view(problems), cfg, lower=lower, upper=upper)

    @staticmethod
    def pack(model: nn.Module, parts: Sequence[Part], *, lower: Tensor, upper: Tensor,
             expect: Sequence[Part] = ()) -> "InvertingGradients":
        """One module for several parts (attacks, rates, victims) of the same model and attack settings;
        `expect`: parts that may take rows later (`admit`)."""
        return InvertingGradients(model, None, None, lower=lower, upper=upper, parts=parts, expect=expect)

    # ---- what subclasses change: per dropout site, what the attacker's copy applies ---------------
    @classmethod
    def site_role(cls, part: Part, site: str) -> str | None:
        """'train' (a trainable mask), 'client' (the client's mask) or None (no dropout at this site)."""
        return None

    @classmethod
    def trains_masks(cls) -> bool:
        return False

    @classmethod
    def init_mask(cls, part: Part, site: str, generators: list[torch.Generator]) -> Tensor:
        """Initial mask parameters (n, B, ...) of the part's rows at a trained site."""
        return torch.ones(len(generators), *part.problems.mask_shapes[site])

    @classmethod
    def mask_weight(cls, part: Part) -> float:
        """Weight of the keep-rate penalty for the part's rows."""
        return 0.0

    def project(self, params: dict[str, Tensor]) -> None:
        """Keep trainables in their valid set (in place): images in the box, clipped masks in [0, 1]."""
        if self.cfg.boxed:
            x = params["x"]
            x.copy_(torch.maximum(torch.minimum(x, self.upper), self.lower))
        if self.mask_param == "clip":
            for k, v in params.items():
                if k.startswith(MASK):
                    v.clamp_(0.0, 1.0)

    # ---- rows: a program's sites, and what each row applies there --------------------------------
    def _scheme(self, parts: list[Part]) -> None:
        """The program's sites and their shapes; those some row trains, those some row takes from the
        client, and those where some row does not train (`mixed`). `parts` includes those expected later."""
        roles = [{site: _role(part, site) for site in part.problems.mask_shapes} for part in parts]
        sites: dict[str, tuple[int, ...]] = {}
        for part, role in zip(parts, roles):
            sites.update({s: part.problems.mask_shapes[s] for s, r in role.items() if r is not None and s not in sites})
        self.sites = sites
        self.trained_sites = [s for s in sites if any(r.get(s) == "train" for r in roles)]
        self.client_sites = [s for s in sites if any(r.get(s) == "client" for r in roles)]
        self.mixed = {s: not all(r.get(s) == "train" for r in roles) for s in sites}

    def _tables(self, part: Part) -> tuple[dict[str, Tensor], ...]:
        """Per site, the part's rows: trains?, the scale 1/(1-p), the target rate, the client's mask
        (client sites only); and the rows' regularizer weights."""
        n = part.problems.num_problems
        train, scale, rate, client = {}, {}, {}, {}
        for site, shape in self.sites.items():
            r, p = _role(part, site), part.problems.rates.get(site, 0.0)
            train[site] = torch.full((n,), r == "train")
            scale[site] = torch.full((n,), 1.0 / (1.0 - p) if r is not None else 1.0)
            rate[site] = torch.full((n,), p if r == "train" else 0.0)
            if site in self.client_sites:
                client[site] = part.problems.true_masks[site] if r == "client" else torch.ones(n, *shape)
        return train, scale, rate, client, torch.full((n,), part.attack.mask_weight(part))

    def fits(self, part: Part) -> bool:
        """Whether `part`'s problems can take rows of this program (`admit`) without changing its program:
        each site it drops at exists with the same shape and role, and rows that do not train a trained
        site are allowed there."""
        for site in set(part.problems.mask_shapes) | set(self.sites):
            r = _role(part, site)
            if r is not None and self.sites.get(site) != part.problems.mask_shapes[site]:
                return False
            if (r == "train") != (site in self.trained_sites) and (r == "train" or not self.mixed[site]):
                return False
            if r == "client" and site not in self.client_sites:
                return False
        return True

    def masks(self, params: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The (unscaled) masks every row applies, {site: (K, B, ...)}; None when no row drops anything."""
        if not self.sites:
            return None
        out = {}
        for site in self.sites:
            fixed = self.client.get(site)
            raw = params.get(MASK + site)
            if raw is None:  # no row trains this site: the client's masks where given (WIIG rows)
                out[site] = fixed
                continue
            value = torch.sigmoid(raw) if self.mask_param == "sigmoid" else raw
            if self.mixed[site]:
                value = torch.where(_column(self.train[site], value), value, 1.0 if fixed is None else fixed)
            out[site] = value
        return out

    def regularizer(self, masks: dict[str, Tensor] | None) -> Tensor | float:
        if not self.trained_sites:
            return 0.0
        return self.weights * keep_rate_penalty({s: masks[s] for s in self.trained_sites}, self.rate)

    # ---- shared machinery ------------------------------------------------------------------------
    def initial_of(self, part: Part) -> dict[str, Tensor]:
        """The part's rows' start, each from its own seed: the dummies, then the masks of the trained sites."""
        gens = [torch.Generator().manual_seed(s) for s in part.problems.seeds]
        out = {"x": torch.stack([INITS[self.cfg.init](self.input_shape, g) for g in gens])}
        for site in self.trained_sites:
            trains = _role(part, site) == "train"
            out[MASK + site] = (part.attack.init_mask(part, site, gens) if trains
                                else torch.ones(len(gens), *self.sites[site]))
        return out

    def initial_params(self) -> dict[str, Tensor]:
        """Every row's start, in row order (of the parts the program was built with)."""
        starts = [self.initial_of(part) for part in self.parts]
        return {k: torch.cat([s[k] for s in starts]) for k in starts[0]}

    def objective(self, params: dict[str, Tensor]) -> Tensor:
        """Reconstruction loss per problem, (K,)."""
        masks = self.masks(params)
        applied = None if masks is None else {s: m * _column(self.scale[s], m) for s, m in masks.items()}
        grads = problem_gradients(self.model, self.model_params, params["x"], self.labels, applied,
                                  "apply" if applied else "off")
        grads = surviving(grads, self.targets) if self.cfg.model_defense else grads
        loss = cosine_distance(grads, self.targets) + self.cfg.tv_weight * total_variation(params["x"])
        return loss + self.regularizer(masks)

    def on_fit_start(self) -> None:
        dev = self.device
        self.targets = {n: t.to(dev) for n, t in self.targets.items()}
        self.labels = self.labels.to(dev)
        for table in (self.train, self.client, self.scale, self.rate):
            table.update({s: t.to(dev) for s, t in table.items()})
        self.weights = self.weights.to(dev)
        self.model_params = {n: p.detach() for n, p in self.model.named_parameters()}
        params = {n: t.to(dev) for n, t in self.initial_params().items()}
        if self.resume is not None:
            self.state = AttackState.from_dict(self.resume, Layout.of(params), dev)
        else:
            self.state = AttackState.create(params, self.cfg.lr)
            with torch.no_grad():
                self.project(self.state.params)
        self.signed_columns = self.state.layout.columns(self.schedule.signed, dev)
        self.done = 0
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
        return CompiledOrEager(program, strict=self.cfg.compile is True, mode=self.cfg.compile_mode)

    def configure_optimizers(self) -> None:
        """None: the per-problem signed Adam and plateau schedule live in the AttackState (dia.engine)."""
        return None

    def train_dataloader(self) -> range:
        """One 'batch' per `iterations_per_step` iterations; the data are the captured gradients held by the module."""
        return range(math.ceil(max(0, self.horizon) / self.cfg.iterations_per_step))

    def step(self) -> Tensor:
        """One iteration for all problems (objective, double backward, engine update); returns the losses."""
        state = self.state
        grad, losses = self.gradient(state.flat.detach())
        advance(state, losses, grad, self.schedule, self.project, self.signed_columns)
        return losses

    def training_step(self, batch: Any, batch_idx: int) -> None:
        n = min(self.cfg.iterations_per_step, self.horizon - self.done)
        for _ in range(n):
            self.step()
        before, self.done = self.done, self.done + n
        if self.done // self.cfg.check_every > before // self.cfg.check_every or self.done == self.horizon:
            # the only host sync: is any problem still running (or waiting to enter)?
            self.log("loss", self.state.best_loss.mean(), prog_bar=True, on_step=True, logger=False)
            if not self.waiting and not bool(self.state.active.any()):
                self.trainer.should_stop = True

    # ---- a program's rows change hands: problems that stopped leave, waiting ones enter ----------------
    def admit(self, part: Part, rows: Tensor, resume: AttackState | None = None) -> None:
        """`part`'s problems take rows `rows` (whose problems have left) from their start, or from `resume`
        (their saved state). Their trajectories are those they would have alone: every problem counts its
        own steps. Call `fits` first."""
        _check_view(part)
        if not self.fits(part) or len(rows) != part.problems.num_problems:
            raise ValueError(f"{part.attack.__name__}: these problems do not fit this program's rows")
        dev = self.device
        idx = rows.to(dev)
        for name, t in part.problems.targets.items():
            self.targets[name][idx] = t.to(dev)
        self.labels[idx] = part.problems.labels.to(dev)
        *tables, weights = self._tables(part)
        for table, new in zip((self.train, self.scale, self.rate, self.client), tables):
            for site, value in new.items():
                table[site][idx] = value.to(dev)
        self.weights[idx] = weights.to(dev)
        self.state.put(idx, self.fresh_state(part) if resume is None else resume)
        self.parts.append(part)
        self.part_rows.append(rows.cpu())

    def fresh_state(self, part: Part) -> AttackState:
        """The state of `part`'s rows at their start (projected into the valid set), on this module's device."""
        state = AttackState.create({k: v.to(self.device) for k, v in self.initial_of(part).items()}, self.cfg.lr)
        with torch.no_grad():
            self.project(state.params)
        return state

    def rows_of(self, part: Part) -> Tensor:
        """The rows (CPU index) that `part`, a part now in the program, holds."""
        return self.part_rows[self._index(part)]

    def retire(self, part: Part) -> AttackResult:
        """`part`'s result; its rows are free for `admit` (its problems must have stopped)."""
        i = self._index(part)
        out = self.result_of(part, self.part_rows[i])
        del self.parts[i], self.part_rows[i]
        return out

    def _index(self, part: Part) -> int:
        return next(i for i, p in enumerate(self.parts) if p is part)

    def curves(self, rows: Tensor | slice = slice(None)) -> dict[str, Tensor]:
        """What is worth plotting while an attack runs: means over `rows` (stopped ones at their last value)."""
        s = self.state
        out = {
            "attack/loss": s.last_loss[rows].mean(),
            "attack/best_loss": s.best_loss[rows].mean(),
            "attack/lr": s.lr[rows].mean(),
            "attack/running": s.active[rows].sum(),
        }
        if self.trained_sites:  # the trained masks' mean keep-rate (the client's is 1 - p) and undecided share
            masks = self.masks(s.params)
            flat = torch.cat([masks[k].detach()[rows][self.train[k][rows]].flatten() for k in self.trained_sites])
            if flat.numel():
                out["masks/keep_rate"] = flat.mean()
                out["masks/undecided"] = ((flat > 0.1) & (flat < 0.9)).float().mean()
        return out

    def result_of(self, part: Part, rows: Tensor) -> AttackResult:
        """The best iterates and bookkeeping of `part`, whose problems are in rows `rows`."""
        s = self.state
        own = [k for k in self.trained_sites if _role(part, k) == "train"]
        masks = self.masks(s.best_params) if own else None
        rows = rows.to(s.flat.device)
        return AttackResult(
            x=s.best_params["x"][rows].detach().cpu(),
            masks={k: masks[k][rows].detach().cpu() for k in own} if own else None,
            best_loss=s.best_loss[rows].cpu(),
            best_iteration=s.best_iteration[rows].cpu(),
            iterations=s.iterations[rows].cpu(),
            status=[STATUS[int(c)] for c in s.status[rows].cpu()],
        )

    def results(self) -> list[AttackResult]:
        """Each part's result, in part order."""
        return [self.result_of(part, rows) for part, rows in zip(self.parts, self.part_rows)]

    def result(self) -> AttackResult:
        """All problems' result (one part, or the parts concatenated)."""
        return AttackResult.cat(self.results())


MASK = "mask/"  # trainable mask parameters are named mask/<site>


def _check_view(part: Part) -> None:
    if part.problems.true_masks is not None and not part.attack.needs_client_masks:
        raise ValueError(f"{part.attack.__name__} must not see the client's dropout masks")


def _role(part: Part, site: str) -> str | None:
    """What `part`'s rows apply at `site`: nothing where the part's model does not drop there (p = 0)."""
    return part.attack.site_role(part, site) if site in part.problems.mask_shapes else None


def _column(per_row: Tensor, like: Tensor) -> Tensor:
    """A (K,) tensor shaped to broadcast over `like` (K, ...)."""
    return per_row.view(-1, *([1] * (like.dim() - 1)))
