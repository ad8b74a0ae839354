"""The vectorized engine: torch's Adam/plateau arithmetic, K-at-once == one-by-one, isolation, resume."""

from __future__ import annotations

import math
import warnings

import torch

from dia.attacks import ATTACKS, Program, part
from dia.engine import AttackState, Schedule, advance


def _drive(module, iterations: int) -> list[torch.Tensor]:
    """Run a module's engine in a plain loop (no Trainer); returns the losses of each iteration."""
    module.on_fit_start()
    return [module.step() for _ in range(iterations)]


def _module(cfg, model, problems, mean, std):
    return Program(model, [part(cfg.attack, problems)], lower=(0 - mean) / std, upper=(1 - mean) / std)


def test_advance_follows_torch_adam_and_reduce_lr_on_plateau():
    # Unsigned gradients on f(w) = sum(w^2); with patience 2 the lr drops several times once Adam oscillates.
    sched = Schedule(
        lr=0.3, signed=frozenset(), lr_patience=2, lr_factor=0.5, early_stop_patience=10**6, max_iterations=10**6
    )
    w0 = torch.tensor([[1.5, -2.0, 0.5]])
    state = AttackState.create({"w": w0}, lr=sched.lr)
    ref = w0[0].clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=sched.lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    for _ in range(60):
        losses = state.params["w"].pow(2).sum(-1)
        (g,) = torch.autograd.grad(losses.sum(), [state.flat])
        advance(state, losses.detach(), g, sched, lambda p: None)
        opt.zero_grad()
        ref_loss = ref.pow(2).sum()
        ref_loss.backward()
        opt.step()
        plateau.step(ref_loss.item())
        torch.testing.assert_close(state.params["w"][0], ref.detach(), rtol=1e-4, atol=1e-5)
        assert math.isclose(state.lr.item(), opt.param_groups[0]["lr"], rel_tol=1e-6)
    assert state.lr.item() < sched.lr / 4, "the plateau schedule must have fired"


def test_k_problems_at_once_equal_one_by_one(problems_factory):
    cfg, model, problems, _, mean, std = problems_factory(["attack=dia", "model.dropout=0.5"], [0, 1, 2])
    together = _drive(_module(cfg, model, problems, mean, std), 8)
    for k in range(3):
        alone = _drive(_module(cfg, model, problems.subset([k]), mean, std), 8)
        torch.testing.assert_close(
            torch.stack([step[k] for step in together]), torch.stack([step[0] for step in alone]), rtol=1e-5, atol=1e-7
        )


def test_a_diverging_problem_stops_alone_and_keeps_its_best_iterate(problems_factory):
    cfg, model, problems, _, mean, std = problems_factory(["attack=ig", "model.dropout=0.5"], [0, 1])
    broken = problems.subset([0, 1])
    for t in broken.targets.values():
        t[1] = float("nan")
    module = _module(cfg, model, broken, mean, std)
    losses = _drive(module, 6)
    clean = _drive(_module(cfg, model, problems.subset([0]), mean, std), 6)
    assert module.result().status[1] == "diverged" and module.result().status[0] == "running"
    assert int(module.state.iterations[1]) == 1
    assert torch.isfinite(module.state.best_params["x"][1]).all()
    torch.testing.assert_close(torch.stack([step[0] for step in losses]), torch.stack([step[0] for step in clean]))


def test_converged_and_early_stopped_problems_are_frozen(problems_factory):
    cfg, model, problems, _, mean, std = problems_factory(
        ["attack=wiig", "model.dropout=0.25", "attack.early_stop_patience=3"], [0]
    )
    module = _module(cfg, model, problems, mean, std)
    module.schedule = Schedule(lr=0.1, loss_threshold=2.0, max_iterations=100)  # every loss < 2: converges at once
    _drive(module, 4)
    assert module.result().status == ["converged"] and int(module.state.iterations[0]) == 1


def test_state_round_trip_resumes_bit_for_bit(problems_factory):
    cfg, model, problems, _, mean, std = problems_factory(["attack=dia", "model.dropout=0.5"], [0, 1])
    straight = _drive(_module(cfg, model, problems, mean, std), 10)
    first = _module(cfg, model, problems, mean, std)
    _drive(first, 6)
    saved = first.state.as_dict()
    torch.save(saved, "/dev/null")  # tensors only: safe to save
    second = _module(cfg, model, problems, mean, std)
    second.resume = saved
    resumed = _drive(second, 4)
    torch.testing.assert_close(torch.stack(resumed), torch.stack(straight[6:]))


def test_batchnorm_models_vectorize_with_the_clients_batch_statistics(problems_factory):
    """The attacker's copy of a BatchNorm model uses batch statistics like the client in train mode, under vmap."""
    from dia.gradients import client_gradients, problem_gradients
    from dia.problems import Problems

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 26 * 26, 10),
    )
    x, y = torch.randn(2, 2, 1, 28, 28), torch.tensor([[1, 2], [3, 4]])
    targets = [client_gradients(model, x[k], y[k])[0] for k in range(2)]
    problems = Problems(
        targets={n: torch.stack([t[n] for t in targets]) for n in targets[0]},
        labels=y,
        input_shape=(2, 1, 28, 28),
        mask_shapes={},
        rates={},
        kinds={},
        seeds=[0, 1],
    )
    cfg, *_ = problems_factory(["attack=ig"], [0])
    module = ATTACKS.get("ig")(model, problems, cfg.attack, lower=torch.tensor(-1.0), upper=torch.tensor(1.0))
    module.on_fit_start()
    params = {n: p.detach() for n, p in module.model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the sequential path
        got = problem_gradients(module.model, params, x, y, None, "off")
    for k in range(2):
        for n, t in targets[k].items():
            torch.testing.assert_close(got[n][k], t, rtol=1e-4, atol=1e-6)


def test_best_iterate_is_the_one_after_the_improving_step_as_in_the_papers_code():
    """By default the best iterate is the (projected) iterate the improving step produced, as the authors' loop
    keeps it; `best_iterate="at_loss"` keeps the iterate the improving loss was measured at."""

    def run(mode: str, steps: int) -> tuple[AttackState, list[torch.Tensor]]:
        sched = Schedule(lr=0.5, signed=frozenset(), early_stop_patience=10**6, max_iterations=10**6, best_iterate=mode)
        state = AttackState.create({"w": torch.tensor([[2.0, -1.0], [0.3, 0.1]])}, lr=sched.lr)
        trail = []
        for _ in range(steps):
            before = state.flat.detach().clone()
            losses = (state.params["w"] - 0.2).pow(2).sum(-1)
            (g,) = torch.autograd.grad(losses.sum(), [state.flat])
            advance(state, losses.detach(), g, sched, lambda p: p["w"].data.clamp_(-1.5, 1.5))
            trail.append((before, state.flat.detach().clone(), losses.detach()))
        return state, trail

    for mode in ("after_step", "at_loss"):
        state, trail = run(mode, 12)
        for k in range(2):
            i = int(state.best_iteration[k])
            assert float(state.best_loss[k]) == float(trail[i][2][k])  # the best loss is the loss of iteration i
            kept = trail[i][1] if mode == "after_step" else trail[i][0]
            torch.testing.assert_close(state.best[k], kept[k], rtol=0, atol=0)
            assert not torch.equal(trail[i][0][k], trail[i][1][k])  # the two choices differ here
        assert state.best[0].abs().max() <= 1.5  # after_step keeps a projected iterate
