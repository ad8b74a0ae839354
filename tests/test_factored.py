"""Factored per-problem gradients (attack.eager=factored): one batched pass gives every problem's gradient, linear
layers' weight gradients as their factors; exact where the model allows it, the loop where it does not."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from dia.attacks import ATTACKS
from dia.gradients import FactorPlan, NotFactorable, each_problem_gradient, factored_problem_gradients
from dia.losses import cosine_distance
from dia.lowrank import LowRank
from dia.models.capture import make_capturable


@pytest.mark.parametrize("rows", [1, 3])
def test_a_low_rank_gradient_gives_the_inner_product_and_norm_of_its_matrix(rows):
    g = torch.Generator().manual_seed(rows)
    left, right, target = (
        torch.randn(s, generator=g, dtype=torch.float64) for s in [(4, rows, 5), (4, rows, 7), (4, 5, 7)]
    )
    low = LowRank(left, right)
    dense = torch.einsum("kro,kri->koi", left, right)
    assert low.shape == dense.shape
    torch.testing.assert_close(low.dense(), dense)
    torch.testing.assert_close(low.inner(target), (dense * target).sum((1, 2)))
    torch.testing.assert_close(low.sq_norm(), dense.pow(2).sum((1, 2)))
    torch.testing.assert_close(cosine_distance({"w": low}, {"w": target}), cosine_distance({"w": dense}, {"w": target}))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 10),
    )


def test_one_batched_pass_gives_each_problems_gradient_and_its_derivatives():
    """K = 3 problems of B = 2 images under trained masks: the factored gradients (dense and as factors) equal each
    problem's own, and so do the derivatives of the cosine distance w.r.t. the images and the masks."""
    torch.manual_seed(0)
    model = make_capturable(_cnn(), torch.zeros(1, 3, 8, 8)).eval()
    k, b = 3, 2
    x = torch.randn(k, b, 3, 8, 8, requires_grad=True)
    y = torch.randint(0, 10, (k, b))
    masks = {
        "2": torch.rand(k, b, 4, 8, 8).requires_grad_(True),
        "8": torch.rand(k, b, 32).requires_grad_(True),
    }
    targets = {n: torch.randn(k, *p.shape) for n, p in model.named_parameters()}
    plan = FactorPlan.of(model)
    factored = factored_problem_gradients(model, plan, x, y, masks, "apply")
    assert isinstance(factored["6.weight"], LowRank) and isinstance(factored["9.weight"], LowRank)  # rank 2 < 10
    model.requires_grad_(True)
    loop = list(each_problem_gradient(model, x, y, masks, "apply"))
    for name in targets:
        g = factored[name]
        dense = g.dense() if isinstance(g, LowRank) else g
        torch.testing.assert_close(dense, torch.cat([per[name] for per in loop]), rtol=1e-5, atol=1e-6)
    d_fact = torch.autograd.grad(cosine_distance(factored, targets).sum(), [x, *masks.values()])
    d_loop = torch.autograd.grad(
        sum(cosine_distance(g, {n: t[i : i + 1] for n, t in targets.items()}).sum() for i, g in enumerate(loop)),
        [x, *masks.values()],
    )
    for u, v in zip(d_fact, d_loop):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-7)


class _MixesRows(nn.Module):
    """A model whose output for one image depends on the others of its batch (centres the batch): the rows of a
    batched pass are not independent problems."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        return self.fc(h - h.mean(0, keepdim=True))


def test_a_plan_names_what_it_cannot_factor():
    with pytest.raises(NotFactorable, match=r"1 \(LayerNorm\) holds parameters \['bias', 'weight'\]"):
        FactorPlan.of(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    with pytest.raises(NotFactorable, match="shares its tensor"):
        FactorPlan.of(model)


def _steps(problems_factory, attack: str, *settings: str, iterations: int = 5) -> tuple[torch.Tensor, object]:
    cfg, model, problems, _, mean, std = problems_factory(
        [f"attack={attack}", "model.dropout=0.5", "model.depth=1", "model.width=64", "attack.compile=false", *settings],
        [0, 1, 2],
    )
    cls = ATTACKS.get(attack)
    module = cls(model, cls.view(problems), cfg.attack, lower=(0 - mean) / std, upper=(1 - mean) / std)
    module.on_fit_start()
    return torch.stack([module.step() for _ in range(iterations)]), module


@pytest.mark.parametrize("attack", ["dia", "wiig", "dlg"])
def test_the_factored_program_follows_the_loop(problems_factory, caplog, attack):
    """The MLP, 3 problems: DIA (masks trained), WIIG (the client's masks), DLG (its squared distance writes the
    factored gradients out): the same losses step after step, and no notice of a fallback."""
    with caplog.at_level(logging.INFO, logger="dia"):
        factored, module = _steps(problems_factory, attack, "attack.eager=factored")
    assert getattr(module, "plan", None) is not None
    assert "one problem after another" not in caplog.text
    loop, _ = _steps(problems_factory, attack, "attack.eager=loop")
    torch.testing.assert_close(factored, loop, rtol=1e-5, atol=1e-7)


def _reconstruct(model: nn.Module, eager: str) -> torch.Tensor:
    import dia

    torch.manual_seed(1)
    images, labels = torch.randn(3, 2, 1, 2, 4), torch.randint(0, 4, (3, 2))
    updates = [dia.capture_update(model, images[j], labels[j], seed=j) for j in range(3)]
    out = dia.reconstruct(
        model, updates, labels=labels, attack="ig", max_iterations=5, compile=False, eager=eager, progress=False
    )
    return out.loss


def test_a_model_that_mixes_its_batch_falls_back_to_the_loop(caplog):
    """The check at the start catches a model whose batched pass is not K independent problems: the loop runs
    (its losses, bit for bit) and the notice says why."""
    torch.manual_seed(0)
    model = _MixesRows()
    with caplog.at_level(logging.INFO, logger="dia"):
        factored = _reconstruct(model, "factored")
    assert "attack.eager=factored: one problem after another" in caplog.text
    assert "mixes a batch's rows" in caplog.text
    assert torch.equal(factored, _reconstruct(model, "loop"))
