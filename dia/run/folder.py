"""A run's folder and its state on disk, under a lock.

    <root>/<name>/            done: every result file, written last by one rename
    <root>/.<name>.partial/   partial: config.yaml, checkpoint.pt, curves.jsonl, wandb-id (resumable)
    <root>/.<name>.lock       held (flock) by the one process working on the run; removed when it is done

State is `done` (the final folder holds metrics.json), `partial` (the hidden folder) or `pending`. A final
folder without metrics.json (made by hand, or left by something else) is not a finished run: it is never
skipped as done, and a run of that name is refused until it is moved away (it is not ours to replace).
A run folder is never deleted by a failure: only `finish()` (rename to the final place) and an explicit
`--force` of dia.grid remove anything. The lock is an OS file lock: it dies with its process (kill -9
included), so a stale lock never blocks a rerun.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from dia.config import check_name
from dia.errors import UserError
from dia.run import record

DONE, PARTIAL, PENDING = "done", "partial", "pending"


NOT_IDENTITY = ("logger", "run.output_dir", "run.progress")  # where a run lies, how it is shown and logged


def identity(config_text: str) -> object:
    """What makes a run this run: its saved config without `NOT_IDENTITY` (W&B settings, the folder it lies
    in, the progress bar), so changing a W&B project or moving a results folder resumes the same run."""
    data = yaml.safe_load(config_text)
    if isinstance(data, dict):
        for dotted in NOT_IDENTITY:
            head, _, tail = dotted.partition(".")
            if not tail:
                data.pop(head, None)
            elif isinstance(data.get(head), dict):
                data[head].pop(tail, None)
    return data


def fingerprint(config_text: str) -> str:
    """A hash of `identity` (sha256 hex): unnamed runs' names and checkpoints carry it."""
    return hashlib.sha256(json.dumps(identity(config_text), sort_keys=True, default=str).encode()).hexdigest()


def default_name(attack: str, model: str, data: str, dropout: float, config_text: str, steps: int = 1) -> str:
    """The name of an unnamed run: readable coordinates (FedAvg's T local steps when T > 1) plus a hash of its
    identity, so rerunning the same command (with any W&B settings) finds and resumes its unfinished folder."""
    local = f"-T{steps}" if steps > 1 else ""
    return f"{attack}-{model}-{data}-p{dropout:g}{local}-{fingerprint(config_text)[:8]}"


def run_name(cfg: Any, config_text: str) -> str:
    """The folder name of the run of `cfg` (saved as `config_text`): `run.name`, or `default_name`."""
    return cfg.run.name or default_name(
        cfg.attack.name, cfg.model.name, cfg.data.name, cfg.model.dropout, config_text, cfg.client.local_steps
    )


class AlreadyDone(Exception):
    """The run asked for is finished: its folder (the same run: the same config) holds its metrics.json."""

    def __init__(self, folder: Path, metrics: dict[str, Any]) -> None:
        super().__init__(f"already done: '{folder}' holds this config's finished run")
        self.folder, self.metrics = folder, metrics


def check_not_done(folder: RunFolder, config_text: str) -> None:
    """A finished run of this config: `AlreadyDone` (its results stand); of another config: one line (exit 2)."""
    if folder.is_done_as(config_text):
        raise AlreadyDone(folder.final, finished_metrics(folder.final))
    if folder.state == DONE:
        raise UserError(
            f"run.name: '{folder.final}' already exists, a finished run of another config; choose another run.name"
        )


def check_done(cfg: Any) -> None:
    """`AlreadyDone` when the run of `cfg` is finished (the same name and the same config); cheap: no torch. Not for
    `data.normalize=folder` (its saved config holds statistics computed from the images: dia.run.runs.open_run)."""
    if cfg.data.normalize == "folder":
        return
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(cfg)
    folder = RunFolder(Path(cfg.run.output_dir), run_name(cfg, text))
    if folder.is_done_as(text):
        raise AlreadyDone(folder.final, finished_metrics(folder.final))


def finished_metrics(final: Path) -> dict[str, Any]:
    """The metrics.json of a finished run's folder `final`; one UserError line when it cannot be read."""
    try:
        return record.read_metrics(final)
    except ValueError as exc:
        raise UserError(f"run.name: '{final}' holds a metrics.json dia cannot read ({exc}); move it away") from None


def same_config(a: str, b: str) -> bool:
    """Two saved configs describe the same run: equal but for `NOT_IDENTITY`."""
    try:
        return a == b or identity(a) == identity(b)
    except (yaml.YAMLError, RecursionError):
        return False


class RunFolder:
    """One run's folders and lock (see the module docstring)."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = Path(root)
        check_name(name)
        self.name = name
        self.final = self.root / name
        self.partial = self.root / f".{name}.partial"
        self.lock_path = self.root / f".{name}.lock"
        self._lock: int | None = None

    @property
    def state(self) -> str:
        if (self.final / record.METRICS).is_file():
            return DONE
        return PARTIAL if self.partial.is_dir() else PENDING

    def is_done_as(self, config_text: str) -> bool:
        """Finished, and by a run of this config (its saved config.yaml is the same run's)."""
        saved = record.read_config_text(self.final) if self.state == DONE else None
        return saved is not None and same_config(saved, config_text)

    def check_free(self) -> None:
        """A UserError when something not a finished run sits at the final name (the final rename would fail)."""
        if (self.final.exists() or self.final.is_symlink()) and self.state != DONE:
            what = "a folder without metrics.json" if self.final.is_dir() else "a file"
            raise UserError(
                f"run.name={self.name}: '{self.final}' is {what}, not a finished run; move it away "
                "(nothing of it was touched) or choose another run.name"
            )

    def __truediv__(self, name: str) -> Path:
        return self.partial / name

    def acquire(self) -> bool:
        """Take the run's lock without waiting; False when another process holds it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"run.output_dir: cannot write to '{self.root}' ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd
        return True

    def holder(self) -> str:
        """The pid written by the lock's holder, for messages."""
        try:
            return self.lock_path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None

    def open(self, config_text: str) -> bool:
        """Create the partial folder, or reopen it when it holds the same config; True when resuming.

        Call with the lock held. A partial folder of another config is refused (never replaced: it may
        hold someone's checkpoint).
        """
        self.check_free()
        saved = self.partial / record.CONFIG
        if self.partial.is_dir():
            text = record.read_config_text(self.partial)
            if text is not None and same_config(text, config_text):
                if text != config_text:  # other W&B settings or folder: the saved config says what this process does
                    record.write_config(self.partial, config_text)
                return True
            raise UserError(
                f"run.name={self.name}: '{self.partial}' holds an unfinished run of another config; "
                f"resume it with `python -m dia.train --config {saved}`, delete it, or choose another run.name"
            )
        try:
            self.partial.mkdir()
        except OSError as exc:
            raise UserError(f"run.output_dir: cannot write to '{self.root}' ({exc.strerror or exc})") from None
        return False

    def finish(self) -> Path:
        """Move the complete partial folder to its final place (one rename: readers see all or nothing),
        and drop the lock file (a process that still gets the lock then finds the run done)."""
        os.replace(self.partial, self.final)
        self.lock_path.unlink(missing_ok=True)
        return self.final
