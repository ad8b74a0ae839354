"""torch.compile of the gradient program: same losses as eager, and a clean fallback when it fails."""

from __future__ import annotations

import pytest
import torch

from dia.attacks import ATTACKS

SMALL = ["attack=dia", "model.dropout=0.5", "model.depth=1", "model.width=64"]


def _losses(problems_factory, compile_setting: str, iterations: int = 5) -> torch.Tensor:
    cfg, model, problems, _, mean, std = problems_factory(SMALL + [f"attack.compile={compile_setting}"], [0, 1])
    module = ATTACKS.get("dia")(model, problems.public(), cfg.attack, lower=(0 - mean) / std, upper=(1 - mean) / std)
    module.on_fit_start()
    return torch.stack([module.step() for _ in range(iterations)])


def test_compiled_gradient_program_follows_the_eager_one(problems_factory):
    eager = _losses(problems_factory, "false")
    compiled = _losses(problems_factory, "true")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_failed_compilation_falls_back_to_eager_with_one_notice(problems_factory, monkeypatch):
    def broken_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler found")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler.*running eagerly"):
        fallback = _losses(problems_factory, "auto")
    torch.testing.assert_close(fallback, _losses(problems_factory, "false"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        _losses(problems_factory, "true")  # compile=true is strict
