"""One run of a config: its folder, checkpoint and loggers; its clients (victims -> model -> problems, prepared
when its turn comes); its score and result files. How its problems are attacked (alone or packed with other
runs' problems) is dia.run.pack's business; the run contract that drives runs is dia.run.contract.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dia import clients, config, defenses
from dia.attacks import ATTACKS
from dia.data import Victims, folder_statistics
from dia.engine import AttackResult
from dia.errors import UserError
from dia.problems import Problems
from dia.run import checks, record
from dia.run.checkpoint import Checkpoint
from dia.run.folder import RunFolder, check_not_done, run_name
from dia.run.loggers import Loggers, open_loggers
from dia.scores import score

log = logging.getLogger("dia")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"run.device={name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"run.device={name}: CUDA is not available here; use run.device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"run.device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def num_problems(cfg: DictConfig) -> int:
    """How many problems (client gradients) a run attacks, from its config alone."""
    if cfg.captured.file is not None:
        return 1  # one captured update
    n = len(cfg.victims) if cfg.victims is not None else cfg.num_victims
    return n // cfg.batch_size


@dataclass(eq=False)  # a run is itself: hashable by identity
class Run:
    """One run: its config, folder and loggers; `problems` etc. are filled by `prepare` when its turn comes."""

    cfg: DictConfig
    folder: RunFolder
    device: torch.device
    config_text: str
    checkpoint: Checkpoint | None = None  # what is finished and where the running group stands
    resumed: bool = False
    started: float = field(default_factory=time.time)
    victims: Victims | None = None
    model: torch.nn.Module | None = None
    problems: Problems | None = None  # the client's truth included (evaluation only)
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    loggers: Loggers = field(default_factory=lambda: Loggers([]))  # W&B and the others (dia.run.loggers)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def num_problems(self) -> int:
        return num_problems(self.cfg)


def check(cfg: DictConfig, *, memo: dict[str, Any] | None = None) -> None:
    """What can be checked before anything is written (the same checks `dia.grid --validate` runs): the code's
    own checks of the config (the attack's settings, model, data source, defense, loggers: dia.config.check_code),
    the device here, the data (victims in range, labels, batches) and the W&B login (dia.run.checks)."""
    config.check_code(cfg)
    resolve_device(cfg.run.device)
    checks.check(cfg, memo=memo)


def use_compile_cache(cfg: DictConfig) -> Path | None:
    """Point torch.compile's persistent caches (Inductor's FX graphs, AOTAutograd, Triton kernels) at
    `run.compile_cache` (default `<run.output_dir>/.compile-cache`), so a later process, a resumed run or
    the next cell of a grid compiles from cache. A TORCHINDUCTOR_CACHE_DIR set by the user wins; `off`
    leaves torch's own default (under /tmp)."""
    global _COMPILE_CACHE_SET
    if cfg.run.compile_cache == "off" or cfg.attack.compile is False:
        return None
    # importing Lightning makes torch write its own default into the variable: only another value is the user's
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, _COMPILE_CACHE_SET, _torch_cache_default()):
        folder = Path(cfg.run.compile_cache or Path(cfg.run.output_dir) / ".compile-cache")
        # torch creates it when it compiles: a run stopped by bad input before that leaves nothing behind
        above = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if (folder.exists() and not folder.is_dir()) or (above is not None and not os.access(above, os.W_OK | os.X_OK)):
            if not cfg.run.compile_cache:  # the default, inside the run folders' root: that is what fails
                raise UserError(
                    f"run.output_dir: cannot write to '{cfg.run.output_dir}' (its .compile-cache cannot be created: "
                    "not a writable folder)"
                )
            raise UserError(f"run.compile_cache: cannot create '{folder}' (not a writable folder)")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = _COMPILE_CACHE_SET = str(folder.resolve())
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


_COMPILE_CACHE_SET: str | None = None  # the TORCHINDUCTOR_CACHE_DIR use_compile_cache set in this process


def _torch_cache_default() -> str | None:
    """The folder torch puts in TORCHINDUCTOR_CACHE_DIR when nobody set it (None if torch does not say)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except Exception:
        return None


def open_run(cfg: DictConfig) -> Run:
    """Check `cfg`, lock its run folder and open it (resuming an unfinished one of the same config)."""
    check(cfg)
    if cfg.data.normalize == "folder":  # computed once and written into the saved config
        cfg.data.mean, cfg.data.std = folder_statistics(cfg.data)
        cfg.data.normalize = "dataset"
    text = OmegaConf.to_yaml(cfg)
    name = run_name(cfg, text)
    folder = RunFolder(Path(cfg.run.output_dir), name)
    check_not_done(folder, text)
    use_compile_cache(cfg)  # a compile cache that cannot be made: one line before the folder exists
    if not folder.acquire():
        raise UserError(
            f"run.name={name}: being run by another process (pid {folder.holder()}, lock '{folder.lock_path}'); "
            "wait for it or choose another run.name"
        )
    ours = not folder.partial.is_dir()  # nothing of this run was there: what fails here leaves nothing behind
    try:
        check_not_done(folder, text)  # finished while we waited for the lock
        resumed = folder.open(text)
        if not resumed:
            record.write_config(folder.partial, text)
        checkpoint = Checkpoint(folder / "checkpoint.pt", persist=cfg.run.checkpoint_every >= 0)
    except BaseException:
        if ours:  # we hold the lock: no other process is in there
            shutil.rmtree(folder.partial, ignore_errors=True)
            folder.lock_path.unlink(missing_ok=True)
        folder.release()
        raise
    return Run(
        cfg=cfg,
        folder=folder,
        device=resolve_device(cfg.run.device),
        config_text=text,
        checkpoint=checkpoint,
        resumed=resumed,
        loggers=open_loggers(cfg, folder.partial, name),
    )


def prepare(run: Run) -> Run:
    """Victims, the client's model, and the clients' gradients (the problems) of `run`, in place.

    Bad input found here (unreadable images, say) leaves nothing behind for a run that had just begun."""
    try:
        return _prepare(run)
    except UserError:
        if not run.resumed and not (run.checkpoint is not None and run.checkpoint.path.exists()):
            shutil.rmtree(run.folder.partial, ignore_errors=True)  # only its config.yaml: nothing ran yet
            run.folder.lock_path.unlink(missing_ok=True)  # we hold it; a waiting process finds no run
        raise


def _prepare(run: Run) -> Run:
    sim = clients.simulate(run.cfg)
    ATTACKS.get(run.cfg.attack.name).view(sim.problems)  # an oracle without the client's masks: one line, now
    run.victims, run.model, run.problems, run.mean, run.std = sim.victims, sim.model, sim.problems, sim.mean, sim.std
    return run


def release(run: Run) -> None:
    """Drop the run's tensors and its lock."""
    run.victims = run.model = run.problems = None
    run.loggers.close()  # left open: the run stopped (75/130) or failed (1); a written run's are finished already
    run.folder.release()


@dataclass
class RunOutput:
    folder: Path
    metrics: dict[str, Any]
    logged: dict[str, str] = field(default_factory=dict)  # logger name -> where it put the run (in the folder)


def write(run: Run, result: AttackResult) -> RunOutput:
    """Score `result`, write every result file into the partial folder (dia.run.record), give the loggers the
    run, then rename; the checkpoint goes only after the rename, so a failed rename (something appeared at the
    final name) keeps it."""
    cfg, victims, problems, mean, std = run.cfg, run.victims, run.problems, run.mean, run.std
    originals = None if victims is None else victims.images  # None: a captured update without its images
    skip = ("lpips",) if cfg.metrics.lpips in ("off", "false") else ()
    rows, matched = score(result, problems, originals, mean, std, skip=skip)
    n = len(rows)
    indices, labels = (
        (victims.indices, victims.labels.tolist()) if victims is not None else (list(range(n)), [None] * n)
    )
    for row, index, label in zip(rows, indices, labels):  # the label its matched reconstruction was attacked with
        used = int(problems.labels[row["problem"], row["matched_reconstruction"]])
        row.update(index=index, label=label, attack_label=used)
    local = problems.local  # the client's training (a captured file's own)
    summary = record.summary(
        status="diverged" if any(r["status"] == "diverged" for r in rows) else "completed",
        attack=cfg.attack.name,
        model=cfg.model.name,
        data=cfg.data.name,
        dropout=cfg.model.dropout,
        rows=rows,
        labels=cfg.attack.labels,
        defense=defenses.summary(cfg.defense, cfg.attack.model_defense, cfg.client.local_steps),
        client=dict(cfg.client)
        if local is None
        else {"local_steps": local.steps, "local_lr": local.lr, "local_batch": local.batch or "full"},
        label_accuracy=None if victims is None else sum(r["label"] == r["attack_label"] for r in rows) / len(rows),
        iterations=max(r["iterations"] for r in rows),
        max_iterations=cfg.attack.max_iterations,
        wall_time_s=round(run.checkpoint.elapsed() if run.checkpoint is not None else time.time() - run.started, 3),
        device=str(run.device),
    )
    rec01 = (matched * std + mean).clamp(0, 1)
    folder = run.folder.partial
    if cfg.run.save_tensors:
        tensors = {
            "reconstructions": rec01,
            "reconstructions_normalized": matched,
            "indices": torch.tensor(indices),
            "labels": problems.labels.flatten() if victims is None else victims.labels,
        }
        if originals is not None:
            tensors["originals"] = originals
        tensors.update({f"masks/{k}": v for k, v in (result.masks or {}).items()})
        tensors.update({f"rates/{k}": v for k, v in (result.rates or {}).items()})
        record.write_tensors(folder, tensors)
    title = record.picture_title(
        cfg.attack.name, cfg.model.name, cfg.data.name, cfg.model.dropout, cfg.client.local_steps
    )
    figure = record.write_picture(folder, originals, rec01, record.titles(rows, problems.input_shape[0]), title=title)
    logged = run.loggers.finish(summary, figure=figure, originals=originals, reconstructions=rec01)
    record.write_metrics(folder, summary)
    final = run.folder.finish()
    if run.checkpoint is not None:  # the results are final; the attack state is not needed any more
        (final / run.checkpoint.path.name).unlink(missing_ok=True)
    logged = {k: str(final / Path(v).relative_to(folder)) for k, v in logged.items() if Path(v).is_relative_to(folder)}
    return RunOutput(final, summary, logged)


def trim_curves(run: Run) -> None:
    """On resume: keep the curve points of finished groups and of the running group up to its checkpoint."""
    ckpt = run.checkpoint
    done = set(ckpt.done) if ckpt is not None else set()
    running, upto = (ckpt.running, ckpt.iteration) if ckpt is not None and ckpt.state is not None else (None, 0)
    record.keep_curves(
        run.folder.partial,
        lambda p: p.get("group", 0) in done or (p.get("group", 0) == running and p.get("iteration", 0) <= upto),
    )


__all__ = [
    "Run",
    "RunOutput",
    "check",
    "open_run",
    "prepare",
    "release",
    "write",
    "trim_curves",
    "resolve_device",
    "num_problems",
    "use_compile_cache",
]
