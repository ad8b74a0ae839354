"""Attacks as LightningModules. IG is the base; WIIG adds oracle masks; DIA adds mask parameters; DLG swaps
the objective.

An attack is one module of this package (its class, registered with `@register(name)`) and one YAML,
`configs/attack/<name>.yaml` (its settings). Every module here is imported when the package is, so a new
file is found without naming it anywhere else. An attack defined elsewhere (a notebook, a test) registers
the same way and is then a choice of `attack=` in that process.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TypeVar

from dia.registry import Registry

ATTACKS: Registry = Registry("attack")
A = TypeVar("A")


def register(name: str) -> Callable[[A], A]:
    """Class decorator: make an attack class the code of `attack=<name>` (and set its `name`)."""

    def deco(cls: A) -> A:
        cls.name = name  # type: ignore[attr-defined]
        return ATTACKS.register(name)(cls)

    return deco


from dia.attacks.ig import InvertingGradients  # noqa: E402
from dia.attacks.rows import Part  # noqa: E402
from dia.engine import AttackResult  # noqa: E402

for _module in pkgutil.iter_modules(__path__):  # every attack of the package registers itself
    importlib.import_module(f"{__name__}.{_module.name}")

from dia.attacks.dia import DropoutInversionAttack  # noqa: E402
from dia.attacks.wiig import WellInformedIG  # noqa: E402

__all__ = [
    "ATTACKS",
    "register",
    "AttackResult",
    "InvertingGradients",
    "Part",
    "WellInformedIG",
    "DropoutInversionAttack",
]
