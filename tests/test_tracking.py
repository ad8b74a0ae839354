"""W&B as its users expect it: one live W&B run per dia run (several in one process when runs are packed), the
right images, the summary, resumes that continue the same W&B run on the points of an unbroken run, sweep
agents' runs grouped and tagged, and W&B failures that never cost a run. Every record is read back with W&B's
own reader of its transaction log (`wandb leet inspect`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dia.config import compose
from dia.metrics import mean_metrics
from dia.run import execute
from dia.run.loggers.wandb import read_offline_file, read_offline_run, read_offline_runs, to_image, victim_columns
from dia.train import main

TINY = [
    "model.width=32",
    "model.depth=2",
    "model.dropout=0.5",
    "num_victims=2",
    "attack.max_iterations=60",
    "attack.log_every=20",
    "attack.compile=false",
    "metrics.lpips=off",
    "run.progress=false",
    "logger.wandb.mode=offline",
]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _curve_steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "curves.jsonl").read_text().splitlines()]


def _table_images(record: dict, column: str) -> list[np.ndarray]:
    """The images of a logged table's column: W&B stores a table with media as a run_table artifact, whose
    manifest names the staged files."""
    files = {e["path"]: e["local_path"] for a in record["artifacts"] for e in a["manifest"]["contents"]}
    table = json.loads(Path(files["victims.table.json"]).read_text())
    cells = [row[table["columns"].index(column)] for row in table["data"]]
    return [_pixels(Path(files[cell["path"]])) for cell in cells]


def test_an_image_is_its_pixels_times_255():
    x = torch.rand(3, 8, 8)
    assert np.array_equal(np.asarray(to_image(x).image), (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    gray = torch.rand(1, 5, 7)
    assert np.array_equal(np.asarray(to_image(gray).image), (gray[0] * 255).round().to(torch.uint8).numpy())


def test_victim_columns_come_from_the_rows_and_the_metric_names():
    rows = [
        {
            "problem": 0,
            "status": "converged",
            "ssim": 0.5,
            "lpips": None,
            "mask_bal_acc_attention": 0.7,
            "index": 3,
            "label": 1,
        }
    ]
    metrics = [m for m in mean_metrics(rows) if rows[0].get(m) is not None]
    assert victim_columns(rows) == ["index", "label", "problem", "status"] + metrics
    assert "mask_bal_acc_attention" in victim_columns(rows) and "lpips" not in victim_columns(rows)


def test_packed_runs_are_live_wandb_runs_ending_with_their_images_table_and_summary(tmp_path, monkeypatch):
    from dia.run import pack as packs

    ends: list[tuple[int, float]] = []  # (program iteration, time) at the end of every step
    step_end = packs.Turnover.on_train_batch_end

    def timed(self, trainer, module, *args):
        step_end(self, trainer, module, *args)
        ends.append((module.done, time.time()))
        print(f"[step {module.done} ended]", flush=True)  # console output while the runs are live

    monkeypatch.setattr(packs.Turnover, "on_train_batch_end", timed)
    import wandb

    settings = wandb.Settings  # W&B samples system metrics every 15 s; this run takes about a second
    monkeypatch.setattr(wandb, "Settings", lambda **kw: settings(**{"x_stats_sampling_interval": 0.1, **kw}))
    cfgs = [compose(TINY + [f"attack={a}", f"run.output_dir={tmp_path}", f"run.name={a}"]) for a in ("ig", "dia")]
    assert [int(o.code) for o in execute(cfgs, progress=False)] == [0, 0]
    ids = set()
    for attack in ("ig", "dia"):
        folder = tmp_path / attack
        metrics = json.loads((folder / "metrics.json").read_text())
        (run_dir,) = (folder / "wandb").glob("offline-run-*")  # one W&B run, written while the attack ran
        record = read_offline_run(run_dir)
        ids.add(record["run"]["run_id"])
        assert record["run"]["run_id"] == (folder / "wandb-id").read_text().strip() and record["exit_code"] == 0
        assert record["run"]["display_name"] == attack
        assert {f"attack:{attack}", "model:mlp", "data:mnist", "model.dropout:0.5"} <= set(record["run"]["tags"])
        assert record["config"]["attack"]["name"] == attack and record["config"]["model"]["dropout"] == 0.5
        curves = [r for r in record["history"] if "attack/loss" in r]
        assert [r["_step"] for r in curves] == _curve_steps(folder) == [10, 20, 40, 60]
        for row in curves[:-1]:  # each point reached W&B while the attack ran: before the next step ended
            assert row["_timestamp"] <= next(t for done, t in ends if done > row["_step"])
        assert record["stats"] and "[step 40 ended]" in record["console"]  # system metrics and console, as W&B does
        # the images and the victims table at the last iteration, with the curves' last point
        (last,) = [r for r in record["history"] if "victims._type" in r]
        assert (
            last["_step"] == 60 == metrics["iterations"] and "reconstructions._type" in last and "attack/loss" in last
        )
        logged = read_offline_file(run_dir, last, "reconstructions")
        assert np.array_equal(_pixels(logged), _pixels(folder / "reconstructions.png"))
        tensors = torch.load(folder / "reconstructions.pt", weights_only=True)
        for name, images in (("original", tensors["originals"]), ("reconstruction", tensors["reconstructions"])):
            expected = [(x[0] * 255).round().to(torch.uint8).numpy() for x in images]
            assert all(np.array_equal(a, b) for a, b in zip(_table_images(record, name), expected, strict=True))
        summary = record["summary"]
        assert summary["status"] == "completed" and summary["iterations"] == 60 and summary["device"] == "cpu"
        assert summary["wall_time_s"] == pytest.approx(metrics["wall_time_s"])
        assert summary["victims/max_iterations"] + summary["victims/converged"] + summary["victims/early_stopped"] == 2
        assert {f"final/{k}": v for k, v in metrics["mean"].items() if v is not None} == pytest.approx(
            {k: v for k, v in summary.items() if k.startswith("final/")}
        )
        assert (attack == "dia") == ("final/mask_bal_acc" in summary)
    assert len(ids) == 2


def test_a_run_stopped_and_failed_continues_one_wandb_run_on_the_points_of_an_unbroken_run(tmp_path, monkeypatch):
    from dia.run import pack as packs
    from dia.run.signals import STOP, Preempted

    args = TINY + ["attack=dia", "run.checkpoint_every=30", "run.name=r"]  # points every 20 iterations
    assert main(args + [f"run.output_dir={tmp_path / 'straight'}"]) == 0
    step_end = packs.Turnover.on_train_batch_end
    stop_at: dict[str, int] = {}

    def interrupted(self, trainer, module, *rest):
        own = self.own_iteration(self.inside[0])  # the one run's own iteration
        if own == stop_at.get("stop"):  # SIGTERM lands: the checkpoint is saved at this step's end
            STOP.set(Preempted, 15)
        step_end(self, trainer, module, *rest)
        if own == stop_at.get("fail"):  # a fault after the step's point, past the checkpoint
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(packs.Turnover, "on_train_batch_end", interrupted)
    broken = args + [f"run.output_dir={tmp_path / 'broken'}"]
    stop_at.update(fail=40)  # W&B has 10, 20, 40; the checkpoint is at 30
    assert main(broken) == 1
    stop_at.update(fail=-1, stop=50)  # resumed at 30; 40 is in W&B already; stopped off the grid of points
    assert main(broken) == 75
    stop_at.clear()
    assert main(broken) == 0
    straight, resumed = tmp_path / "straight" / "r", tmp_path / "broken" / "r"
    assert _curve_steps(resumed) == _curve_steps(straight) == [10, 20, 40, 60]
    first, second, third = records = read_offline_runs(resumed / "wandb")
    assert [r["exit_code"] for r in records] == [1, 75, 0] and [r["preempting"] for r in records] == [
        False,
        True,
        False,
    ]
    assert {r["run"]["run_id"] for r in records} == {(resumed / "wandb-id").read_text().strip()}
    steps = [row["_step"] for r in records for row in r["history"] if "attack/loss" in row]
    assert steps == _curve_steps(straight)  # nothing twice, nothing off the grid, in order across the processes

    def losses(parts):
        return {row["_step"]: row["attack/loss"] for r in parts for row in r["history"] if "attack/loss" in row}

    assert losses(records) == pytest.approx(losses(read_offline_runs(straight / "wandb")))
    assert [[row["_step"] for row in r["history"] if "victims._type" in row] for r in records] == [[], [], [60]]


@pytest.mark.parametrize("where", ["init", "log", "finish"])
def test_a_failing_wandb_costs_one_warning_never_the_run(tmp_path, monkeypatch, where):
    import wandb

    from dia.run.loggers import wandb as tracking

    init = wandb.init

    def fail(*args, **kwargs):
        raise OSError("service died")

    def broken_init(*args, **kwargs):
        if where == "init":
            raise wandb.errors.CommError("no route to host")
        run = init(*args, **kwargs)
        if where == "log":
            monkeypatch.setattr(run, "log", fail)
        return run

    monkeypatch.setattr(wandb, "init", broken_init)
    if where == "finish":
        monkeypatch.setattr(tracking, "victim_table", fail)
    with pytest.warns(UserWarning, match=r"r: W&B failed \((CommError|OSError).*the run goes on") as caught:
        assert main(TINY + ["attack=ig", "attack.max_iterations=20", f"run.output_dir={tmp_path}", "run.name=r"]) == 0
    assert len([w for w in caught if "W&B failed" in str(w.message)]) == 1
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and (tmp_path / "r" / "reconstructions.png").is_file()
    if where != "init":  # the W&B run stopped where W&B failed, finished as failed
        (record,) = read_offline_runs(tmp_path / "r" / "wandb")
        assert record["exit_code"] == 1


def test_disabled_wandb_and_help_import_nothing_from_wandb(tmp_path):
    args = [
        "attack=ig",
        "attack.max_iterations=10",
        "num_victims=1",
        "attack.compile=false",
        "metrics.lpips=off",
        "run.progress=false",
        "logger.wandb.mode=disabled",
        f"run.output_dir={tmp_path}",
    ]
    code = (
        f"import sys; from dia.train import main; assert main({args!r}) == 0; "
        "assert main(['--help']) == 0; "
        "bad = sorted(m for m in sys.modules if m == 'wandb' or m.startswith('wandb.')); assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(tmp_path.glob("*/wandb")) and not list(tmp_path.glob("*/wandb-id"))


@pytest.mark.parametrize("lookup", ["answers", "fails"])
def test_a_sweep_agents_run_is_grouped_by_its_sweep_and_tagged(tmp_path, monkeypatch, lookup):
    """What `wandb agent` does for our sweep files, without the internet: it sets WANDB_SWEEP_ID, WANDB_RUN_ID
    and WANDB_SWEEP_PARAM_PATH (the cell's parameters, written with W&B's own config writer) and runs the
    file's command; the sweep's name is asked from W&B's API (here a stand-in). With `answers`, the agent's
    run is stopped by a signal and a later agent run (another W&B run id) resumes the cell."""
    import wandb
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    from wandb.sdk.lib import config_util

    from dia.grid.sweep import load
    from dia.run import pack as packs
    from dia.run.signals import STOP, Preempted

    cell = load(Path(__file__).parent.parent / "sweeps" / "smoke.yaml").cell(3)
    params = {k: {"value": v} for k, v in cell.overrides.items()} | {
        "logger.wandb.mode": {"value": "offline"},
        "metrics.lpips": {"value": "off"},
    }
    if lookup == "fails":  # as in the files `dia.grid --wandb-sweeps` writes: the grid is the group
        params["logger.wandb.group"] = {"value": "smoke-grid"}
    asked: list[str] = []

    class Sweep:
        def __init__(self, path):
            asked.append(path)
            if lookup == "fails":
                raise wandb.errors.CommError("no network")
            self.name = "smoke-block"

    monkeypatch.setattr(wandb, "Api", lambda **kw: type("Api", (), {"sweep": lambda self, path: Sweep(path)})())
    out = tmp_path / "results" / "smoke"

    def agent_runs(run_id: str) -> int:
        config_util.save_config_file_from_dict(str(tmp_path / f"config-{run_id}.yaml"), params)
        env = {
            "WANDB_SWEEP_ID": "sw33p",
            "WANDB_RUN_ID": run_id,
            "WANDB_PROJECT": "dia",
            "WANDB_SWEEP_PARAM_PATH": str(tmp_path / f"config-{run_id}.yaml"),
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        wandb.teardown()  # W&B reads these at its setup, once per process (the agent starts a fresh process)
        try:
            args = create_sweep_command_args({"args": params})["args_no_hyphens"]  # what ${args_no_hyphens} gives
            return main(args + ["run.name=auto-cell", f"run.output_dir={out}"])
        finally:
            for key in env:
                monkeypatch.delenv(key)
            wandb.teardown()

    if lookup == "answers":  # the time limit: SIGTERM at iteration 10 (after its point)
        step_end = packs.Turnover.on_train_batch_end

        def stopped(self, trainer, module, *rest):
            if module.done == 10:
                STOP.set(Preempted, 15)
            step_end(self, trainer, module, *rest)

        monkeypatch.setattr(packs.Turnover, "on_train_batch_end", stopped)
        assert agent_runs("agentrun0") == 75
        monkeypatch.setattr(packs.Turnover, "on_train_batch_end", step_end)
    assert agent_runs("agentrun1") == 0
    folder = next(p for p in out.iterdir() if not p.name.startswith("."))
    *before, record = read_offline_runs(folder / "wandb")
    run = record["run"]
    assert set(asked) == {"dia/sw33p"} and run["run_id"] == "agentrun1" == (folder / "wandb-id").read_text().strip()
    assert run["sweep_id"] == "sw33p"
    if lookup == "answers":  # grouped by the sweep's name (a grid, or a grid's block)
        assert run["run_group"] == run["job_type"] == "smoke-block"
        (first,) = before  # the stopped agent run; the second W&B run got the points so far, then its own
        assert first["run"]["run_id"] == "agentrun0" and first["exit_code"] == 75
        assert [r["_step"] for r in first["history"] if "attack/loss" in r] == [10]
    else:  # the group set; the job type is the grid's results folder when W&B cannot name the sweep
        assert run["run_group"] == "smoke-grid" and run["job_type"] == "smoke" and not before
    assert [r["_step"] for r in record["history"] if "attack/loss" in r] == _curve_steps(folder) == [10, 20]
    assert {"attack:dia", "model:mlp", "data:mnist", "model.dropout:0.5"} <= set(run["tags"])
    assert record["config"]["attack"] == "dia" and record["config"]["model.dropout"] == 0.5  # the sweep's own keys
    assert record["config"]["attack.lr"] == 0.1 and record["config"]["run.name"] == folder.name  # ours, beside them
    assert record["summary"]["status"] == "completed"
