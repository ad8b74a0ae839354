"""Attacks as LightningModules. IG is the base; WIIG adds oracle masks; DIA adds mask parameters."""

from __future__ import annotations

from dia.attacks.dia import DIAConfig, DropoutInversionAttack
from dia.attacks.ig import AttackConfig, InvertingGradients, Part
from dia.engine import AttackResult
from dia.attacks.wiig import WellInformedIG
from dia.registry import Registry

ATTACKS: Registry[type[InvertingGradients]] = Registry("attack")
ATTACKS.register("ig", schema=AttackConfig)(InvertingGradients)
ATTACKS.register("wiig", schema=AttackConfig)(WellInformedIG)
ATTACKS.register("dia", schema=DIAConfig)(DropoutInversionAttack)

__all__ = ["ATTACKS", "AttackConfig", "DIAConfig", "AttackResult", "InvertingGradients", "Part", "WellInformedIG", "DropoutInversionAttack"]
