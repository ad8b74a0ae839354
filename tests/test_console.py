"""The console a researcher watches: a progress bar that moves every iteration from a host-side count, a notice
before a compile (with its expected time), no leftover Lightning bars, warnings or torch noise, and a bar by
default only where a person watches (a terminal, a notebook)."""

from __future__ import annotations

import logging
import sys
import types
import warnings

import pytest
import torch

from dia import attacks
from dia.attacks import progress as P
from dia.attacks.compiling import CompiledOrEager, CostBook, cold_guess, signature
from dia.console import interactive, quiet

TINY = ["attack=dia", "model.depth=1", "model.width=32", "attack.iterations_per_step=10", "attack.check_every=50"]


def _attack(problems_factory, iterations: int, *extra: str) -> attacks.Program:
    cfg, model, problems, _, mean, std = problems_factory([*TINY, f"attack.max_iterations={iterations}", *extra], [0])
    part = attacks.part(cfg.attack, problems.public())
    return attacks.attack(
        model, [part], device=torch.device("cpu"), progress=True, lower=(0 - mean) / std, upper=(1 - mean) / std
    )


def test_the_bar_moves_every_iteration_from_a_host_side_count(problems_factory, monkeypatch, capfd):
    """It moved every attack.check_every (50) iterations, minutes a step for the ViT on a CPU: now every iteration
    (at most every half second in a terminal), from the program's integer count: no host sync."""
    seen: list = []
    tick = P.AttackProgressBar.tick

    def record(self, done):
        tick(self, done)
        seen.append((done, self.train_progress_bar.n))

    monkeypatch.setattr(P.AttackProgressBar, "tick", record)
    monkeypatch.setattr(P.AttackProgressBar, "redraw_interval", lambda self: 0.0)
    program = _attack(problems_factory, 25)
    assert program.done == 25 and program.on_iteration is None  # the bar let go of the program when it ended
    assert sorted({d for d, _ in seen}) == list(range(1, 26)) and all(type(d) is int for d, _ in seen)
    assert all(n == d for d, n in seen)  # after every iteration the bar shows it
    err = capfd.readouterr().err
    # the bar is titled with the attack and nothing of Lightning's comes before it, in a log file too
    assert "1 run" not in err and "DIA x1" in err and "25/25" in err
    assert "Epoch" not in err and "Training" not in err and "0/?" not in err


def test_the_bar_redraws_at_most_every_interval(problems_factory, monkeypatch):
    draws: list[int] = []
    monkeypatch.setattr(P.AttackProgressBar, "redraw_interval", lambda self: 3600.0)
    update = P.Tqdm.update
    monkeypatch.setattr(P.Tqdm, "update", lambda self, n=1: (draws.append(self.n + n), update(self, n))[1])
    _attack(problems_factory, 25)
    assert draws == [25]  # an hour between redraws: only the end


def _compiled(monkeypatch, tmp_path, key: str = "k") -> CompiledOrEager:
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the notice and the record, not the compiler
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    return CompiledOrEager(lambda x: x + 1, strict=True, book=CostBook(tmp_path), signature=key, guess=42.0)


def test_a_notice_with_the_expected_time_comes_before_the_first_compiled_call(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dia")
    fn = _compiled(monkeypatch, tmp_path)
    assert fn(torch.zeros(1)).item() == 1 and fn(torch.zeros(1)).item() == 1
    first, timed = (r.getMessage() for r in caplog.records)
    assert first == (
        "compiling the attack program (first time for this model and shape: ~40 s, a rough guess; cached in "
        f"{tmp_path})"
    )
    assert timed.startswith("torch.compile: first call")  # after the notice; the second call says nothing
    caplog.clear()
    _compiled(monkeypatch, tmp_path)(torch.zeros(1))  # the next process: the book knows this program's time
    assert caplog.records[0].getMessage() == (
        f"compiling the attack program (~1 s, as the last time on this machine; cached in {tmp_path})"
    )
    caplog.clear()
    _compiled(monkeypatch, tmp_path, key="another model")(torch.zeros(1))
    assert "first time for this model and shape" in caplog.records[0].getMessage()


def test_a_programs_signature_and_guess_follow_its_model(problems_factory):
    cfg, model, problems, _, mean, std = problems_factory([*TINY, "attack.max_iterations=1"], [0])
    keys, guesses = [], []
    for width in (32, 64):
        _, model, problems, _, _, _ = problems_factory([*TINY, f"model.width={width}"], [0])
        program = attacks.Program(model, [attacks.part(cfg.attack, problems.public())])
        program.on_fit_start()
        keys.append(signature(program.model, program.state.flat, "objective"))
        guesses.append(cold_guess(program.model, program.device))
    assert keys[0] != keys[1]
    assert 20 < guesses[0] < 60  # the MLP's cold compile on a CPU: 30-45 s measured


def test_quiet_hides_torchs_cuda_home_line_and_lightnings_warnings_then_restores(caplog):
    noisy = logging.getLogger("torch.utils.cpp_extension")
    before = list(warnings.filters)
    with quiet():
        noisy.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`LightningModule.configure_optimizers` returned `None`: no optimizer", stacklevel=1)
    assert not caught and not [r for r in caplog.records if "CUDA runtime" in r.getMessage()]
    assert warnings.filters == before
    noisy.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
    assert [r for r in caplog.records if "CUDA runtime" in r.getMessage()]


def test_an_attack_under_the_users_own_trainer_gives_no_warnings_of_its_own(problems_factory):
    """docs/api.md: `lightning.Trainer(**dia.attacks.TRAINER).fit(attack)`; the attack's hooks hush what Lightning
    says of the module (no optimizer, modules in eval mode, few batches) and restore the filters after."""
    import lightning

    cfg, model, problems, *_ = problems_factory([*TINY, "attack.max_iterations=20", "attack.compile=false"], [0])
    attack = attacks.DropoutInversionAttack(model, problems.public(), max_iterations=20, compile=False)
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = lightning.Trainer(**attacks.TRAINER, enable_progress_bar=False)
        inside = list(warnings.filters)
        trainer.fit(attack)
        assert warnings.filters == inside
    assert attack.result().iterations.tolist() == [20]
    said = [str(w.message) for w in caught]
    assert not [m for m in said if any(k in m for k in ("optimizer", "eval mode", "training batches", "LeafSpec"))]
    assert warnings.filters == before


def test_interactive_means_a_terminal_or_a_notebook(monkeypatch):
    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert interactive()
    monkeypatch.setattr(sys, "stderr", Stream(False))
    assert not interactive()  # a log file, a pipe, a batch job
    kernel = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    assert interactive()  # Jupyter: stderr is no terminal, yet a person watches
    terminal_ipython = types.SimpleNamespace(config={"TerminalInteractiveShell": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: terminal_ipython))
    assert not interactive()


@pytest.fixture(autouse=True)
def _no_compile_cache_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
