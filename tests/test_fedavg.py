"""FedAvg through dropout: clients that take T local SGD steps, each with fresh masks, and attacks that unroll them.

The client really trains (its own model copy, T optimizer steps, the model's own dropout recording its masks);
the attacker's model of its update (dia.gradients.problem_gradients with a LocalTraining) must reproduce it
exactly when given the T recorded mask sets, and T = 1 must be today's FedSGD bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import attack_alone as attack

from dia.api import simulate
from dia.clients import simulate_clients
from dia.defenses import privacy, split_defense
from dia.gradients import problem_gradients
from dia.losses import cosine_distance
from dia.metrics import ssim
from dia.problems import LocalTraining
from dia.train import main

TINY_VIT = [
    "model=vit",
    "data=cifar10",
    "model.dim=16",
    "model.depth=1",
    "model.heads=2",
    "model.mlp_dim=16",
    "model.patch_size=8",
]
TINY_MLP = ["model.width=64", "model.depth=1"]


def replay(sim, masks):
    """The attacker's model of every client's update at the true images, applying `masks` (None: no dropout)."""
    p = sim.problems
    x = ((sim.victims.images - sim.mean) / sim.std).view(p.num_problems, p.input_shape[0], *p.input_shape[1:])
    params = {n: w.detach() for n, w in sim.model.named_parameters()}
    applied = None if masks is None else {n: m / (1 - p.rates[n]) for n, m in masks.items()}
    return problem_gradients(sim.model, params, x, p.labels, applied, "apply" if applied else "off", p.local)


@pytest.mark.parametrize(
    "args",
    [
        [*TINY_MLP, "client.local_steps=2"],
        [*TINY_MLP, "client.local_steps=5", "batch_size=2", "client.local_batch=1"],
        ["client.local_steps=3", "batch_size=2"],  # the paper's MLP, the whole batch every step
        [*TINY_VIT, "client.local_steps=3", "model.dropout=0.5"],  # every ViT site: embeddings, attention, MLP
    ],
)
def test_replaying_the_recorded_masks_reproduces_the_clients_update(args):
    sim = simulate(*args, "num_victims=4", "client.local_lr=0.05")
    p, lr = sim.problems, sim.problems.local.lr
    assert p.local.steps > 1 and all(
        m.shape[1] == p.local.steps * p.local.per_step(p.input_shape[0]) for m in p.true_masks.values()
    )
    start = {n: w.detach() for n, w in sim.model.named_parameters()}
    exact, blind = replay(sim, p.true_masks), replay(sim, None)
    for n, w in start.items():  # the client's w_T, rebuilt from the replay: w_0 - lr * sum_t g_t
        sent_w_t = w - lr * p.targets[n]
        assert torch.allclose(w - lr * exact[n], sent_w_t, rtol=0, atol=2e-7 * max(1.0, float(w.abs().max()))), n
    assert float(cosine_distance(exact, p.targets).abs().max()) < 1e-5
    assert float(cosine_distance(blind, p.targets).min()) > 1e-2  # without the masks it does not fit: they matter


def test_one_local_step_is_fedsgd_bit_for_bit():
    base = simulate(
        *TINY_MLP,
        "num_victims=2",
        "model.dropout=0.5",
        "attack=dia",
        "attack.max_iterations=20",
        "attack.compile=false",
    )
    one = simulate(
        *TINY_MLP,
        "num_victims=2",
        "model.dropout=0.5",
        "attack=dia",
        "attack.max_iterations=20",
        "attack.compile=false",
        "client.local_steps=1",
        "client.local_lr=0.7",
        "client.local_batch=1",
    )
    assert one.problems.local is None  # one full-batch step is FedSGD, whatever the learning rate
    assert all(torch.equal(base.problems.targets[n], one.problems.targets[n]) for n in base.problems.targets)
    assert all(torch.equal(base.problems.true_masks[n], one.problems.true_masks[n]) for n in base.problems.rates)
    a = attack(base.model, base.problems, base.cfg, device=torch.device("cpu"), lower=base.lower, upper=base.upper)
    b = attack(one.model, one.problems, one.cfg, device=torch.device("cpu"), lower=one.lower, upper=one.upper)
    assert (
        torch.equal(a.x, b.x)
        and torch.equal(a.masks["net.3"], b.masks["net.3"])
        and torch.equal(a.best_loss, b.best_loss)
    )
    # and the FedAvg path itself, forced at T = 1, is the gradient: the client's update and the attacker's unroll
    x = (base.victims.images - base.mean) / base.std
    forced = simulate_clients(
        base.model, x, base.victims.labels, batch_size=1, seed=base.cfg.run.seed, local=LocalTraining(1, 0.7)
    )
    assert all(torch.equal(forced.true_masks[n], base.problems.true_masks[n]) for n in base.problems.rates)
    for n, t in base.problems.targets.items():
        assert torch.allclose(forced.targets[n], t, rtol=1e-3, atol=1e-6), n
    params = {n: w.detach() for n, w in base.model.named_parameters()}
    xs, masks = x.unsqueeze(1), {n: m / 0.5 for n, m in base.problems.true_masks.items()}
    g = problem_gradients(base.model, params, xs, base.problems.labels, masks, "apply")
    u = problem_gradients(base.model, params, xs, base.problems.labels, masks, "apply", LocalTraining(1, 0.7))
    assert all(torch.equal(g[n], u[n]) for n in g)


def test_wiig_reconstructs_through_three_local_steps(tmp_path):
    """The oracle replays the client's three mask sets and recovers the images (tiny MLP, p = 0.25)."""
    assert (
        main(
            [
                *TINY_MLP,
                "attack=wiig",
                "client.local_steps=3",
                "num_victims=2",
                "attack.max_iterations=80",
                "attack.compile=false",
                "metrics.lpips=off",
                "metrics.curves_ssim=false",
                "run.progress=false",
                "logger.wandb.mode=disabled",
                f"run.output_dir={tmp_path}",
            ]
        )
        == 0
    )
    (run,) = tmp_path.glob("wiig-mlp-mnist-p0.25-T3-*")  # T names the run folder
    m = json.loads((run / "metrics.json").read_text())
    assert m["client"]["local_steps"] == 3 and min(v["ssim"] for v in m["victims"]) > 0.9


def test_dia_beats_ig_by_a_wide_margin_at_two_local_steps():
    """p = 0.5, T = 2: IG's dropout-free model misses the update; DIA's two trained mask sets find it."""
    scores = {}
    for name in ("ig", "dia"):
        sim = simulate(
            *TINY_MLP,
            f"attack={name}",
            "model.dropout=0.5",
            "client.local_steps=2",
            "num_victims=2",
            "attack.max_iterations=100",
            "attack.compile=false",
        )
        r = attack(sim.model, sim.problems, sim.cfg, device=torch.device("cpu"), lower=sim.lower, upper=sim.upper)
        scores[name] = float(ssim((r.x.flatten(0, 1) * sim.std + sim.mean).clamp(0, 1), sim.victims.images).mean())
        if name == "dia":  # two mask sets per site, each pulled toward the keep-rate
            assert r.masks["net.3"].shape[1] == 2
    assert scores["dia"] > 0.85 and scores["dia"] - scores["ig"] > 0.3, scores


def test_defenses_act_where_they_do_in_practice():
    """DP-SGD on every local step (its accountant composes the T steps), pruning on the update sent."""
    sim = simulate(*TINY_MLP, "defense=prune", "defense.ratio=0.9", "client.local_steps=3", "num_victims=1")
    share = sum(int((t == 0).sum()) for t in sim.problems.targets.values()) / sum(
        t.numel() for t in sim.problems.targets.values()
    )
    assert abs(share - 0.9) < 0.01  # the final update is pruned, not each step's gradient (their sum would be denser)
    dp = simulate(*TINY_MLP, "defense=[prune,dpsgd]", "client.local_steps=2", "num_victims=1").cfg.defense
    per_step, final = split_defense(dp)
    assert (per_step.name, final) == ("prune+dpsgd", None)
    assert privacy(dp, 4)["epsilon"] > privacy(dp, 1)["epsilon"]


@pytest.mark.parametrize(
    "args, key",
    [
        (["client.local_steps=0"], "client.local_steps"),
        (["client.local_lr=0"], "client.local_lr"),
        (["client.local_lr=-0.1"], "client.local_lr"),
        (["client.local_lr=nan"], "client.local_lr"),
        (["client.local_lr=inf"], "client.local_lr"),
        (["client.local_batch=3", "batch_size=2", "num_victims=4"], "client.local_batch"),
        (["client.local_steps=1000000"], "client.local_steps"),  # more than any machine's memory holds
    ],
)
def test_bad_local_training_is_one_line_and_writes_nothing(args, key, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main([*args, "logger.wandb.mode=disabled", f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {key}") and not out.exists()


def test_the_api_takes_a_multi_step_update(tmp_path):
    """capture_update plays a FedAvg client (its own nn.Module); the update keeps its T, learning rate and split
    through a file, and dia.reconstruct unrolls them: WIIG given the T mask sets fits the update exactly."""
    from torch import nn

    import dia

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.25), nn.Linear(32, 3))
    images, labels = torch.rand(2, 1, 4, 4), torch.tensor([0, 2])
    u = dia.capture_update(model, images, labels, lr=0.05, local_steps=4, local_batch=1, seed=0)
    assert u.masks["3"].shape == (4, 32)  # four steps of one image each
    back = dia.ClientUpdate.load(u.save(tmp_path / "u.pt"))
    assert (back.steps, back.lr, back.local_batch) == (4, 0.05, 1)
    r = dia.reconstruct(
        model, back, labels=labels, input_shape=(1, 4, 4), attack="wiig", masks=back, max_iterations=3, compile=False
    )
    assert r.problems.local == LocalTraining(4, 0.05, 1)
    with pytest.raises(dia.UserError, match="^local_batch=3"):
        dia.capture_update(model, images, labels, lr=0.05, local_steps=2, local_batch=3)
    with pytest.raises(dia.UserError, match="^lr=None"):
        dia.reconstruct(model, u.gradient, labels=labels, input_shape=(1, 4, 4), local_steps=2)


def test_a_resumed_multi_step_attack_continues_bit_for_bit():
    """The attack state (dummies and DIA's T mask sets) saved mid-way and loaded into a fresh module continues
    exactly as an unbroken attack (what a run's checkpoint does)."""
    from dia.attacks import ATTACKS
    from dia.engine import AttackState

    sim = simulate(
        *TINY_MLP, "attack=dia", "model.dropout=0.5", "client.local_steps=3", "num_victims=2", "attack.compile=false"
    )
    cls = ATTACKS.get("dia")

    def module():
        return cls(sim.model, cls.view(sim.problems), sim.cfg.attack)

    straight = module()
    straight.on_fit_start()
    for _ in range(6):
        straight.step()
    first = module()
    first.on_fit_start()
    for _ in range(3):
        first.step()
    saved = {k: v.clone() for k, v in first.state.as_dict().items()}
    second = module()
    second.resume = saved
    second.on_fit_start()
    for _ in range(3):
        second.step()
    assert torch.equal(second.state.flat, straight.state.flat) and isinstance(second.state, AttackState)
