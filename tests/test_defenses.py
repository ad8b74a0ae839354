"""Defenses applied to what the client sends (dia.defenses): each one's math, composition, isolation, effect."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import attack_alone as attack
from omegaconf import OmegaConf

from dia import defenses as D
from dia import metrics as M
from dia.attacks import Program, part
from dia.clients import simulate_clients
from dia.config import compose, group_settings
from dia.data import load_victims, normalizer
from dia.errors import UserError
from dia.gradients import client_gradients
from dia.models import build_for

GEN = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731


def _cfg(*args: str):
    return compose(["attack.compile=false", "logger.wandb.mode=disabled", "run.progress=false", *args])


def _clients(args: list[str], victims: list[int], defense_args: list[str] | None = None, batch_size: int = 1):
    cfg = _cfg(*args, f"victims={victims}", f"batch_size={batch_size}", *(defense_args or []))
    v = load_victims(cfg.data, indices=victims, count=len(victims), seed=None)
    model = build_for(cfg)
    mean, std = normalizer(cfg.data)
    x = (v.images - mean) / std
    return cfg, model, x, v, mean, std


# ---- the math of each defense ------------------------------------------------------------------------
def test_clipping_bounds_every_examples_norm_and_leaves_small_ones_alone():
    g = torch.Generator().manual_seed(1)
    per = {"a": torch.randn(6, 30, 7, generator=g), "b": torch.randn(6, 11, generator=g)}
    per = {n: t * torch.tensor([0.01, 0.1, 1, 10, 100, 0.5]).view(-1, *[1] * (t.dim() - 1)) for n, t in per.items()}
    norm = lambda d: torch.stack([t.flatten(1).pow(2).sum(1) for t in d.values()]).sum(0).sqrt()  # noqa: E731
    clip = 2.0
    clipped = D.clip_per_example(per, clip)
    after, before = norm(clipped), norm(per)
    assert (after <= clip * (1 + 1e-5)).all(), after
    big = before > clip
    assert torch.allclose(after[big], torch.full_like(after[big], clip), rtol=1e-5)  # clipped ones land on the ball
    for n in per:  # small ones are untouched, and clipping only rescales (direction kept)
        assert torch.equal(clipped[n][~big], per[n][~big])
        assert torch.allclose(
            clipped[n][big] * (before[big] / after[big]).view(-1, *[1] * (per[n].dim() - 1)), per[n][big], rtol=1e-4
        )


def test_dpsgd_noise_has_the_stated_std_on_the_sum_and_comes_from_the_given_generator():
    b, clip, sigma = 4, 0.5, 0.3
    per = {"w": torch.zeros(b, 400, 500)}  # zero gradients: what is sent is the noise / B
    cfg = group_settings("defense", "dpsgd", clip=clip, noise_multiplier=sigma)
    sent = D.dpsgd(per, cfg, GEN(3))["w"] * b
    assert abs(sent.std().item() - sigma * clip) < 0.01 * sigma * clip
    assert abs(sent.mean().item()) < 0.01 * sigma * clip
    assert torch.equal(D.dpsgd(per, cfg, GEN(3))["w"], sent / b)  # reproducible from its generator
    assert not torch.equal(D.dpsgd(per, cfg, GEN(4))["w"], sent / b)


def test_dpsgd_uses_each_examples_own_dropout_mask():
    cfg, model, x, v, *_ = _clients(["model.dropout=0.5", "model.width=64"], [0, 1, 2])
    g, masks = client_gradients(model, x, v.labels, generator=GEN(5))
    per = D.per_example_gradients(model, x, v.labels, masks)
    for n in g:  # the per-example gradients average to exactly what the client computed (its loss is a mean)
        assert torch.allclose(per[n].mean(0), g[n], atol=1e-6), n
    swapped = {k: m.flip(0) for k, m in masks.items()}  # another example's masks give other gradients
    wrong = D.per_example_gradients(model, x, v.labels, swapped)
    assert not all(torch.allclose(wrong[n].mean(0), g[n], atol=1e-4) for n in g)
    # no noise and a clip above every norm: DP-SGD sends exactly the client's gradient
    dp = group_settings("defense", "dpsgd", clip=1e6, noise_multiplier=0.0)
    sent = D.defend(g, dp, GEN(0), lambda: per)
    assert all(torch.allclose(sent[n], g[n], atol=1e-6) for n in g)


def test_dpsgd_clips_a_real_batch():
    cfg, model, x, v, *_ = _clients(["model.dropout=0.25", "model.width=64"], [0, 1, 2, 3])
    g, masks = client_gradients(model, x, v.labels, generator=GEN(2))
    per = D.per_example_gradients(model, x, v.labels, masks)
    norms = torch.stack([t.flatten(1).pow(2).sum(1) for t in per.values()]).sum(0).sqrt()
    clip = float(norms.min()) / 2  # every example is clipped
    sent = D.defend(g, group_settings("defense", "dpsgd", clip=clip, noise_multiplier=0.0), GEN(0), lambda: per)
    expect = {n: (t / norms.view(-1, *[1] * (t.dim() - 1)) * clip).mean(0) for n, t in per.items()}
    assert all(torch.allclose(sent[n], expect[n], atol=1e-6) for n in g)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.99])
def test_pruning_keeps_exactly_the_stated_share_of_the_largest_entries(ratio):
    g = {"a": torch.randn(40, 50, generator=GEN(7)), "b": torch.randn(300, generator=GEN(8))}
    out = D.prune(g, group_settings("defense", "prune", ratio=ratio), GEN())
    for n, t in g.items():
        kept = out[n] != 0
        assert int(kept.sum()) == round((1 - ratio) * t.numel())
        assert torch.equal(out[n][kept], t[kept])  # survivors unchanged
        if ratio > 0:
            assert t[kept].abs().min() >= t[~kept].abs().max()  # and they are the largest


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantization_levels_nearest_and_stochastic(bits):
    levels = 2 ** (bits - 1) - 1
    g = {"a": torch.randn(64, 33, generator=GEN(9))}
    scale = g["a"].abs().max()
    near = D.quantize(g, group_settings("defense", "quantize", bits=bits), GEN())["a"]
    q = near / scale * levels
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= levels + 1e-4
    assert len(torch.unique(q.round())) <= 2**bits - 1
    assert (near - g["a"]).abs().max() <= scale / levels / 2 + 1e-6  # nearest level
    cfg = group_settings("defense", "quantize", bits=bits, rounding="stochastic")
    gen = GEN(10)
    draws = torch.stack([D.quantize(g, cfg, gen)["a"] for _ in range(3000)])
    v = g["a"] / scale * levels
    qs = draws / scale * levels
    assert torch.allclose(qs, qs.round(), atol=1e-4)
    assert ((qs.round() == v.floor()) | (qs.round() == v.ceil())).all()  # one of the two neighbouring levels
    assert (draws.mean(0) - g["a"]).abs().max() < 4 * (scale / levels) / 2 / 3000**0.5 + 1e-6  # unbiased


def test_sign_sends_signs_only():
    g = {"a": torch.tensor([-2.0, 0.0, 3e-9, 5.0])}
    assert torch.equal(D.sign(g, None, GEN())["a"], torch.tensor([-1.0, 0.0, 1.0, 1.0]))


# ---- composition and configuration ---------------------------------------------------------------------
def test_composition_applies_stages_in_the_listed_order():
    g = {"a": torch.randn(20, 30, generator=GEN(11))}
    quant_then_prune = _cfg("defense=[quantize,prune]", "defense.ratio=0.9", "defense.bits=3").defense
    expect = D.prune(D.quantize(g, quant_then_prune, GEN()), quant_then_prune, GEN())
    assert torch.equal(D.defend(g, quant_then_prune, GEN())["a"], expect["a"])
    prune_then_quant = _cfg("defense=prune+quantize", "defense.ratio=0.9", "defense.bits=3").defense
    assert not torch.equal(D.defend(g, prune_then_quant, GEN())["a"], expect["a"])
    # DP-SGD: stages before it act on each example, stages after it on the sent (noisy) gradient
    per = {"a": torch.randn(3, 20, 30, generator=GEN(12))}
    mean = {"a": per["a"].mean(0)}
    after = _cfg("defense=[dpsgd,prune]", "defense.ratio=0.9", "defense.noise_multiplier=0.1").defense
    sent = D.defend(mean, after, GEN(), lambda: per)["a"]
    assert int((sent != 0).sum()) == 60  # pruned after the noise: exactly 10% survive
    before = _cfg("defense=[prune,dpsgd]", "defense.ratio=0.9", "defense.noise_multiplier=0.1").defense
    assert int((D.defend(mean, before, GEN(), lambda: per)["a"] != 0).sum()) == 600  # noise after pruning: dense
    exact = _cfg("defense=[prune,dpsgd]", "defense.ratio=0.9", "defense.noise_multiplier=0", "defense.clip=1e6").defense
    per_pruned = torch.stack([D.prune({"a": per["a"][i]}, exact, GEN())["a"] for i in range(3)])
    assert torch.allclose(D.defend(mean, exact, GEN(), lambda: per)["a"], per_pruned.mean(0))


def test_config_group_list_form_and_one_line_errors(tmp_path: Path):
    assert _cfg().defense.name == "none"
    cfg = _cfg("defense=[prune,dpsgd]", "defense.ratio=0.5", "defense.clip=2")
    assert (cfg.defense.name, cfg.defense.ratio, cfg.defense.clip, cfg.defense.noise_multiplier) == (
        "prune+dpsgd",
        0.5,
        2.0,
        1.0,
    )
    saved = tmp_path / "config.yaml"
    saved.write_text(OmegaConf.to_yaml(cfg))
    assert compose([], base=saved).defense == cfg.defense  # a saved run reruns with its defense
    old = OmegaConf.to_container(cfg)
    del old["defense"]
    saved.write_text(OmegaConf.to_yaml(old))
    assert compose([], base=saved).defense.name == "none"  # configs saved before defenses existed
    for bad, words in [
        (["defense=noise"], "dpsgd, none, prune"),
        (["defense=[prune,prune]"], "twice"),
        (["defense=prune", "defense.clip=1"], "valid keys here: name, ratio"),
        (["defense=prune", "defense.ratio=1"], "defense.ratio"),
        (["defense=quantize", "defense.bits=1"], "defense.bits"),
        (["defense=quantize", "defense.rounding=up"], "nearest, stochastic"),
        (["defense=dpsgd", "defense.delta=0"], "defense.delta"),
        (["defense=[none,sign]"], "none"),
    ]:
        with pytest.raises(UserError, match=words):
            _cfg(*bad)


def test_epsilon_from_the_accountant():
    def eps(sigma: float, delta: float = 1e-5):
        return D.privacy(_cfg("defense=dpsgd", f"defense.noise_multiplier={sigma}", f"defense.delta={delta}").defense)[
            "epsilon"
        ]

    e = [eps(s) for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b > 0 for a, b in zip(e, e[1:]))  # more noise, less epsilon
    assert eps(1.0, 1e-3) < eps(1.0, 1e-6)
    # one Gaussian mechanism: RDP gives an upper bound on the exact epsilon (opacus' PRV accountant)
    from opacus.accountants import PRVAccountant

    prv = PRVAccountant()
    prv.step(noise_multiplier=1.0, sample_rate=1.0)
    with warnings.catch_warnings():  # the PRV code takes log(0) on the way for sampling rate 1
        warnings.simplefilter("ignore", RuntimeWarning)
        exact = prv.get_epsilon(delta=1e-5)
    assert exact <= eps(1.0) < 1.5 * exact
    assert D.privacy(_cfg("defense=prune").defense) is None
    assert D.privacy(_cfg("defense=dpsgd", "defense.noise_multiplier=0").defense)["epsilon"] is None


# ---- what the server sees -----------------------------------------------------------------------------
def test_defense_none_changes_nothing_bit_for_bit_and_defenses_leave_the_clients_masks_alone():
    cfg, model, x, v, *_ = _clients(["model.dropout=0.25"], [0, 1, 2, 3])
    today = simulate_clients(model, x, v.labels, batch_size=1, seed=0)
    none = simulate_clients(model, x, v.labels, batch_size=1, seed=0, defense=cfg.defense)
    assert all(torch.equal(today.targets[n], none.targets[n]) for n in today.targets)
    assert all(torch.equal(today.true_masks[n], none.true_masks[n]) for n in today.true_masks)
    dp = _cfg("defense=dpsgd", "defense.noise_multiplier=0", "defense.clip=1e6").defense
    exact = simulate_clients(model, x, v.labels, batch_size=1, seed=0, defense=dp)  # no noise, no clipping at B=1
    assert all(torch.equal(today.targets[n], exact.targets[n]) for n in today.targets)
    noisy = simulate_clients(model, x, v.labels, batch_size=1, seed=0, defense=_cfg("defense=dpsgd").defense)
    assert all(torch.equal(today.true_masks[n], noisy.true_masks[n]) for n in today.true_masks)  # same client draws
    assert today.seeds == noisy.seeds  # the attacker's initialisation does not move either
    again = simulate_clients(model, x, v.labels, batch_size=1, seed=0, defense=_cfg("defense=dpsgd").defense)
    assert all(torch.equal(again.targets[n], noisy.targets[n]) for n in noisy.targets)
    w = next(iter(noisy.targets))  # each client draws its own noise
    assert not torch.allclose(noisy.targets[w][0] - today.targets[w][0], noisy.targets[w][1] - today.targets[w][1])


def test_model_defense_matches_only_what_survived():
    cfg, model, x, v, mean, std = _clients(
        ["model.dropout=0", "attack=ig"], [0], ["defense=prune", "defense.ratio=0.9"]
    )
    problems = simulate_clients(model, x, v.labels, batch_size=1, seed=0, defense=cfg.defense)
    truth = {"x": x.unsqueeze(0)}

    def loss_at_truth(model_defense: bool) -> float:
        acfg = OmegaConf.merge(cfg.attack, {"model_defense": model_defense, "tv_weight": 0.0})
        module = Program(model, [part(acfg, problems)], lower=(0 - mean) / std, upper=(1 - mean) / std)
        module.on_fit_start()
        return float(module.objective(truth)[0])

    assert loss_at_truth(True) < 1e-5  # the truth explains every surviving entry exactly
    assert loss_at_truth(False) > 0.05  # but not the zeros, which a dense gradient cannot produce
    masked = D.surviving(problems.targets, problems.targets)
    assert all(torch.equal(masked[n], problems.targets[n]) for n in masked)


def test_a_strong_defense_stops_dia_on_a_tiny_mlp():
    cfg, model, x, v, mean, std = _clients(
        ["model.dropout=0.25", "model.width=64", "attack=dia", "attack.max_iterations=200"], [0, 1]
    )
    clear = simulate_clients(model, x, v.labels, batch_size=1, seed=0)
    noisy = simulate_clients(
        model, x, v.labels, batch_size=1, seed=0, defense=_cfg("defense=dpsgd", "defense.noise_multiplier=1").defense
    )
    both = replace(
        clear,
        targets={n: torch.cat([clear.targets[n], noisy.targets[n]]) for n in clear.targets},
        labels=torch.cat([clear.labels, noisy.labels]),
        seeds=clear.seeds * 2,
        true_masks={n: torch.cat([m, m]) for n, m in clear.true_masks.items()},
    )  # one attack run for both
    res = attack(
        model, both, cfg, lower=(0 - mean) / std, upper=(1 - mean) / std, device=torch.device("cpu"), progress=False
    )
    ssim = M.ssim((res.x.flatten(0, 1) * std + mean).clamp(0, 1), torch.cat([v.images, v.images]))
    undefended, defended = ssim[:2], ssim[2:]
    assert undefended.mean() > 0.7, undefended
    assert defended.mean() < 0.3 * undefended.mean(), (undefended, defended)
