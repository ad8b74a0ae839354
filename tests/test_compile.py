"""torch.compile of the gradient program: same losses as eager, and a clean fallback when it fails."""

from __future__ import annotations

import warnings

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
    # auto compiles only when it pays: make it pay whatever this machine's cost book says
    monkeypatch.setattr("dia.attacks.program.pays", lambda **kw: (True, "it pays (test)"))
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler.*running eagerly"):
        fallback = _losses(problems_factory, "auto")
    torch.testing.assert_close(fallback, _losses(problems_factory, "false"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        _losses(problems_factory, "true")  # compile=true is strict


def test_a_compiled_program_sees_the_problems_that_enter_it(tmp_path):
    """Refill writes new targets, labels and masks into the compiled program's tensors in place: a compiled
    program that had captured them as constants would attack the old targets."""
    import json

    from dia.config import compose
    from dia.run import execute

    base = [
        "model=mlp",
        "model.width=64",
        "model.depth=2",
        "num_victims=2",
        "attack.max_iterations=40",
        "attack.check_every=10",
        "run.progress=false",
        "logger.wandb.mode=disabled",
        "metrics.lpips=off",
        "run.checkpoint_every=-1",
        "attack.loss_threshold=0.005",
    ]
    cells = [(a, p) for a in ("ig", "wiig", "dia") for p in (0.0, 0.5)]

    def configs(out, extra):
        return [
            compose(
                base + extra + [f"attack={a}", f"model.dropout={p}", f"run.output_dir={out}", f"run.name={a}-{p:g}"]
            )
            for a, p in cells
        ]

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a failed compilation (eager fallback) must not pass silently
        warnings.filterwarnings("ignore", message=".*(no dropout|srun|LeafSpec|eval mode|configure_optimizers).*")
        assert {
            o.code
            for o in execute(configs(tmp_path / "c", ["attack.compile=true", "attack.parallel=4"]), progress=False)
        } == {0}
    assert {o.code for o in execute(configs(tmp_path / "e", ["attack.compile=false"]), progress=False)} == {0}
    for a, p in cells:
        name = f"{a}-{p:g}"
        compiled, eager = (
            json.loads((tmp_path / k / name / "metrics.json").read_text())["victims"] for k in ("c", "e")
        )
        for u, v in zip(compiled, eager):
            assert u["iterations"] == v["iterations"] and u["status"] == v["status"], name
            assert u["loss"] == pytest.approx(v["loss"], rel=2e-3, abs=1e-6), name


def _steps(problems_factory, *settings: str, iterations: int = 5) -> torch.Tensor:
    cfg, model, problems, _, mean, std = problems_factory(SMALL + list(settings), [0, 1])
    module = ATTACKS.get("dia")(model, problems.public(), cfg.attack, lower=(0 - mean) / std, upper=(1 - mean) / std)
    module.on_fit_start()
    return torch.stack([module.step() for _ in range(iterations)])


@pytest.mark.parametrize("defense", [[], ["defense=prune", "attack.model_defense=true"]], ids=["plain", "pruned"])
def test_the_eager_loop_follows_the_vectorized_program(problems_factory, defense):
    """The loop takes each problem's distance from its own gradient (sliced targets, the surviving entries of
    its own pruned target): the same losses, per problem, as the vectorized program over all of them."""
    loop = _steps(problems_factory, "attack.compile=false", "attack.eager=loop", *defense)
    vectorized = _steps(problems_factory, "attack.compile=false", "attack.eager=vectorized", *defense)
    assert loop.shape == (5, 2)  # two problems, each its own loss
    torch.testing.assert_close(loop, vectorized, rtol=1e-5, atol=1e-7)


def test_compile_auto_gives_exactly_the_path_it_takes(problems_factory, monkeypatch, tmp_path, caplog):
    """attack.compile=auto decides before the first iteration: its result is that of compile=false or of
    compile=true, bit for bit, and after a compile the cost book knows what it cost."""
    import json
    import logging

    from dia.attacks import compiling

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    budget = "attack.max_iterations=30"
    monkeypatch.setattr("dia.attacks.program.cold_guess", lambda *a: 1e9)  # a first compile never repaid
    with caplog.at_level(logging.INFO, logger="dia"):
        assert torch.equal(
            _steps(problems_factory, "attack.compile=auto", budget),
            _steps(problems_factory, "attack.compile=false", budget),
        )
    assert "attack.compile=auto: running eagerly (30 iterations" in caplog.text
    monkeypatch.setattr("dia.attacks.program.cold_guess", lambda *a: 0.0)  # always repaid (given a speed-up)
    monkeypatch.setattr("dia.attacks.program.FACTORED_SPEEDUP", compiling.SPEEDUP)
    auto = _steps(problems_factory, "attack.compile=auto", budget, iterations=12)
    assert torch.equal(auto, _steps(problems_factory, "attack.compile=true", budget, iterations=12))
    (entry,) = json.loads((compiling.book_dir() / compiling.BOOK).read_text()).values()
    assert entry["compile_s"] > 0 and entry["t_compiled"] > 0 and entry["t_eager"] > 0


def test_a_factored_program_compiles_only_when_the_book_knows_it_is_faster_compiled():
    """The factored eager program is about as fast as the compiled one on a CPU: no guess compiles it, however long
    the run; a compile measured before (the book) decides by its speed."""
    from dia.attacks.compiling import FACTORED_SPEEDUP, pays

    assert not pays(horizon=10**6, t_eager=1.0, known={}, cold=0.0, speedup=FACTORED_SPEEDUP)[0]
    measured = {"compile_s": 3.0, "t_eager": 1.0, "t_compiled": 0.5}
    assert pays(horizon=100, t_eager=1.0, known=measured, cold=0.0, speedup=FACTORED_SPEEDUP)[0]
    assert not pays(horizon=100, t_eager=1.0, known=measured | {"t_compiled": 1.1}, cold=0.0)[0]
    # a compile=true run's entry has no eager time beside it: the compiled time is set against this run's
    compiled_only = {"compile_s": 3.0, "t_compiled": 0.5}
    assert pays(horizon=100, t_eager=1.0, known=compiled_only, cold=0.0, speedup=FACTORED_SPEEDUP)[0]
    assert not pays(horizon=100, t_eager=0.4, known=compiled_only, cold=0.0, speedup=FACTORED_SPEEDUP)[0]


class _RoutedDropoutNet(torch.nn.Module):
    """Dropout through `F.dropout` in forward (timm's ResNet head does this): a routed site."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(12, 16), torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.dropout(torch.tanh(self.a(x.flatten(1))), 0.3, self.training))


def test_compile_auto_runs_routed_dropout_calls_eagerly_without_trying(monkeypatch, caplog):
    """A routed dropout call is found by walking the call stack, which torch.compile cannot trace: `auto` runs such
    a model eagerly at once, with its reason, instead of a compile attempt that fails (timm's ResNet-18)."""
    import logging
    import warnings

    import dia

    monkeypatch.setattr("dia.attacks.program.cold_guess", lambda *a: 0.0)  # a compile would always be repaid
    torch.manual_seed(0)
    model, x, y = _RoutedDropoutNet(), torch.rand(1, 1, 3, 4), torch.tensor([1])
    update = dia.capture_update(model, x, y, seed=0)
    with caplog.at_level(logging.INFO, logger="dia"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dia.reconstruct(model, update, labels=y, input_shape=(1, 3, 4), compile="auto", max_iterations=3, seed=0)
    assert "attack.compile=auto: running eagerly (functional: " in caplog.text
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    assert out.iterations.item() == 3 and torch.isfinite(out.loss).all()
