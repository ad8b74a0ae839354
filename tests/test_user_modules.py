"""Users' modules as they write them: one nn.Dropout called after several layers, nn.Dropout2d, max pooling.

A module one forward calls k times is k sites (`drop`, `drop#1`, ...), each with its own masks of its own shape;
`nn.Dropout2d` drops whole channels (mask (B, C, 1, 1)). The client's gradient replays exactly with the recorded
masks, DIA runs on such a model, and the oracle (WIIG) matches its gradient where IG cannot.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import replay_gap
from torch import nn

import dia
from dia.gradients import client_gradients
from dia.models import describe_sites, dropout_sites
from dia.updates import capturable


class ReusedDropout(nn.Module):
    """conv - ReLU - max-pool - Dropout2d, then ONE nn.Dropout after the flattened features and after the hidden
    layer (two widths: 196 and 32), as users write it."""

    def __init__(self, p: float = 0.25) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 7 * 7, 32)
        self.head = nn.Linear(32, 10)
        self.drop = nn.Dropout(p)
        self.drop2d = nn.Dropout2d(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop2d(F.max_pool2d(F.relu(self.conv(x)), 2))
        x = self.drop(x.flatten(1))
        return self.head(self.drop(F.relu(self.fc(x))))


SHAPES = {"drop2d": [4, 1, 1], "drop": [196], "drop#1": [32]}


def _batch(b: int = 2):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 1, 14, 14, generator=g), torch.tensor([3, 7, 3, 1][:b])


def test_a_module_called_twice_is_two_sites_with_their_own_shapes_and_dropout2d_drops_channels():
    torch.manual_seed(0)
    twin = capturable(ReusedDropout(), torch.zeros(1, 1, 14, 14))
    assert set(dropout_sites(twin, active_only=True)) == set(SHAPES)
    described = {d["site"]: d["mask_shape"] for d in describe_sites(twin, torch.zeros(2, 1, 14, 14))}
    assert described == SHAPES
    x, y = _batch()
    _, masks = client_gradients(twin, x, y, generator=torch.Generator().manual_seed(1))
    assert {k: list(v.shape[1:]) for k, v in masks.items()} == SHAPES
    assert not torch.equal(masks["drop"][:, :32], masks["drop#1"])  # each call draws its own mask


def test_the_client_gradient_replays_exactly_with_the_recorded_masks_and_not_without():
    torch.manual_seed(0)
    twin = capturable(ReusedDropout(), torch.zeros(1, 1, 14, 14))
    x, y = _batch()
    _, gap = replay_gap(twin, x, y)
    assert gap > 1e-3


def test_dia_runs_and_the_oracle_matches_the_gradient_where_ig_cannot():
    torch.manual_seed(0)
    model = ReusedDropout()
    x, y = _batch(1)
    update = dia.capture_update(model, x, y, seed=3)
    common = dict(labels=y, input_shape=(1, 14, 14), compile=False, max_iterations=120, seed=0)
    d = dia.reconstruct(model, update, attack="dia", **common)
    assert {k: list(v.shape[2:]) for k, v in d.masks.items()} == SHAPES
    assert torch.isfinite(d.loss).all() and d.iterations.item() == 120
    wiig = dia.reconstruct(model, update, attack="wiig", masks=update.masks, **common)
    ig = dia.reconstruct(model, update, attack="ig", **common)
    assert wiig.loss.item() < 0.02 and ig.loss.item() > 5 * wiig.loss.item(), (wiig.loss, ig.loss)
    assert dia.evaluate(wiig, x)["mean"]["psnr"] > dia.evaluate(ig, x)["mean"]["psnr"]


@pytest.mark.parametrize("conv_dropout, shape", [("unit", [6, 14, 14]), ("channel", [6, 1, 1])])
def test_the_zoo_cnn_takes_dropout_inside_its_conv_stack(conv_dropout, shape):
    sim = dia.simulate("model=cnn", f"model.conv_dropout={conv_dropout}", "victims=[0,1]", "batch_size=2")
    assert list(sim.problems.mask_shapes["features.3"]) == [2, *shape]
    masks = sim.problems.true_masks["features.3"]
    if conv_dropout == "channel":  # whole channels: one draw per (image, channel)
        assert masks.shape[-2:] == (1, 1)
    assert 0 < masks.mean() < 1
