"""Inverting Gradients (Geiping et al., 2020): the attack every other attack extends.

An attack is science: what its server sees (`view`), per dropout site what the attacker's copy of the model
applies (`site_role`), how trained masks start and are parametrized, their regularizer weight, the gradient
distance and the image prior. Each reads the attack's own settings (`self.cfg`, an attack section of a run
config). IG's: the cosine gradient distance over all parameters plus total variation; the attacker's model runs
without dropout (eval mode), as the paper's IG baseline. The engine (signed Adam, images boxed to the valid
range, schedule, stopping) and the rows of a program are dia.attacks.program's.

Built with a model and problems, an attack is a program of its own (a LightningModule:
`lightning.Trainer(max_epochs=1).fit(attack)`, then `attack.result()`); built with its settings only
(`DropoutInversionAttack(cfg=...)`, or keyword settings) it is one part of a pack (dia.attacks.program).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dia.attacks.program import Part, Program
from dia.attacks.registry import register, settings_of
from dia.config import Check, run_checks
from dia.config.schema import AttackConfig
from dia.errors import UserError
from dia.losses import batch_norm_prior, cosine_distance, mean_square, total_variation
from dia.models.batchnorm import STATS
from dia.problems import Problems

OBJECTIVE = ("distance", "prior")  # the hooks that make an attack's objective its own

# a check is (key, test, rule): see dia.config.run_checks
INIT_CHECK: Check = ("init", lambda v: v in ("randn", "rand"), "must be one of: randn, rand")
CONV_MASKS = ("drawn", "channel")
MAX_RESTARTS = 1000
# the settings of #23 (batches, CNNs, BatchNorm), shared by every attack
SHARED_CHECKS: list[Check] = [
    (
        "restarts",
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_RESTARTS,
        f"must be an integer in 1..{MAX_RESTARTS}",
    ),
    ("conv_masks", lambda v: v in CONV_MASKS, f"must be one of: {', '.join(CONV_MASKS)}"),
    ("l2_weight", lambda v: 0 <= v < float("inf"), "must be >= 0"),
    ("bn_weight", lambda v: 0 <= v < float("inf"), "must be >= 0"),
]


@register("ig")
class InvertingGradients(Program):
    """IG: optimize dummies only; the attacker's copy of the model runs without dropout."""

    name: ClassVar[str] = "ig"  # set by dia.attacks.register
    needs_client_masks: ClassVar[bool] = False  # True only for the oracle (WIIG)
    checks: ClassVar[list[Check]] = [INIT_CHECK, *SHARED_CHECKS]

    def __init__(
        self,
        model: nn.Module | None = None,
        problems: Problems | None = None,
        cfg: Any = None,
        *,
        lower: Tensor | None = None,
        upper: Tensor | None = None,
        **settings: Any,
    ) -> None:
        """The attack on `problems` (as its server sees them: `view`) of `model`, with settings `cfg` (the attack
        section of a run config) or the attack's defaults updated by keyword `settings`; images are kept in
        [`lower`, `upper`] (normalized space; default: the problems' own bounds). Without a model: the attack
        with its settings only, a part of a program of several (dia.attacks.program)."""
        super().__init__()
        if cfg is not None and settings:
            raise TypeError(f"{type(self).__name__}: give either cfg or keyword settings, not both")
        cfg = settings_of(type(self), **settings) if cfg is None else cfg
        self.cfg = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg  # a plain object: cheap to read
        if model is not None:
            if problems is None:
                raise ValueError(f"{type(self).__name__}: give the problems to attack")
            self.assemble(model, [Part(self, problems)], lower=lower, upper=upper)

    # ---- what the server sees, and what it applies at each dropout site -------------------------------
    @classmethod
    def view(cls, problems: Problems) -> Problems:
        """`problems` as this attack's server sees them: the client's masks only for the oracle, which needs them."""
        if not cls.needs_client_masks:
            return problems.public()
        if problems.true_masks is None and problems.rates:
            raise UserError(
                f"attack={cls.name}: needs the client's dropout masks, and none were given "
                "(masks=... for dia.reconstruct; dia.capture_update records them)"
            )
        return problems

    def check_problems(self, problems: Problems) -> None:
        """Warn when the attack's masks have nowhere to go: a model without dropout makes it IG."""
        if not problems.rates and type(self).site_role is not InvertingGradients.site_role:
            warnings.warn(
                f"{type(self).__name__}: the model has no dropout (p=0 everywhere), so there are no masks "
                "to use: it behaves as IG",
                stacklevel=4,
            )

    def site_role(self, problems: Problems, site: str) -> str | None:
        """Per dropout site the problems' model drops at: 'train' (a trainable mask), 'client' (the client's mask)
        or None (no dropout there)."""
        return None

    def init_images(self, problems: Problems, generators: list[torch.Generator], init: Callable[..., Tensor]) -> Tensor:
        """Initial dummies (n, B, C, H, W) of the problems' rows: `init(shape, generator)` per problem (the engine's
        `attack.init`: randn or rand). An attack that knows better (a closed form) starts elsewhere."""
        return torch.stack([init(problems.input_shape, g) for g in generators])

    def trained_shape(self, problems: Problems, site: str) -> tuple[int, ...]:
        """The shape (B, ...) of the mask parameters a problem has at a site the attack trains: the site's own, or
        with `conv_masks=channel` one value per channel at conv sites (masks of 4 or more dims)."""
        shape = tuple(problems.mask_shapes[site])
        if self.cfg.conv_masks == "channel" and len(shape) >= 4:
            return (*shape[:2], *(1,) * (len(shape) - 2))
        return shape

    def init_mask(self, problems: Problems, site: str, generators: list[torch.Generator]) -> Tensor:
        """Initial mask parameters (n, B, ...) of the problems' rows at a site the attack trains."""
        return torch.ones(len(generators), *self.trained_shape(problems, site))

    def mask_weight(self) -> float:
        """Weight of the keep-rate penalty of trained masks."""
        return 0.0

    def attacker_rate(self, problems: Problems, site: str) -> float:
        """The dropout rate the attacker uses at a site it trains (scale 1/(1-p), keep-rate target; the start
        of a learned rate): the model's own p."""
        return problems.rates.get(site, 0.0)

    def learns_rate(self) -> bool:
        """Whether the rows learn their dropout rate per site (a trainable logit) instead of fixing it."""
        return False

    def mask_parametrization(self) -> str:
        """How trained masks are parametrized: 'clip' (values clipped to [0, 1]) or 'sigmoid'."""
        return "clip"

    # ---- the objective -----------------------------------------------------------------------------------
    def distance(self, grads: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        """Per problem, how far the dummies' gradient is from the captured one: IG's cosine distance (K,). Where the
        client sent its BatchNorm statistics too (model.bn_stats), the cosine is over the gradient alone, plus
        `bn_weight` times the BatchNorm prior (the dummies' statistics against the client's) when it is set."""
        stats = {n: t for n, t in targets.items() if n.startswith(STATS)}
        if not stats:
            return cosine_distance(grads, targets)
        out = cosine_distance(grads, {n: t for n, t in targets.items() if n not in stats})
        return out + self.cfg.bn_weight * batch_norm_prior(grads, stats) if self.cfg.bn_weight else out

    def prior(self, x: Tensor) -> Tensor:
        """Per problem, the image prior: total variation weighted by `tv_weight`, plus the images' mean square
        weighted by `l2_weight` when it is set (K,)."""
        tv = self.cfg.tv_weight * total_variation(x)
        return tv + self.cfg.l2_weight * mean_square(x) if self.cfg.l2_weight else tv

    @classmethod
    def objective_owner(cls) -> type[InvertingGradients]:
        """The class whose objective (`distance`, `prior`) this attack's rows are optimized under."""
        return next(k for k in cls.__mro__ if any(name in vars(k) for name in OBJECTIVE))

    @classmethod
    def objective_key(cls, cfg: Any) -> tuple:
        """What decides the objective of this attack with settings `cfg`: rows with equal keys can share one
        program. IG's objective reads only settings every attack has (equal across a pack); an attack that
        states its own objective may read its own settings, so they are part of its key."""
        owner = cls.objective_owner()
        key: tuple = (f"{owner.__module__}.{owner.__qualname__}",)
        if owner is InvertingGradients:
            return key
        shared = {f.name for f in dataclasses.fields(AttackConfig)}
        own = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else dataclasses.asdict(cfg)
        return (*key, tuple(sorted((k, repr(v)) for k, v in own.items() if k not in shared)))

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """One-line UserError for a setting out of range: the checks of this class and its bases."""
        for klass in reversed(cls.__mro__):
            run_checks(cfg, vars(klass).get("checks", []), prefix="attack.")


__all__ = ["InvertingGradients"]
