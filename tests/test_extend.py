"""An attack is one class (and, for the command line, one YAML): a subclass defined in this file is used the
same way by the API, dia.train, dia.grid and packs; every attack class is a plain LightningModule."""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import pytest
import torch

import dia
from dia.attacks import ATTACKS, DropoutInversionAttack, register
from dia.config import compose
from dia.run import execute
from dia.run.pack import attack as run_attack

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


@pytest.fixture(autouse=True, scope="module")
def _offset_registered():
    """Registered for this file's tests only (other files list the attacks and must not see it)."""
    register("offset_test")(Offset)
    yield
    ATTACKS.unregister("offset_test")


def _losses(folder: Path) -> list[float]:
    return [v["loss"] for v in json.loads((folder / "metrics.json").read_text())["victims"]]


def test_the_class_has_its_own_program_and_dia_settings():
    assert ATTACKS.get("offset_test") is Offset and Offset.program() is Offset
    assert DropoutInversionAttack.program() is ATTACKS.get("ig")  # DIA only changes per-row policies
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
