"""The paper's MLP: hidden layers of 512 without bias, GELU, dropout after each hidden layer."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dia.models import register_model
from dia.models.dropout import CapturableDropout


class MLP(nn.Module):
    def __init__(
        self, *, in_features: int, num_classes: int, width: int, depth: int, dropout: float, bias: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_features
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width, bias=bias), nn.GELU(), CapturableDropout(dropout)]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_model("mlp")
def build_mlp(cfg: Any, *, channels: int, image_size: int, num_classes: int) -> nn.Module:
    return MLP(
        in_features=channels * image_size * image_size,
        num_classes=num_classes,
        width=cfg.width,
        depth=cfg.depth,
        dropout=cfg.dropout,
        bias=cfg.bias,
    )
