"""Well-informed IG: IG given the client's true dropout masks, an upper bound for any mask-agnostic attack."""

from __future__ import annotations

from dia.attacks.ig import InvertingGradients
from dia.attacks.registry import register
from dia.problems import Problems


@register("wiig")
class WellInformedIG(InvertingGradients):
    """IG whose model applies the client's recorded masks (an oracle no real server has)."""

    needs_client_masks = True

    def site_role(self, problems: Problems, site: str) -> str | None:
        if problems.kinds.get(site) == "drop_path" and not self.cfg.model_drop_path:
            return None  # not given: the attacker's copy keeps every residual branch
        return "client"
