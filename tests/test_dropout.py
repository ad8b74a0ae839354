"""Capturable dropout: the client's masks, replayed, reproduce the client's gradient exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import replay_gap

from dia.config import group_settings
from dia.gradients import client_gradients, problem_gradients
from dia.models import build_model, dropout_control, dropout_sites


def model_settings(name: str, **settings):
    return group_settings("model", name, **settings)


MODELS = {
    "mlp": (model_settings("mlp", dropout=0.3), 1, 28),
    "vit": (model_settings("vit", dropout=0.3, dim=32, heads=4, depth=2, mlp_dim=32), 3, 32),
}


def _model(name: str):
    cfg, c, s = MODELS[name]
    return build_model(cfg, channels=c, image_size=s, num_classes=10, seed=0), c, s


@pytest.mark.parametrize("name", sorted(MODELS))
def test_replayed_masks_reproduce_client_gradient_and_withheld_masks_do_not(name):
    model, c, s = _model(name)
    x, y = torch.randn(2, c, s, s), torch.tensor([3, 7])
    masks, gap = replay_gap(model, x, y)
    assert set(masks) == set(dropout_sites(model, active_only=True))
    assert gap > 1e-3, "with p>0, the gradient without the client's masks must differ"


def test_sites_behave_like_nn_dropout_outside_control():
    model, _, _ = _model("mlp")
    site = next(iter(dropout_sites(model).values()))
    x = torch.ones(20000)
    site.train()
    out = site(x)
    assert abs((out == 0).float().mean().item() - 0.3) < 0.02
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))
    site.eval()
    assert torch.equal(site(x), x)


def test_record_mode_draws_bernoulli_keep_rate_and_off_mode_drops_nothing():
    model, _, _ = _model("mlp")
    x = torch.randn(64, 1, 28, 28)
    with dropout_control(model, "record", generator=torch.Generator().manual_seed(0)) as ctl:
        model(x)
    keep = torch.cat([m.flatten() for m in ctl.masks.values()]).mean().item()
    assert abs(keep - 0.7) < 0.01
    model.train()
    with dropout_control(model, "off"):
        a = model(x)
    model.eval()
    assert torch.allclose(a, model(x))


def test_functional_gradient_matches_autograd_for_several_problems():
    model, c, s = _model("vit")
    xs, ys = torch.randn(3, 1, c, s, s), torch.randint(0, 10, (3, 1))
    outs = [client_gradients(model, xs[k], ys[k], generator=torch.Generator().manual_seed(k)) for k in range(3)]
    masks = {n: torch.stack([o[1][n] for o in outs]) for n in outs[0][1]}
    params = {n: p.detach() for n, p in model.named_parameters()}
    got = problem_gradients(model, params, xs, ys, masks, "replay")
    for k in range(3):
        for n, g in outs[k][0].items():
            torch.testing.assert_close(got[n][k], g, rtol=1e-5, atol=1e-6)


def test_models_that_cannot_vmap_fall_back_to_the_sequential_path_with_a_notice():
    class DataDependent(torch.nn.Module):  # .item() inside forward: vmap cannot batch it
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x) * (1.0 if x.sum().item() > -1e9 else 0.0)

    model = DataDependent()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, y = torch.randn(2, 1, 4), torch.tensor([[0], [2]])
    with pytest.warns(UserWarning, match="one after another"):
        got = problem_gradients(model, params, x, y, None, "off")
    for k in range(2):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[k]), y[k]).backward()
        torch.testing.assert_close(got["lin.weight"][k], model.lin.weight.grad)
