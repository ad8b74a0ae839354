"""Weights & Biases as a dia logger (`logger=wandb`, the default): one W&B run per dia run, live while the attack
runs, continued across resumes.

A run's W&B run opens at its first curve point and gets every point as it lands in `curves.jsonl` (stepped
by attack iteration, `attack.log_every` apart, from the log points the program already has: no extra host
sync); W&B records system metrics and the console as it does by default. When the run is done it gets the
reconstructions (the run's `reconstructions.png`), the per-victim table (with each victim's original and
reconstruction) and the summary, at the run's last iteration, and is finished before the folder is renamed.

Its id is kept in the run folder (`wandb-id`), so a resumed run continues it: online, W&B resumes the run
(`resume="allow"`); offline, each process writes its own `wandb/offline-run-*` directory with that id, and
`wandb sync` uploads them as one run, in start order (W&B's own mechanism for resumed offline runs). Points
an earlier process already sent (up to the last line of `curves.jsonl` when this process started) are not
sent again, so the steps only increase. A stop signal finishes the W&B run with the exit code (75 marked
preempting, 130); a failure with 1.

W&B is never the record: the run folder is. Any W&B failure costs one warning; the run goes on without W&B
and its W&B run stays as far as it got. `logger.wandb.mode=disabled` imports nothing from wandb.

Every run is tagged with its coordinates (`attack:dia`, `model:mlp`, `data:mnist`, `model.dropout:0.25`) beside
`logger.wandb.tags`. Under a W&B sweep agent (`WANDB_SWEEP_ID` set, as `wandb agent` does for the sweeps/
files), the agent's run id is used (W&B ignores any other), the sweep's name (the grid, or grid-block, looked
up from W&B) is the run's job type and, unless `logger.wandb.group` is set, its group; the config goes in as
dotted keys beside the sweep's own (which W&B sets and locks).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dia.config.ids import format_value
from dia.engine import STATUS
from dia.files import write_text
from dia.metrics import mean_metrics
from dia.run import record
from dia.run.loggers import Logger, register_logger
from dia.run.signals import STOP

ID_FILE = "wandb-id"  # in the run folder: the W&B run id every process of the run logs into
COORDINATES = (
    ("attack", "attack.name"),
    ("model", "model.name"),
    ("data", "data.name"),
    ("model.dropout", "model.dropout"),
)


@register_logger("wandb")
def open_run(cfg: Any, folder: Path, name: str) -> LiveRun | None:
    """The W&B run of the dia run in `folder` (its partial folder, locked), None when logger.wandb.mode=disabled.

    Nothing is started yet: W&B opens at the first point. Open before `curves.jsonl` is trimmed on resume,
    so that the points an earlier process sent are known."""
    return None if cfg.logger.wandb.mode == "disabled" else LiveRun(cfg, Path(folder), name)


class LiveRun(Logger):
    """One dia run's W&B run (see the module docstring); every method is a no-op once W&B has failed."""

    name = "wandb"

    def __init__(self, cfg: Any, folder: Path, name: str) -> None:
        self.cfg, self.folder, self.run_name = cfg, folder, name
        self.run: Any = None
        self.failed = False
        path = folder / ID_FILE
        self.saved_id = path.read_text().strip() if path.is_file() else None
        points = record.read_curves(folder)
        self.floor = max((record.step(p) for p in points), default=-1)  # sent by an earlier process (if W&B worked)
        self.last = -1  # the last step this process sent

    # ---- while the attack runs ----------------------------------------------------------------------
    def log(self, points: list[dict[str, Any]]) -> None:
        """Send curve points ({"step", "iteration", "group", name: value}) that W&B does not have yet."""
        if self._open() is None:
            return
        self._guard(lambda: self._send(points))

    def _send(self, points: list[dict[str, Any]]) -> None:
        for point in points:
            step = record.step(point)
            if step <= max(self.floor, self.last):
                continue
            self.run.log({k: v for k, v in point.items() if k not in ("iteration", "group", "step")}, step=step)
            self.last = step

    # ---- the end -------------------------------------------------------------------------------------
    def finish(
        self,
        metrics: dict[str, Any],
        *,
        figure: Path,
        originals: Any,
        reconstructions: Any,
        caption: str = "originals above reconstructions, each titled with its SSIM",
    ) -> str | None:
        """Log the reconstructions (`figure`, the run's PNG, with `caption`), the per-victim table (images in
        [0, 1], (N, C, H, W), victim order) and the summary (from metrics.json's content) at the run's last
        iteration, and finish the run. Returns its local directory (None when W&B is off or failed)."""
        if self._open() is None:
            return None

        def work() -> str:
            import wandb

            step = max(self.last, self.floor + 1 if self.last < self.floor else -1, self._final_step(metrics))
            self.run.log(
                {
                    "reconstructions": wandb.Image(str(figure), caption=caption),
                    "victims": victim_table(metrics["victims"], originals, reconstructions),
                },
                step=step,
            )
            self.run.summary.update(summary_of(metrics))
            directory = str(Path(self.run.dir).parent)
            run, self.run = self.run, None
            run.finish(exit_code=0)
            return directory

        return self._guard(work)

    def _final_step(self, metrics: dict[str, Any]) -> int:
        """The step of the run's last iteration: its last group's step offset plus its iterations."""
        points = record.read_curves(self.folder)
        base = record.step(points[-1]) - int(points[-1].get("iteration", 0)) if points else 0
        return base + int(metrics.get("iterations", 0))

    def close(self, exit_code: int | None = None) -> None:
        """Finish a W&B run left open with `exit_code`, by default the dia run's: a stop signal's (75, marked
        preempting first, or 130), else 1 (it failed). Nothing happens to a finished (or never opened) one."""
        if self.run is None:
            return
        if exit_code is None:
            exit_code = int(STOP.cause.exit_code) if STOP.is_set() else 1
        run, self.run = self.run, None

        def work() -> None:
            if exit_code == 75:
                run.mark_preempting()
            run.finish(exit_code=exit_code)

        self._guard(work)

    # ---- opening and failing -------------------------------------------------------------------------
    def _open(self) -> Any:
        if self.run is None and not self.failed:
            self._guard(self._start)
        return self.run

    def _start(self) -> None:
        import wandb
        from omegaconf import OmegaConf

        wb = self.cfg.logger.wandb
        sweep = os.environ.get("WANDB_SWEEP_ID")
        config = OmegaConf.to_container(self.cfg, resolve=True)
        block = sweep_name(self.cfg, sweep) if sweep else None  # the sweep: a grid, or one block of it
        group = wb.group or block
        if sweep:  # W&B fixes the run id, project and entity, and the sweep's keys; ours go beside them
            taken = set(_sweep_parameters())
            config = {k: v for k, v in _dotted(config).items() if k not in taken}
            where: dict[str, Any] = {}
        else:
            where = {"id": self.saved_id or uuid.uuid4().hex[:12], "project": wb.project, "entity": wb.entity}
        # several dia runs may be live in one process (a pack): each is its own W&B run (reinit="create_new")
        settings = wandb.Settings(**({} if "WANDB_SILENT" in os.environ else {"silent": True}))
        run = wandb.init(
            dir=str(self.folder),
            name=self.run_name,
            group=group,
            job_type=block,
            tags=tags_of(self.cfg) or None,
            mode=wb.mode,
            config=config,
            resume="allow",
            reinit="create_new",
            settings=settings,
            **where,
        )
        self.run = run
        if run.id != self.saved_id:  # a W&B run this dia run never had: give it the points so far
            write_text(self.folder / ID_FILE, run.id + "\n")
            self.floor, self.saved_id = -1, run.id
            self._send(record.read_curves(self.folder))
        elif getattr(run, "starting_step", 0):  # online resume: W&B knows where the run got to
            self.floor = max(self.floor, int(run.starting_step) - 1)

    def _guard(self, work: Any) -> Any:
        """Run `work`; a W&B failure turns W&B off for this run with one warning (the dia run goes on)."""
        try:
            return work()
        except Exception as exc:
            self.failed = True
            run, self.run = self.run, None
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            warnings.warn(
                f"{self.run_name}: W&B failed ({type(exc).__name__}: {text}); the run goes on and its folder "
                "has every result; its W&B run stops here",
                stacklevel=3,
            )
            if run is not None:
                with contextlib.suppress(Exception):  # already failing: the warning above says so
                    run.finish(exit_code=1)
            return None


# ---- what goes into the run -------------------------------------------------------------------------


def tags_of(cfg: Any) -> list[str]:
    """`logger.wandb.tags` and the run's coordinates as `key:value` (as dia.grid tags its cells), no duplicates."""
    tags = [str(t) for t in cfg.logger.wandb.tags]
    for key, path in COORDINATES:
        value = OmegaConf.select(cfg, path)
        if value is not None:
            tags.append(f"{key}:{format_value(value)}")
    steps = OmegaConf.select(cfg, "client.local_steps", default=1)
    if steps != 1:  # FedAvg: T local steps (FedSGD runs keep the tags they always had)
        tags.append(f"client.local_steps:{steps}")
    return list(dict.fromkeys(tags))


def sweep_name(cfg: Any, sweep_id: str) -> str:
    """The name of the sweep a W&B agent's run belongs to (a grid, or a grid's block: `paper-mnist-cifar10`),
    asked from W&B with the ids the agent sets (the agent passes no name); if W&B cannot say, the results folder
    the sweep files' command writes to (`run.output_dir=results/<grid>`: dia.grid's group for the same cells)."""
    import wandb

    path = "/".join(p for p in (os.environ.get("WANDB_ENTITY"), os.environ.get("WANDB_PROJECT"), sweep_id) if p)
    try:
        name = wandb.Api(timeout=20).sweep(path).name
    except Exception:
        name = None
    return str(name or Path(str(cfg.run.output_dir)).resolve().name)


def _sweep_parameters() -> dict[str, Any]:
    """The sweep parameters the agent wrote for this run (`WANDB_SWEEP_PARAM_PATH`, {key: {value: v}})."""
    import yaml

    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    try:
        data = yaml.safe_load(Path(path).read_text()) if path else None
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for k, v in (data or {}).items() if k != "wandb_version"}


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def summary_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """The W&B summary of a finished run from its metrics.json content: every scalar (status, wall time,
    iterations, device, ...), the defense, `final/<metric>` for each mean metric (mask measures included), and
    `victims/<status>`: how many victims ended in each engine status."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (str, int, float, bool))}
    if isinstance(metrics.get("defense"), dict):
        out["defense"] = metrics["defense"]
    out.update({f"final/{k}": v for k, v in metrics.get("mean", {}).items() if v is not None})
    counts = Counter(r.get("status") for r in metrics.get("victims", []))
    out.update({f"victims/{s}": counts.get(s, 0) for s in STATUS if s != "running"})
    return out


def to_image(x: Any, caption: str | None = None) -> Any:
    """A wandb.Image of one image in [0, 1], (C, H, W): as 8-bit pixels round(255 x), since wandb takes
    arrays as values in [0, 255] (floats in [0, 1] would be cast to 0 and 1: a black image)."""
    import torch
    import wandb

    pixels = (x.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    return wandb.Image(array[..., 0] if array.shape[-1] == 1 else array, caption=caption)


def victim_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The victim table's columns: index and label, the run's other per-victim fields, then the metrics
    (dia.metrics' table, mask measures per part included) that some victim has a value of."""
    metrics = list(mean_metrics(rows))
    first = [c for c in ("index", "label") if any(c in r for r in rows)]
    rest = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in metrics and k not in first]
    return first + rest + [m for m in metrics if any(r.get(m) is not None for r in rows)]


def victim_table(rows: list[dict[str, Any]], originals: Any = None, reconstructions: Any = None) -> Any:
    """metrics.json's per-victim rows as a wandb.Table, with `original` and `reconstruction` image columns
    when the images (in [0, 1], victim order) are given."""
    import wandb

    columns = victim_columns(rows)
    data = [[r.get(c) for c in columns] for r in rows]
    if originals is not None and reconstructions is not None:
        columns = columns + ["original", "reconstruction"]
        data = [row + [to_image(originals[i]), to_image(reconstructions[i])] for i, row in enumerate(data)]
    return wandb.Table(columns=columns, data=data)


# ---- reading offline runs back (W&B's own reader) ---------------------------------------------------


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """What one offline W&B run directory (`.../wandb/offline-run-*`) holds, read by W&B's own reader of its
    transaction log (`wandb leet inspect --json`, one JSON object per record):

    {"run": the run record (run_id, group, tags, sweep_id, start_time, ...), "config", "history" (rows, in
    order), "summary" (the last value of each key), "stats" (system-metrics samples), "console" (the captured
    output), "artifacts" (artifact records: a table with media is one), "preempting" (marked so),
    "exit_code" (None when the process never finished the run)}."""
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wandb leet inspect {run_dir}: {proc.stderr.strip()[:300]}")
    out: dict[str, Any] = {
        "run": {},
        "config": {},
        "history": [],
        "summary": {},
        "stats": [],
        "console": [],
        "artifacts": [],
        "preempting": False,
        "exit_code": None,
    }
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        rtype, body = record.get("type"), record.get(record.get("type"), {})
        if rtype == "run":
            out["run"] = body
            out["config"].update(body.get("config", {}).get("update", {}))
        elif rtype == "config":
            out["config"].update(body.get("update", {}))
        elif rtype == "history":
            out["history"].append(body.get("item", {}))
        elif rtype == "summary":
            out["summary"].update(body.get("update", {}))
        elif rtype == "stats":
            out["stats"].append(body.get("item", {}))
        elif rtype == "artifact":
            out["artifacts"].append(body)
        elif rtype == "output_raw":
            out["console"].append(body.get("line", ""))
        elif rtype == "preempting":
            out["preempting"] = True
        elif rtype == "exit":
            out["exit_code"] = int(body.get("exit_code", 0))
    out["console"] = "".join(out["console"])
    return out


def read_offline_runs(wandb_dir: Path) -> list[dict[str, Any]]:
    """Every offline run directory under a run folder's `wandb/`, in start order (as `wandb sync` uploads
    the directories of one resumed run), each as `read_offline_run` reads it."""
    runs = [read_offline_run(d) for d in Path(wandb_dir).glob("offline-run-*") if d.is_dir()]
    return sorted(runs, key=lambda r: r["run"].get("start_time", ""))


def read_offline_file(run_dir: Path, row: dict[str, Any], key: str) -> Any:
    """A media value logged under `key` in a `read_offline_run` history (or summary) row: a table
    (`table-file`) as {"columns", "data"}; an image (`image-file`) as the path of its PNG file."""
    entry = row.get(key)
    if not isinstance(entry, dict):  # W&B's reader flattens a media value's fields to `<key>.<field>`
        entry = {k[len(key) + 1 :]: v for k, v in row.items() if k.startswith(f"{key}.")}
    if "path" not in entry:
        raise KeyError(f"no media logged under '{key}'")
    path = Path(run_dir) / "files" / entry["path"]
    if entry.get("_type") == "image-file":
        return path
    return json.loads(path.read_text())
