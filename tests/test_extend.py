"""Extending dia: an attack is one class (and, for the command line, one YAML); so is a model, a defense; a metric
is one entry of the metric table; a logger is one opener. Each defined in this file is used the same way by the
API, dia.train, dia.grid and packs (the files each takes in the package: docs/design.md); every attack class is a
plain LightningModule."""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import pytest
import torch
from helpers import attack_alone as run_attack

import dia
from dia.attacks import ATTACKS, DropoutInversionAttack, Part, Program, register, unregister
from dia.config import compose
from dia.run import execute

OFFSET = 10.0  # above any cosine distance (<= 2) plus DIA's regularizer
FAST = [
    "attack.max_iterations=20",
    "attack.compile=false",
    "logger.wandb.mode=disabled",
    "metrics.lpips=off",
    "run.progress=false",
    "metrics.curves_ssim=false",
]


class Offset(DropoutInversionAttack):
    """DIA whose gradient distance is raised by OFFSET: any path that runs this class reports losses >= OFFSET,
    any path that silently ran DIA instead reports DIA's (a cosine distance, at most 2)."""

    def distance(self, grads, targets):
        return super().distance(grads, targets) + OFFSET


class Hazard(DropoutInversionAttack):
    """DIA whose gradient distance reads one of the attack's own settings (`mask_init_logit`, which the `clip`
    parametrization never uses otherwise): a pack that gave every row the first run's setting would be wrong."""

    def distance(self, grads, targets):
        return super().distance(grads, targets) + self.cfg.mask_init_logit


@pytest.fixture(autouse=True, scope="module")
def _offset_registered():
    """Registered for this file's tests only (other files list the attacks and must not see it)."""
    register("offset_test")(Offset)
    register("hazard_test")(Hazard)
    yield
    unregister("offset_test")
    unregister("hazard_test")


def _losses(folder: Path) -> list[float]:
    return [v["loss"] for v in json.loads((folder / "metrics.json").read_text())["victims"]]


def test_the_class_has_its_own_program_and_dia_settings():
    assert ATTACKS.get("offset_test") is Offset and Offset.objective_owner() is Offset
    assert DropoutInversionAttack.objective_owner() is ATTACKS.get("ig")  # DIA only changes per-row policies
    cfg = compose(["attack=offset_test"] + FAST)
    assert cfg.attack.name == "offset_test" and cfg.attack.mask_weight == 1e-4  # DIA's settings, inherited


def test_api_train_grid_and_packs_all_run_the_subclass(tmp_path, problems_factory):
    # the API, by class and by name
    cfg, model, problems, v, mean, std = problems_factory(["attack=dia", "model.dropout=0.25", "model.width=64"], [0])
    grads = {n: t[0] for n, t in problems.targets.items()}
    for attack in (Offset, "offset_test"):
        r = dia.reconstruct(
            model,
            grads,
            labels=problems.labels[0],
            input_shape=(1, 28, 28),
            mean=(0.1307,),
            std=(0.3081,),
            attack=attack,
            compile=False,
            max_iterations=20,
        )
        assert float(r.loss.min()) >= OFFSET
    base = dia.reconstruct(
        model,
        grads,
        labels=problems.labels[0],
        input_shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        attack="dia",
        compile=False,
        max_iterations=20,
    )
    assert float(base.loss.max()) < OFFSET
    # dia.train's path (the run contract), two rates packed into one program
    cfgs = [
        compose(
            [
                "attack=offset_test",
                f"model.dropout={p}",
                "victims=[0]",
                f"run.output_dir={tmp_path / 'runs'}",
                f"run.name=off{p}",
            ]
            + FAST
        )
        for p in (0.25, 0.5)
    ]
    notes: list[str] = []
    outcomes = execute(cfgs, progress=False, note=notes.append)
    assert [int(o.code) for o in outcomes] == [0, 0]
    assert sum(n.startswith("program:") for n in notes) == 1  # one program for both runs
    for o in outcomes:
        assert min(_losses(o.output.folder)) >= OFFSET
    # dia.grid (in-process, as a cluster task runs it)
    from dia import grid as G

    sweep = tmp_path / "offset.yaml"
    sweep.write_text(
        "name: offset\nmethod: grid\nparameters:\n  attack: {value: offset_test}\n  model.dropout: {values: [0.25]}\n"
        + "".join(f"  {a.split('=')[0]}: {{value: {a.split('=')[1]}}}\n" for a in FAST + ["victims=[1]"])
    )
    grid = G.load(sweep)
    folder = G.prepare(grid, tmp_path / "results")
    assert G.run_cells(grid, folder, list(grid.cells)) == 0
    assert min(_losses(folder / grid.cell(0).id)) >= OFFSET


def test_every_attack_is_a_plain_lightning_module(problems_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a plain Trainer writes its logs here
    cfg, model, problems, v, mean, std = problems_factory(
        ["attack=dia", "model.dropout=0.5", "attack.max_iterations=30"], [0, 1]
    )
    module = DropoutInversionAttack(model, problems.public(), cfg.attack)
    lightning.Trainer(enable_progress_bar=False).fit(module)  # the defaults: max_epochs, logger, checkpoints
    plain = module.result()
    ours = run_attack(model, problems, cfg, device=torch.device("cpu"))
    torch.testing.assert_close(plain.x, ours.x, rtol=0, atol=0)
    assert plain.status == ours.status and torch.equal(plain.iterations, ours.iterations)
    with pytest.raises(ValueError, match="must not see"):
        DropoutInversionAttack(model, problems, cfg.attack)  # the client's masks are for the oracle only


def test_an_objective_that_reads_its_own_settings_is_not_packed_with_other_settings(tmp_path, problems_factory):
    """The pack-settings hazard: runs whose objective reads their own setting differently never share a program,
    and each result equals the run alone."""
    cfgs = [
        compose(
            [
                "attack=hazard_test",
                "model.dropout=0.25",
                "victims=[0]",
                f"attack.mask_init_logit={v}",
                f"run.output_dir={tmp_path / 'together'}",
                f"run.name=h{v}",
            ]
            + FAST
        )
        for v in (1.0, 5.0)
    ]
    notes: list[str] = []
    together = execute(cfgs, progress=False, note=notes.append)
    assert sum(n.startswith("program:") for n in notes) == 2  # one program each: their objectives differ
    for cfg, outcome in zip(cfgs, together):
        alone = execute(
            [
                compose(
                    [
                        *FAST,
                        "attack=hazard_test",
                        "model.dropout=0.25",
                        "victims=[0]",
                        f"attack.mask_init_logit={cfg.attack.mask_init_logit}",
                        f"run.output_dir={tmp_path / 'alone'}",
                        f"run.name={cfg.run.name}",
                    ]
                )
            ],
            progress=False,
        )[0]
        assert _losses(outcome.output.folder) == _losses(alone.output.folder)
        assert min(_losses(outcome.output.folder)) >= cfg.attack.mask_init_logit  # its own setting, not the other's
    # built by hand, such parts are refused rather than silently given the first part's objective
    cfg, model, problems, _, mean, std = problems_factory(["attack=dia", "model.dropout=0.25"], [0])
    parts = [Part(Hazard(cfg=cfgs[i].attack), problems.public()) for i in (0, 1)]
    with pytest.raises(ValueError, match="cannot share a program"):
        Program(model, parts, lower=(0 - mean) / std, upper=(1 - mean) / std)
