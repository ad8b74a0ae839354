"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019) on this engine: the squared Euclidean gradient
distance, no image prior.

DLG matches gradients by their squared L2 distance and uses no prior on the image. The original optimizes
with L-BFGS and also recovers the labels; here the labels are given or inferred (`attack.labels`), the
optimizer is this engine's (Adam with per-problem plateau schedule and stopping; signed or not as
`attack.signed_gradients` says: configs/attack/dlg.yaml), and the attacker's model runs without dropout, as
IG's. It is the proof that an attack is one file and one YAML: it states only what differs from IG.
"""

from __future__ import annotations

from torch import Tensor

from dia.attacks.ig import InvertingGradients
from dia.attacks.registry import register
from dia.losses import squared_distance


@register("dlg")
class DeepLeakage(InvertingGradients):
    """IG with DLG's objective: sum over parameters of ||g - t||^2, nothing else."""

    def distance(self, grads: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        return squared_distance(grads, targets)

    def prior(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0])
