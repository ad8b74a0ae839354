"""The seams a researcher extends, each shown end to end: a new model, defense, metric and logger (an attack:
tests/test_extend.py), a Lightning logger receiving a run's curves, and a folder `dia.save` writes that dia.report
reports on. docs/design.md lists the files each takes in the package; here each is defined in the test."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import dia
from dia import config as C
from dia import defenses as D
from dia import metrics as M
from dia import report as R
from dia.config import compose
from dia.models import MODELS, register_model
from dia.run import execute
from dia.run.loggers import LOGGERS, Logger, register_logger

FAST = [
    "attack.max_iterations=20",
    "attack.compile=false",
    "logger.wandb.mode=disabled",
    "metrics.lpips=off",
    "run.progress=false",
    "victims=[0,1]",
]


@pytest.fixture
def configs(tmp_path, monkeypatch):
    """A copy of the configs/ tree (DIA_CONFIG_DIR) a test may add a choice's YAML to."""
    tree = tmp_path / "configs"
    shutil.copytree(C.config_dir(), tree)
    monkeypatch.setenv("DIA_CONFIG_DIR", str(tree))
    return tree


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_a_new_model_is_one_builder_and_one_yaml(configs, tmp_path):
    class Tiny(nn.Module):
        def __init__(self, width: int, p: float) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Dropout(p), nn.Linear(width, 10)
            )

        def forward(self, x):
            return self.net(x)

    @register_model("tiny_test")
    def build_tiny(cfg, *, channels, image_size, num_classes):
        from dia.models.capture import make_capturable

        return make_capturable(Tiny(cfg.width, cfg.dropout), torch.zeros(1, channels, image_size, image_size))

    (configs / "model" / "tiny_test.yaml").write_text("name: tiny_test\ndropout: 0.25\nwidth: 32\n")
    try:
        cfg = compose(["model=tiny_test", "model.width=16", "attack=dia", f"run.output_dir={tmp_path}", *FAST])
        assert cfg.model.width == 16  # its own setting, typed from its YAML
        (out,) = execute([cfg], progress=False)
        m = _metrics(out.output.folder)
        assert m["model"] == "tiny_test" and m["mean"]["mask_bal_acc"] is not None  # DIA found its dropout site
    finally:
        MODELS.unregister("tiny_test")


def test_a_new_defense_is_one_function_and_one_yaml(configs, tmp_path):
    @D.register_defense("halve_test", strength="factor", checks=[("factor", lambda v: 0 < v <= 1, "must be in (0, 1]")])
    def halve(grads, cfg, generator):
        return {n: g * cfg.factor for n, g in grads.items()}

    (configs / "defense" / "halve_test.yaml").write_text("name: halve_test\nfactor: 0.5\n")
    try:
        plain = dia.simulate("model.dropout=0.25", "victims=[0]")
        halved = dia.simulate("model.dropout=0.25", "victims=[0]", "defense=halve_test")
        for n, t in plain.problems.targets.items():  # what the client sends went through it
            torch.testing.assert_close(halved.problems.targets[n], 0.5 * t)
        with pytest.raises(dia.UserError, match=r"defense.factor=2.0: must be in \(0, 1\]"):
            dia.simulate("defense=halve_test", "defense.factor=2")
        (out,) = execute([compose(["defense=halve_test", f"run.output_dir={tmp_path}", *FAST])], progress=False)
        assert _metrics(out.output.folder)["defense"]["name"] == "halve_test"
    finally:
        D.DEFENSES.unregister("halve_test")


def test_a_new_metric_is_one_entry_of_the_table(tmp_path):
    l1 = M.Metric("l1_test", "L1", False, "{:.3f}", fn=lambda x, y: (x - y).abs().flatten(1).mean(1))
    M.register_metric(l1)
    try:
        (out,) = execute([compose(["attack=ig", f"run.output_dir={tmp_path / 'runs'}", *FAST])], progress=False)
        m = _metrics(out.output.folder)
        values = [v["l1_test"] for v in m["victims"]]
        assert all(0 < v < 1 for v in values) and m["mean"]["l1_test"] == pytest.approx(sum(values) / len(values))
        report = R.build(tmp_path / "runs", montages=False)
        assert "L1" in (report["out"] / "table.md").read_text()  # the report's columns come from the same table
    finally:
        M.unregister_metric("l1_test")


def test_a_new_logger_is_one_opener(tmp_path):
    seen: dict[str, list] = {"points": [], "summary": []}

    class Memory(Logger):
        name = "memory_test"

        def log(self, points):
            seen["points"] += points

        def finish(self, summary, *, figure, originals, reconstructions):
            seen["summary"].append((summary, figure.name, tuple(reconstructions.shape)))
            return None

    register_logger("memory_test")(lambda cfg, folder, name: Memory())
    try:
        cfg = compose(["logger=memory_test", "attack.log_every=10", f"run.output_dir={tmp_path}", *FAST])
        (out,) = execute([cfg], progress=False)
        curves = [json.loads(line) for line in (out.output.folder / "curves.jsonl").read_text().splitlines()]
        assert seen["points"] == curves and [p["iteration"] for p in curves] == [10, 20]
        ((summary, figure, shape),) = seen["summary"]
        assert summary == _metrics(out.output.folder) and figure == "reconstructions.png" and shape == (2, 1, 28, 28)
    finally:
        LOGGERS.unregister("memory_test")


def test_lightnings_csv_logger_receives_the_curves_and_the_summary(tmp_path):
    cfg = compose(["logger=csv", "attack.log_every=10", f"run.output_dir={tmp_path}", *FAST])
    (out,) = execute([cfg], progress=False)
    folder = out.output.folder
    assert out.output.logged == {"csv": str(folder / "csv")}
    rows = list(csv.DictReader((folder / "csv" / "metrics.csv").open()))
    curves = [json.loads(line) for line in (folder / "curves.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r["attack/loss"]]
    assert [int(r["step"]) for r in logged] == [p["step"] for p in curves]
    assert [float(r["attack/loss"]) for r in logged] == pytest.approx([p["attack/loss"] for p in curves])
    final = [r for r in rows if r["final/ssim"]]
    assert len(final) == 1 and float(final[0]["final/ssim"]) == pytest.approx(_metrics(folder)["mean"]["ssim"])
    assert not (folder / "wandb").exists()  # logger=csv alone: no W&B run


def test_a_logger_that_needs_a_missing_package_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("mlflow") else real(name, *a)
    )
    with pytest.raises(dia.UserError, match="logger=mlflow: needs the mlflow package"):
        execute([compose(["logger=mlflow", f"run.output_dir={tmp_path}", *FAST])], progress=False)
    assert not any(tmp_path.iterdir())


def test_a_folder_dia_save_writes_is_one_dia_report_reports_on(tmp_path):
    sim = dia.simulate("model.dropout=0.25", "victims=[0,1]")
    grads = [{n: t[k] for n, t in sim.problems.targets.items()} for k in range(2)]
    r = dia.reconstruct(
        sim.model,
        grads,
        labels=sim.problems.labels,
        input_shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        attack="dia",
        compile=False,
        max_iterations=30,
    )
    folder = dia.save(r, tmp_path / "results" / "mine", originals=sim.victims.images, masks=sim.problems.true_masks)
    m = _metrics(folder)
    assert (m["model"], m["data"], m["dropout"], m["attack"]) == ("MLP", "custom", 0.25, "dia")
    report = R.build(tmp_path / "results")
    assert report["runs"] == 1 and len(report["montages"]) == 1
    table = (report["out"] / "table.md").read_text()
    row = next(line for line in table.splitlines() if "| custom | MLP |" in line)
    assert f"{m['mean']['ssim']:.3f}" in row
