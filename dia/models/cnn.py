"""A LeNet-style CNN: (conv 5x5 - ReLU - max-pool 2) x 2, then dense layers with dropout before and between them.

For 1- or 3-channel inputs of any size from 28 px up (the flattened size is computed from the input size).
Dropout sites: `drop0` on the flattened conv features (before the first dense layer) and `drop<i>` after
each hidden dense layer (before the next one), all `CapturableDropout`. With `model.conv_dropout=unit|channel`
one more site inside the conv stack, `features.3` (after the first conv block's pooling, before the second
conv): `unit` drops single units of the feature map as `nn.Dropout` does (mask (B, C, H, W)), `channel` whole
channels as `nn.Dropout2d` does (mask (B, C, 1, 1)); `none` (the default) has no such site.
`model.batch_norm=native` puts a BatchNorm after each convolution (train mode: batch statistics), and
`model.bn_stats=true` lets the server know each client's batch statistics (dia.models.batchnorm).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dia.errors import UserError
from dia.models import register_model
from dia.models.batchnorm import share_statistics
from dia.models.dropout import CapturableChannelDropout, CapturableDropout

MIN_SIZE = 28
CONV_DROPOUT = ("none", "unit", "channel")
BATCH_NORM = ("none", "native")


def feature_size(image_size: int, kernel: int) -> int:
    """Side of the last feature map: conv1 keeps the size (padding k//2), pool /2, conv2 (no padding) -k+1, pool /2."""
    return ((image_size // 2) - kernel + 1) // 2


class CNN(nn.Module):
    def __init__(
        self,
        *,
        channels: int,
        image_size: int,
        num_classes: int,
        conv1: int,
        conv2: int,
        kernel: int,
        hidden: list[int],
        dropout: float,
        conv_dropout: str = "none",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()

        def norm(width: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(width)] if batch_norm else []

        inside: list[nn.Module] = []  # a dropout site inside the conv stack (model.conv_dropout)
        if conv_dropout == "unit":
            inside = [CapturableDropout(dropout)]
        elif conv_dropout == "channel":
            inside = [CapturableChannelDropout(dropout, 2)]
        self.features = nn.Sequential(
            nn.Conv2d(channels, conv1, kernel, padding=kernel // 2),
            *norm(conv1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            *inside,
            nn.Conv2d(conv1, conv2, kernel),
            *norm(conv2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = feature_size(image_size, kernel)
        fan_in = conv2 * side * side
        layers: list[nn.Module] = [CapturableDropout(dropout)]
        for width in hidden:
            layers += [nn.Linear(fan_in, width), nn.ReLU(), CapturableDropout(dropout)]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("cnn")
def build_cnn(cfg: Any, *, channels: int, image_size: int, num_classes: int) -> nn.Module:
    if image_size < MIN_SIZE:
        raise UserError(
            f"model=cnn needs inputs of at least {MIN_SIZE}x{MIN_SIZE} px, the data are {image_size}x{image_size}"
        )
    if cfg.kernel < 1 or cfg.kernel % 2 == 0:
        raise UserError(f"model.kernel={cfg.kernel}: must be an odd positive integer")
    if feature_size(image_size, cfg.kernel) < 1:
        raise UserError(f"model.kernel={cfg.kernel} is too large for {image_size}x{image_size} inputs")
    if min([cfg.conv1, cfg.conv2, *cfg.hidden], default=1) < 1:
        raise UserError("model.conv1, model.conv2 and model.hidden must be positive")
    conv_dropout = getattr(cfg, "conv_dropout", "none")
    if conv_dropout not in CONV_DROPOUT:
        raise UserError(f"model.conv_dropout={conv_dropout!r}: must be one of: {', '.join(CONV_DROPOUT)}")
    batch_norm = getattr(cfg, "batch_norm", "none")
    if batch_norm not in BATCH_NORM:
        raise UserError(f"model.batch_norm={batch_norm!r}: must be one of: {', '.join(BATCH_NORM)}")
    if getattr(cfg, "bn_stats", False) and batch_norm != "native":
        raise UserError("model.bn_stats=true: the model has no BatchNorm; set model.batch_norm=native")
    model = CNN(
        channels=channels,
        image_size=image_size,
        num_classes=num_classes,
        conv1=cfg.conv1,
        conv2=cfg.conv2,
        kernel=cfg.kernel,
        hidden=list(cfg.hidden),
        dropout=cfg.dropout,
        conv_dropout=conv_dropout,
        batch_norm=batch_norm == "native",
    )
    if getattr(cfg, "bn_stats", False):
        share_statistics(model)
    return model
