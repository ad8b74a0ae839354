"""Attacks as LightningModules. IG is the base; WIIG adds oracle masks; DIA adds mask parameters; DLG swaps
the objective. The program that runs them (rows, engine, Lightning hooks) is dia.attacks.program.

An attack is one module of this package (its class, registered with `@register(name)`) and one YAML,
`configs/attack/<name>.yaml` (its settings). Every module here is imported when the package is, so a new
file is found without naming it anywhere else. An attack defined elsewhere (a notebook, a test) registers
the same way and is then a choice of `attack=` in that process, with the settings of its nearest base class
that has a YAML.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from dia.attacks.registry import ATTACKS, register, settings_of, unregister


def part(cfg: Any, problems: Any) -> Part:
    """The problems of one run (or a group of them) as attack `cfg.name` with settings `cfg` sees them."""
    cls = ATTACKS.get(cfg.name)
    return Part(cls(cfg=cfg), cls.view(problems))


from dia.attacks.ig import InvertingGradients  # noqa: E402
from dia.attacks.program import TRAINER, Part, Program, attack  # noqa: E402
from dia.engine import AttackResult  # noqa: E402

for _module in pkgutil.iter_modules(__path__):  # every attack of the package registers itself
    importlib.import_module(f"{__name__}.{_module.name}")

from dia.attacks.dia import DropoutInversionAttack  # noqa: E402
from dia.attacks.wiig import WellInformedIG  # noqa: E402

__all__ = [
    "ATTACKS",
    "register",
    "unregister",
    "settings_of",
    "part",
    "attack",
    "TRAINER",
    "AttackResult",
    "Program",
    "Part",
    "InvertingGradients",
    "WellInformedIG",
    "DropoutInversionAttack",
]
