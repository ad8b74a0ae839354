"""The attacks' registry: `attack=<name>` -> its class, and the settings of each (its YAML)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from omegaconf import DictConfig

from dia import config
from dia.registry import Registry

ATTACKS: Registry = Registry("attack")
A = TypeVar("A")


def register(name: str) -> Callable[[A], A]:
    """Class decorator: make an attack class the code of `attack=<name>` (and set its `name`)."""

    def deco(cls: A) -> A:
        cls.name = name  # type: ignore[attr-defined]
        # without a YAML of its own, `attack=<name>` has the settings of its nearest registered base
        bases = [k.name for k in cls.__mro__ if "name" in vars(k)]  # type: ignore[attr-defined]
        config.register_choice("attack", name, settings_of=bases)
        return ATTACKS.register(name)(cls)

    return deco


def unregister(name: str) -> None:
    """Forget attack `name` (one defined for one experiment or one test)."""
    ATTACKS.unregister(name)
    config.unregister_choice("attack", name)


def settings_of(attack: Any, **overrides: Any) -> DictConfig:
    """The settings of an attack (a registered name, or a class: its registered `name`'s YAML), with keyword
    `overrides` (values, or command-line text for string keys), checked by the attack's own checks too."""
    cls = ATTACKS.get(attack) if isinstance(attack, str) else attack
    cfg = config.group_settings("attack", cls.name, **overrides)
    cls.check_config(cfg)
    return cfg


# compose's code checks for `attack=`: the attack's own settings (registered from here: config imports no code)
config.register_check("attack", lambda cfg: ATTACKS.get(cfg.attack.name).check_config(cfg.attack))
