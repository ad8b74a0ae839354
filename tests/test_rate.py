"""DIA when the attacker does not know the client's dropout rate: an assumed rate, or a learned one.

Tiny MLP (width 64), 2 MNIST victims, eager, CPU: a few seconds per attack.
"""

from __future__ import annotations

import pytest
import torch
from helpers import attack_alone as attack

from dia.errors import UserError

BUDGET = ["attack=dia", "model.width=64", "logger.wandb.mode=disabled", "run.progress=false"]


def _run(problems_factory, args: list[str], victims=(0, 1)):
    cfg, model, problems, v, mean, std = problems_factory(BUDGET + args, list(victims))
    return attack(
        model, problems, cfg, lower=(0 - mean) / std, upper=(1 - mean) / std, device=torch.device("cpu"), progress=False
    )


def test_null_assumed_rate_is_the_models_rate_bit_for_bit(problems_factory):
    base = ["model.dropout=0.25", "attack.max_iterations=40"]
    null = _run(problems_factory, base)
    same = _run(problems_factory, base + ["attack.assumed_rate=0.25"])
    other = _run(problems_factory, base + ["attack.assumed_rate=0.5"])
    assert torch.equal(null.x, same.x) and all(torch.equal(null.masks[k], same.masks[k]) for k in null.masks)
    assert null.rates is None  # nothing learned: no mask_rate
    assert not torch.equal(null.x, other.x)  # the assumed rate is used (init, scale, penalty target)


def test_learned_rate_moves_from_a_wrong_start_toward_the_clients(problems_factory):
    res = _run(
        problems_factory,
        ["model.dropout=0.5", "attack.assumed_rate=0.1", "attack.rate=learn", "attack.max_iterations=300"],
    )
    learned = torch.stack(list(res.rates.values()))  # (sites, problems)
    assert learned.shape == (len(res.rates), 2)
    # Per site it is noisy (one site of one victim went down); per victim, over its sites, it moved up by
    # more than a third of the way and ended nearer the true 0.5 than the start (0.4 away).
    per_victim = learned.mean(0)
    assert (per_victim > 0.1 + 0.4 / 3).all() and ((per_victim - 0.5).abs() < 0.4).all(), learned


def test_learned_rate_reaches_metrics(problems_factory):
    from dia.scores import score

    cfg, model, problems, v, mean, std = problems_factory(
        BUDGET + ["model.dropout=0.5", "attack.assumed_rate=0.2", "attack.rate=learn", "attack.max_iterations=20"],
        [0, 1],
    )
    res = attack(
        model, problems, cfg, lower=(0 - mean) / std, upper=(1 - mean) / std, device=torch.device("cpu"), progress=False
    )
    rows, _ = score(res, problems, v.images, mean, std, skip=("lpips",))
    expect = torch.stack(list(res.rates.values())).mean(0)
    assert [r["mask_rate"] for r in rows] == pytest.approx(expect.tolist())


@pytest.mark.parametrize(
    "args, key",
    [
        (["attack.assumed_rate=1.0"], "attack.assumed_rate"),
        (["attack.assumed_rate=-0.1"], "attack.assumed_rate"),
        (["attack.rate=guess"], "attack.rate"),
        (["attack.rate=learn", "attack.assumed_rate=0"], "attack.assumed_rate"),
    ],
)
def test_bad_rate_settings_are_one_line_errors(problems_factory, args, key):
    with pytest.raises(UserError, match=key) as err:
        problems_factory(BUDGET + args, [0])
    assert "\n" not in str(err.value)


def test_known_and_learned_rates_share_a_program_and_each_row_follows_its_own(problems_factory):
    from dia.attacks import ATTACKS, Part, Program
    from dia.engine import AttackState

    base = BUDGET + ["model.dropout=0.5", "attack.max_iterations=30"]
    cfg, model, problems, _, mean, std = problems_factory(base, [0, 1])
    learn_cfg = problems_factory(base + ["attack.rate=learn", "attack.assumed_rate=0.2"], [0, 1])[0]
    dia = ATTACKS.get("dia")
    known, learning = Part(dia(cfg=cfg.attack), problems.public()), Part(dia(cfg=learn_cfg.attack), problems.public())
    box = dict(lower=(0 - mean) / std, upper=(1 - mean) / std)

    def run(parts):
        module = Program(model, parts, **box)
        module.on_fit_start()
        for _ in range(30):
            module.step()
        return module

    alone = run([known]).results()[0]
    together = run([known, learning])
    assert not Program(model, [known], **box).fits(learning)  # no rate columns to learn in
    mine, theirs = together.results()
    torch.testing.assert_close(mine.x, alone.x, rtol=1e-4, atol=1e-5)  # a known-rate row ignores the rate columns
    assert mine.rates is None and set(theirs.rates) == set(theirs.masks)
    assert isinstance(together.state, AttackState) and not torch.equal(mine.x, theirs.x)
