"""Attack quality on the paper's MLP and the embedded MNIST victims, through the Lightning Trainer.

Budgets are CPU-sized (250 iterations, 2 victims at once); the thresholds sit well inside what these
budgets reach (WIIG and IG@p=0 reach SSIM ~0.97, DIA@p=0.5 ~0.85, IG@p=0.5 ~0.25).
"""

from __future__ import annotations

import pytest
import torch
from helpers import attack_alone as attack

from dia import metrics as M
from dia.attacks import ATTACKS

BUDGET = ["attack.max_iterations=250", "logger.wandb.mode=disabled", "run.progress=false"]


def _ssim(problems_factory, args: list[str], victims=(0, 1)):
    cfg, model, problems, v, mean, std = problems_factory(BUDGET + args, list(victims))
    res = attack(
        model, problems, cfg, lower=(0 - mean) / std, upper=(1 - mean) / std, device=torch.device("cpu"), progress=False
    )
    rec = (res.x.flatten(0, 1) * std + mean).clamp(0, 1)
    return M.ssim(rec, v.images), res


def test_wiig_reconstructs_the_mlp_input_almost_exactly(problems_factory):
    ssim, res = _ssim(problems_factory, ["attack=wiig", "model.dropout=0.25"])
    assert ssim.min() > 0.95, ssim
    assert res.masks is None  # the oracle's masks are not "recovered"


def test_ig_without_dropout_succeeds(problems_factory):
    ssim, _ = _ssim(problems_factory, ["attack=ig", "model.dropout=0"])
    assert ssim.min() > 0.95, ssim


def test_dia_beats_ig_by_a_wide_margin_under_dropout(problems_factory):
    ig, _ = _ssim(problems_factory, ["attack=ig", "model.dropout=0.5"])
    dia, res = _ssim(problems_factory, ["attack=dia", "model.dropout=0.5"])
    assert ig.max() < 0.5, ig
    assert dia.min() > 0.75, dia
    assert dia.mean() - ig.mean() > 0.4
    assert res.masks is not None and all(((m >= 0) & (m <= 1)).all() for m in res.masks.values())


def test_dlg_recovers_without_dropout_and_fails_under_it(problems_factory):
    clear, _ = _ssim(problems_factory, ["attack=dlg", "model.dropout=0"])
    dropped, _ = _ssim(problems_factory, ["attack=dlg", "model.dropout=0.5"])
    assert clear.min() > 0.9 and dropped.max() < 0.5, (clear, dropped)


def test_dia_without_dropout_is_ig(problems_factory):
    ig, ig_res = _ssim(problems_factory, ["attack=ig", "model.dropout=0", "attack.max_iterations=20"])
    dia, dia_res = _ssim(problems_factory, ["attack=dia", "model.dropout=0", "attack.max_iterations=20"])
    torch.testing.assert_close(dia_res.x, ig_res.x)


@pytest.mark.parametrize("name", ["ig", "dia"])
def test_mask_agnostic_attacks_refuse_the_client_masks(problems_factory, name):
    cfg, model, problems, _, mean, std = problems_factory(["model.dropout=0.5", f"attack={name}"], [0])
    with pytest.raises(ValueError, match="must not see"):
        ATTACKS.get(name)(model, problems, cfg.attack, lower=mean, upper=std)


def test_sigmoid_masks_stay_in_unit_interval_and_reconstruct(problems_factory):
    ssim, res = _ssim(
        problems_factory,
        ["attack=dia", "model.dropout=0.5", "attack.mask_param=sigmoid", "attack.max_iterations=150"],
        victims=(0,),
    )
    assert ssim.min() > 0.6, ssim
    assert all(((m > 0) & (m < 1)).all() for m in res.masks.values())


@pytest.mark.parametrize("args", [["model=mlp"], ["model=vit", "data=cifar10", "model.dim=64", "model.heads=4"]])
def test_labels_inferred_from_the_gradient_match_the_truth(problems_factory, args):
    from dia.problems import infer_labels

    cfg, _, problems, v, _, _ = problems_factory(args + ["model.dropout=0.25"], list(range(12)))
    torch.testing.assert_close(infer_labels(problems.targets, cfg.data.num_classes), v.labels)


def test_batches_are_matched_to_their_originals_before_scoring():
    from dia.metrics import match

    originals = torch.rand(3, 1, 28, 28)
    shuffled = originals[torch.tensor([2, 0, 1])] + 0.01 * torch.randn(3, 1, 28, 28)
    perm = match(shuffled.clamp(0, 1), originals)
    assert perm.tolist() == [1, 2, 0]
    torch.testing.assert_close(shuffled[perm], originals, atol=0.05, rtol=0)


def test_dia_models_drop_path_only_when_asked(problems_factory):
    args = [
        "attack=dia",
        "model=timm",
        "model.arch=vit_tiny_patch16_224",
        "data=cifar10",
        "model.dropout=0.2",
        "model.drop_path=0.3",
    ]
    for flag, expect in (("false", False), ("true", True)):
        cfg, model, problems, _, mean, std = problems_factory(args + [f"attack.model_drop_path={flag}"], [0])
        module = ATTACKS.get("dia")(
            model, problems.public(), cfg.attack, lower=(0 - mean) / std, upper=(1 - mean) / std
        )
        module.on_fit_start()
        modelled = {k.removeprefix("mask/") for k in module.state.params if k.startswith("mask/")}
        paths = {s for s, kind in problems.kinds.items() if kind == "drop_path"}
        assert paths and (paths <= modelled) == expect and (not paths & modelled) == (not expect)
        assert torch.isfinite(module.step()).all()
