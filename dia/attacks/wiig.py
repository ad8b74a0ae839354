"""Well-informed IG: IG given the client's true dropout masks, an upper bound for any mask-agnostic attack."""

from __future__ import annotations

from torch import Tensor

from dia.attacks.ig import InvertingGradients
from dia.models.dropout import Mode


class WellInformedIG(InvertingGradients):
    """IG whose model applies the client's recorded masks (an oracle no real server has)."""

    mask_mode: Mode = "replay"
    needs_client_masks = True

    def masks(self, params: dict[str, Tensor]) -> dict[str, Tensor] | None:
        return self.problems.true_masks
