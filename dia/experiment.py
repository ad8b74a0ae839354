"""One experiment: victims -> simulated clients -> attack (Lightning) -> metrics -> run folder."""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.environments import LightningEnvironment
import torch
from omegaconf import DictConfig, OmegaConf

from dia import metrics as M
from dia.attacks import ATTACKS, AttackResult, InvertingGradients
from dia.checkpoint import Checkpoint, CheckpointEvery, Preempted
from dia.data import folder_statistics, load_victims, normalizer
from dia.errors import UserError
from dia.models import build_for, site_parts
from dia.plotting import reconstruction_grid
from dia.problems import Problems, infer_labels, simulate_clients
from dia.progress import AttackProgressBar
from dia.results import RunFolder, save_tensors, write_json, write_text
from dia.tracking import finish, log_reconstructions, log_victim_table, wandb_logger

log = logging.getLogger("dia")
METRICS = ("mse", "psnr", "ssim", "lpips", *M.MASK_KEYS)  # and the per-part mask measures a row has


@dataclass
class RunOutput:
    folder: Path
    metrics: dict[str, Any]
    wandb_dir: str | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"run.device={name}: CUDA is not available here; use run.device=cpu or auto")
    return device


def run_name(cfg: DictConfig) -> str:
    return cfg.run.name or f"{cfg.attack.name}-{cfg.model.name}-{cfg.data.name}-p{cfg.model.dropout:g}-{uuid.uuid4().hex[:6]}"


def chunks(n: int, size: int) -> list[list[int]]:
    """Consecutive groups of at most `size` problem indices, optimized together."""
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


def auto_parallel(
    cls: type[InvertingGradients], model: torch.nn.Module, problems: Problems, cfg: DictConfig, *,
    lower: torch.Tensor, upper: torch.Tensor, device: torch.device, headroom: float = 0.7,
) -> int:
    """How many problems to optimize at once: all on CPU; on CUDA as many as fit in `headroom` of free memory.

    The memory of one problem is measured: the peak of one iteration with two problems, minus what was
    allocated before, halved.
    """
    n = problems.num_problems
    if device.type != "cuda" or n == 1:
        return n
    probe_n = min(n, 2)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    subset = problems.subset(list(range(probe_n)))
    probe = cls.for_problems(model, subset, cfg.attack, lower=lower, upper=upper).to(device)
    probe.on_fit_start()
    probe.gradient = getattr(probe.gradient, "fn", probe.gradient)  # eager: no compile just to measure
    probe.step()
    torch.cuda.synchronize(device)
    per_problem = max(1, (torch.cuda.max_memory_allocated(device) - base) / probe_n)
    del probe
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    k = max(1, min(n, int(headroom * free / per_problem)))
    log.info("attack.parallel=auto: %d of %d problems at once (%.1f MiB each, %.1f GiB free on %s)",
                k, n, per_problem / 2**20, free / 2**30, torch.cuda.get_device_name(device))
    return k


def attack(
    model: torch.nn.Module, problems: Problems, cfg: DictConfig, *, lower: torch.Tensor, upper: torch.Tensor,
    device: torch.device, logger: Any = None, progress: bool = True, checkpoint: Checkpoint | None = None,
) -> AttackResult:
    """Run the configured attack on every problem (in groups of `attack.parallel`) under a Lightning Trainer.

    With a `checkpoint`, finished groups are skipped, the running group resumes from its saved state, and
    progress is saved every `run.checkpoint_every` iterations and on SIGUSR1/SIGTERM (then `Preempted`).
    """
    cls: type[InvertingGradients] = ATTACKS.get(cfg.attack.name)
    parts: list[AttackResult] = []
    size = checkpoint.group_size if checkpoint is not None and checkpoint.group_size else cfg.attack.parallel
    if size == "auto":
        size = auto_parallel(cls, model, problems, cfg, lower=lower, upper=upper, device=device)
    if checkpoint is not None:
        checkpoint.group_size = int(size)
    for group, index in enumerate(chunks(problems.num_problems, int(size))):
        if checkpoint is not None and group in checkpoint.done:
            parts.append(checkpoint.done[group])
            continue
        subset = problems.subset(index)
        module = cls.for_problems(model, subset, cfg.attack, lower=lower, upper=upper)
        saver = None
        if checkpoint is not None:
            if checkpoint.running == group and checkpoint.state is not None:
                module.resume = checkpoint.state
                log.info("resuming group %d at iteration %d from %s", group, int(checkpoint.state["iteration"]), checkpoint.path)
            saver = CheckpointEvery(checkpoint, group, cfg.run.checkpoint_every)
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=[device.index or 0] if device.type == "cuda" else 1,
            max_epochs=1, logger=logger or False, enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=progress, num_sanity_val_steps=0,
            log_every_n_steps=max(1, cfg.attack.log_every // cfg.attack.iterations_per_step),
            callbacks=([AttackProgressBar(f"{cfg.attack.name.upper()} x{len(index)}", refresh_rate=cfg.attack.check_every)] if progress else [])
            + ([saver] if saver else []),
            plugins=[LightningEnvironment()],  # no SLURM auto-requeue inside Lightning: dia checkpoints itself
        )
        trainer.fit(module)
        if saver is not None and saver.preempted:
            raise Preempted(f"stopped on a signal at iteration {module.done} of group {group}; progress saved in {checkpoint.path}")
        parts.append(module.result())
        if checkpoint is not None:
            checkpoint.finished(group, parts[-1])
    return AttackResult(
        x=torch.cat([p.x for p in parts]),
        masks=None if parts[0].masks is None else {k: torch.cat([p.masks[k] for p in parts]) for k in parts[0].masks},
        best_loss=torch.cat([p.best_loss for p in parts]),
        best_iteration=torch.cat([p.best_iteration for p in parts]),
        iterations=torch.cat([p.iterations for p in parts]),
        status=[s for p in parts for s in p.status],
    )


def evaluate(
    result: AttackResult, problems: Problems, originals: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, lpips_fn: Any
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Per-victim metrics and the matched normalized reconstructions (N, C, H, W), in victim order.

    Victims of one problem share its loss, status and mask recovery.
    """
    b = problems.input_shape[0]
    orig_n = (originals - mean) / std
    # A shared gradient does not say which reconstruction is which image: match them within each batch.
    rec01 = (result.x * std + mean).clamp(0, 1)
    perms = [M.match(rec01[k], originals[k * b : (k + 1) * b]) for k in range(result.x.shape[0])]
    rec_n = torch.cat([result.x[k][p] for k, p in enumerate(perms)])
    rec, orig = (rec_n * std + mean).clamp(0, 1), originals
    values = {"mse": M.mse(rec_n, orig_n), "psnr": M.psnr(rec, orig), "ssim": M.ssim(rec, orig)}
    values["lpips"] = lpips_fn(rec, orig) if lpips_fn is not None else None
    masks: dict[str, torch.Tensor] = {}
    if result.masks and problems.true_masks:  # recovered masks follow the reconstructions' order
        ordered = {n: torch.stack([m[k][p] for k, p in enumerate(perms)]) for n, m in result.masks.items()}
        masks = M.mask_measures(ordered, problems.true_masks, site_parts(ordered), problems.rates)
    rows = []
    for i in range(rec.shape[0]):
        k = i // b
        rows.append({
            "problem": k, "matched_reconstruction": int(perms[k][i % b]), "status": result.status[k], "iterations": int(result.iterations[k]),
            "best_iteration": int(result.best_iteration[k]), "loss": float(result.best_loss[k]),
            **{m: (None if v is None else float(v[i])) for m, v in values.items()},
            **dict.fromkeys(M.MASK_KEYS), **{m: (None if v[k].isnan() else float(v[k])) for m, v in masks.items()},
        })
    return rows, rec_n


def mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for m in [*METRICS, *dict.fromkeys(k for r in rows for k in r if k.startswith("mask_"))]:
        vals = [r[m] for r in rows if r.get(m) is not None]
        out[m] = sum(vals) / len(vals) if vals else None
    return out


def run(cfg: DictConfig) -> RunOutput:
    """Everything `python -m dia.train` does, for one validated config."""
    started = time.time()
    device = resolve_device(cfg.run.device)
    if cfg.data.normalize == "folder":  # computed once and written into the saved config
        cfg.data.mean, cfg.data.std = folder_statistics(cfg.data)
        cfg.data.normalize = "dataset"
    victims = load_victims(cfg.data, indices=None if cfg.victims is None else list(cfg.victims),
                           count=cfg.num_victims, seed=cfg.victim_seed)
    n = len(victims.indices)
    if n % cfg.batch_size:
        raise UserError(f"batch_size={cfg.batch_size}: {n} victims do not split into client batches of that size")
    model = build_for(cfg)
    if victims.labels.max() >= cfg.data.num_classes:
        raise UserError(f"data.num_classes={cfg.data.num_classes} but a victim has label {int(victims.labels.max())}")
    folder = RunFolder(Path(cfg.run.output_dir), run_name(cfg), config_text=OmegaConf.to_yaml(cfg))
    try:
        return _run(cfg, device, victims, model, folder, started)
    except Preempted:
        raise  # keep the partial folder and its checkpoint: rerunning resumes
    except BaseException:
        folder.discard()
        raise


def _run(cfg: DictConfig, device: torch.device, victims: Any, model: torch.nn.Module, folder: RunFolder, started: float) -> RunOutput:
    name = folder.final.name
    write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    checkpoint = Checkpoint(folder / "checkpoint.pt") if cfg.run.checkpoint_every >= 0 else None
    L.seed_everything(cfg.run.seed, verbose=False)
    mean, std = normalizer(cfg.data)
    problems = simulate_clients(model, (victims.images - mean) / std, victims.labels, batch_size=cfg.batch_size, seed=cfg.run.seed)
    if cfg.attack.labels == "infer":
        if cfg.batch_size != 1:
            raise UserError(f"attack.labels=infer supports batch_size=1 only (the last-layer sign rule); got batch_size={cfg.batch_size}")
        problems = replace(problems, labels=infer_labels(problems.targets, cfg.data.num_classes).view(-1, 1))
    if cfg.attack.name == "dia" and not problems.rates:
        warnings.warn("the model has no dropout (p=0 everywhere): DIA has no masks to recover and behaves as IG", stacklevel=1)
    logger = wandb_logger(cfg, save_dir=folder.path, name=name, config=OmegaConf.to_container(cfg))
    result = attack(model, problems, cfg, lower=(0 - mean) / std, upper=(1 - mean) / std, device=device,
                    logger=logger, progress=cfg.run.progress, checkpoint=checkpoint)
    rows, matched = evaluate(result, problems, victims.images, mean, std, lpips_fn=M.load_lpips("alex"))
    for row, index, label, used in zip(rows, victims.indices, victims.labels.tolist(), problems.labels.flatten().tolist()):
        row.update(index=index, label=label, attack_label=used)
    status = "diverged" if any(r["status"] == "diverged" for r in rows) else "completed"
    summary = {
        "status": status, "attack": cfg.attack.name, "model": cfg.model.name, "data": cfg.data.name,
        "dropout": cfg.model.dropout, "mean": mean_metrics(rows), "labels": cfg.attack.labels,
        "label_accuracy": sum(r["label"] == r["attack_label"] for r in rows) / len(rows),
        "iterations": max(r["iterations"] for r in rows), "wall_time_s": round(time.time() - started, 3),
        "device": str(device), "victims": rows,
    }
    rec01 = (matched * std + mean).clamp(0, 1)
    if cfg.run.save_tensors:
        tensors = {"reconstructions": rec01, "reconstructions_normalized": matched,
                   "originals": victims.images, "labels": victims.labels, "indices": torch.tensor(victims.indices)}
        tensors.update({f"masks/{k}": v for k, v in (result.masks or {}).items()})
        save_tensors(folder / "reconstructions.pt", tensors)
    titles = [f"#{r['index']}  SSIM {r['ssim']:.2f}" for r in rows]
    reconstruction_grid(folder / "reconstructions.png", victims.images, rec01, titles,
                        title=f"{cfg.attack.name.upper()} on {cfg.model.name}/{cfg.data.name}, p={cfg.model.dropout:g}")
    log_reconstructions(logger, victims.images, rec01, captions=titles)
    log_victim_table(logger, rows)
    wandb_dir = finish(logger, {f"final/{k}": v for k, v in summary["mean"].items() if v is not None} | {"status": status})
    write_json(folder / "metrics.json", summary)
    if checkpoint is not None and checkpoint.path.exists():
        checkpoint.path.unlink()  # the results are final; the attack state is not needed any more
    final = folder.finish()
    if wandb_dir:
        wandb_dir = str(final / Path(wandb_dir).relative_to(folder.final.parent / f".{name}.partial"))
    return RunOutput(final, summary, wandb_dir)
