"""Stochastic depth (DropPath) on the paper's small ViT: sites, and the attacks with and without modelling it.

A 2-block ViT at CIFAR-10 size (32 px), 1 victim, eager, CPU: seconds.
"""

from __future__ import annotations

import pytest
import torch

from dia.attacks import Program, part
from dia.gradients import problem_gradients
from dia.models import dropout_sites

SMALL = [
    "model=vit",
    "data=cifar10",
    "model.depth=2",
    "model.dim=64",
    "model.heads=4",
    "model.mlp_dim=64",
    "model.dropout=0.1",
    "model.drop_path=0.5",
    "logger.wandb.mode=disabled",
    "run.progress=false",
]


def _module(problems_factory, attack: str, flag: str):
    cfg, model, problems, _, mean, std = problems_factory(
        SMALL + [f"attack={attack}", f"attack.model_drop_path={flag}"], [0]
    )
    module = Program(model, [part(cfg.attack, problems)], lower=(0 - mean) / std, upper=(1 - mean) / std)
    module.on_fit_start()
    return module, problems


def test_the_paper_vit_gets_drop_path_sites_on_a_linear_schedule_and_keeps_its_weights(problems_factory):
    _, plain, *_ = problems_factory(["model=vit", "data=cifar10", "run.seed=43"], [0])
    _, deep, *_ = problems_factory(["model=vit", "data=cifar10", "run.seed=43", "model.drop_path=0.3"], [0])
    paths = {s: m.p for s, m in dropout_sites(deep).items() if m.kind == "drop_path"}
    assert paths == {f"drop_paths.{i}.{j}": pytest.approx(0.3 * i / 3) for i in range(4) for j in range(2)}
    assert not any(m.kind == "drop_path" for m in dropout_sites(plain).values())
    a, b = plain.state_dict(), deep.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # run.seed=43: the authors' weights


@pytest.mark.parametrize("flag", ["true", "false"])
def test_wiig_replaying_the_true_drop_path_masks_reproduces_the_clients_gradient(problems_factory, flag):
    module, problems = _module(problems_factory, "wiig", flag)
    rows = module.rows
    paths = {s for s, k in problems.kinds.items() if k == "drop_path"}
    assert paths and (paths <= set(rows.sites)) == (flag == "true")
    truth = problems.true_masks
    grads = problem_gradients(
        module.model, module.model_params, _images(problems_factory), rows.labels, rows.applied(rows.masks({})), "apply"
    )
    close = all(torch.allclose(grads[n], t, rtol=1e-4, atol=1e-6) for n, t in rows.targets.items())
    dropped_any = any(bool((truth[s] == 0).any()) for s in paths)
    assert dropped_any  # p = 0.5 on the last block: this client dropped a residual branch
    assert close == (flag == "true")


def _images(problems_factory):
    """The victim's true image (normalized, (K=1, B=1, C, H, W)): the problems never hold it."""
    _, _, problems, victims, mean, std = problems_factory(SMALL + ["attack=wiig"], [0])
    return ((victims.images - mean) / std).unsqueeze(0)


@pytest.mark.parametrize("attack", ["ig", "wiig", "dia"])
@pytest.mark.parametrize("flag", ["true", "false"])
def test_every_attack_runs_with_and_without_modelling_drop_path(problems_factory, attack, flag):
    module, problems = _module(problems_factory, attack, flag)
    paths = {s for s, k in problems.kinds.items() if k == "drop_path"}
    trained = {k.removeprefix("mask/") for k in module.state.params if k.startswith("mask/")}
    if attack == "dia":
        assert (paths <= trained) == (flag == "true") and bool(trained - paths)
    else:
        assert not trained
    for _ in range(3):
        assert torch.isfinite(module.step()).all()
