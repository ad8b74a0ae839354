"""One run (a *cell* of a grid): its config, folder, checkpoint; its victims -> clients -> problems; its
evaluation and result files. How its problems are attacked (alone or packed with other runs' problems)
is dia.run.pack's business; this module is everything else a run owns.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dia import defenses
from dia import metrics as M
from dia.data import Victims, folder_statistics
from dia.engine import AttackResult
from dia.errors import UserError
from dia.models import site_parts
from dia.problems import Problems
from dia.run import checks, tracking
from dia.run.checkpoint import Checkpoint
from dia.run.files import save_tensors, write_json, write_text
from dia.run.folder import RunFolder, default_name
from dia.run.plotting import reconstruction_grid
from dia.run.summary import METRICS, mean_metrics

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
class Cell:
    """One run: its config and folder; `problems` etc. are filled by `prepare` when its turn comes."""

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
    wandb: tracking.LiveRun | None = None  # the run's live W&B run (dia.run.tracking); None: logger.wandb.mode=disabled

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def num_problems(self) -> int:
        return num_problems(self.cfg)


def check(cfg: DictConfig, *, memo: dict[str, Any] | None = None) -> None:
    """What can be checked before anything is written (the same checks `dia.grid --validate` runs): the
    device here, the data (victims in range, labels, batches) and the W&B login (dia.run.checks)."""
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


def open_cell(cfg: DictConfig) -> Cell:
    """Check `cfg`, lock its run folder and open it (resuming an unfinished one of the same config)."""
    check(cfg)
    if cfg.data.normalize == "folder":  # computed once and written into the saved config
        cfg.data.mean, cfg.data.std = folder_statistics(cfg.data)
        cfg.data.normalize = "dataset"
    text = OmegaConf.to_yaml(cfg)
    name = cfg.run.name or default_name(
        cfg.attack.name, cfg.model.name, cfg.data.name, cfg.model.dropout, text, cfg.client.local_steps
    )
    folder = RunFolder(Path(cfg.run.output_dir), name)
    if folder.state == "done":
        raise UserError(f"run.name: '{folder.final}' already exists; choose another run.name")
    if not folder.acquire():
        raise UserError(
            f"run.name={name}: being run by another process (pid {folder.holder()}, lock '{folder.lock_path}'); "
            "wait for it or choose another run.name"
        )
    try:
        if folder.state == "done":  # finished while we waited for the lock
            raise UserError(f"run.name: '{folder.final}' already exists; choose another run.name")
        resumed = folder.open(text)
        if not resumed:
            write_text(folder / "config.yaml", text)
        checkpoint = Checkpoint(folder / "checkpoint.pt", persist=cfg.run.checkpoint_every >= 0)
        use_compile_cache(cfg)
    except BaseException:
        folder.release()
        raise
    return Cell(
        cfg=cfg,
        folder=folder,
        device=resolve_device(cfg.run.device),
        config_text=text,
        checkpoint=checkpoint,
        resumed=resumed,
        wandb=tracking.open_run(cfg, folder.partial, name),
    )


def prepare(cell: Cell) -> Cell:
    """Victims, the client's model, and the clients' gradients (the problems) of `cell`, in place.

    Bad input found here (unreadable images, say) leaves nothing behind for a run that had just begun."""
    try:
        return _prepare(cell)
    except UserError:
        if not cell.resumed and not (cell.checkpoint is not None and cell.checkpoint.path.exists()):
            shutil.rmtree(cell.folder.partial, ignore_errors=True)  # only its config.yaml: nothing ran yet
            cell.folder.lock_path.unlink(missing_ok=True)  # we hold it; a waiting process finds no run
        raise


def _prepare(cell: Cell) -> Cell:
    from dia.api import simulate

    sim = simulate(config=cell.cfg)
    cell.victims, cell.model, cell.problems, cell.mean, cell.std = (
        sim.victims,
        sim.model,
        sim.problems,
        sim.mean,
        sim.std,
    )
    return cell


def release(cell: Cell) -> None:
    """Drop the cell's tensors and its lock."""
    cell.victims = cell.model = cell.problems = None
    if cell.wandb is not None:
        cell.wandb.close()  # left open: the run stopped (75/130) or failed (1); a written run's is finished already
    cell.folder.release()


# ---- evaluation ------------------------------------------------------------------------------------


def evaluate(
    result: AttackResult,
    problems: Problems,
    originals: torch.Tensor | None,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    lpips_fn: Any,
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Per-victim metrics and the matched normalized reconstructions (N, C, H, W), in victim order.

    Victims of one problem share its loss, status and mask recovery. Without `originals` (an attacked update
    whose images nobody has) the image metrics are None and the reconstructions keep the attack's order.
    """
    b = problems.input_shape[0]
    rec01 = (result.x * std + mean).clamp(0, 1)
    if originals is None:
        perms = [torch.arange(b)] * result.x.shape[0]
        rec_n = result.x.flatten(0, 1)
        values: dict[str, Any] = dict.fromkeys(("mse", "psnr", "ssim", "lpips"))
    else:
        # A shared gradient does not say which reconstruction is which image: match them within each batch.
        perms = M.match_problems(rec01, originals)
        rec_n = torch.cat([result.x[k][p] for k, p in enumerate(perms)])
        rec, orig = (rec_n * std + mean).clamp(0, 1), originals
        values = {"mse": M.mse(rec_n, (originals - mean) / std), "psnr": M.psnr(rec, orig), "ssim": M.ssim(rec, orig)}
        values["lpips"] = lpips_fn(rec, orig) if lpips_fn is not None else None
    masks: dict[str, torch.Tensor] = {}
    if result.masks and problems.true_masks:  # recovered masks follow the reconstructions' order
        rows = [mask_rows(p, problems) for p in perms]
        ordered = {n: torch.stack([m[k][r] for k, r in enumerate(rows)]) for n, m in result.masks.items()}
        masks = M.mask_measures(ordered, problems.true_masks, site_parts(ordered), problems.rates)
    if result.rates:  # the learned dropout rate per problem, the mean over its sites (attack.rate=learn)
        masks["mask_rate"] = torch.stack(list(result.rates.values())).mean(0)
    rows = []
    for i in range(rec_n.shape[0]):
        k = i // b
        rows.append(
            {
                "problem": k,
                "matched_reconstruction": int(perms[k][i % b]),
                "status": result.status[k],
                "iterations": int(result.iterations[k]),
                "best_iteration": int(result.best_iteration[k]),
                "loss": float(result.best_loss[k]),
                **{m: (None if v is None else float(v[i])) for m, v in values.items()},
                **dict.fromkeys(M.MASK_KEYS),
                **{m: (None if v[k].isnan() else float(v[k])) for m, v in masks.items()},
            }
        )
    return rows, rec_n


def mask_rows(perm: torch.Tensor, problems: Problems) -> torch.Tensor:
    """The rows of a problem's recovered masks in victim order (`perm[i]`: the reconstruction matched to victim i).
    FedAvg: a site's masks are T steps' masks stacked; with the whole batch every step each step is reordered
    alike; with split local batches a reconstruction may be matched across steps, so the slots keep the
    attack's order."""
    local = problems.local
    if local is None:
        return perm
    b = problems.input_shape[0]
    if local.per_step(b) != b:
        return torch.arange(local.steps * local.per_step(b))
    return torch.cat([t * b + torch.as_tensor(perm) for t in range(local.steps)])


@dataclass
class RunOutput:
    folder: Path
    metrics: dict[str, Any]
    wandb_dir: str | None


def lpips_for(cfg: DictConfig) -> Any:
    """The LPIPS function of `metrics.lpips` (auto: AlexNet, at most one download attempt per process)."""
    return None if cfg.metrics.lpips in ("off", "false") else M.load_lpips("alex")


def write(cell: Cell, result: AttackResult) -> RunOutput:
    """Score `result`, write every result file into the partial folder, log the W&B run, then rename; the
    checkpoint goes only after the rename, so a failed rename (something appeared at the final name) keeps it."""
    cfg, victims, problems, mean, std = cell.cfg, cell.victims, cell.problems, cell.mean, cell.std
    originals = None if victims is None else victims.images  # None: a captured update without its images
    rows, matched = evaluate(result, problems, originals, mean, std, lpips_fn=lpips_for(cfg) if victims else None)
    n = len(rows)
    indices, labels = (
        (victims.indices, victims.labels.tolist()) if victims is not None else (list(range(n)), [None] * n)
    )
    for row, index, label, used in zip(rows, indices, labels, problems.labels.flatten().tolist()):
        row.update(index=index, label=label, attack_label=used)
    status = "diverged" if any(r["status"] == "diverged" for r in rows) else "completed"
    summary = {
        "status": status,
        "attack": cfg.attack.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "dropout": cfg.model.dropout,
        "mean": mean_metrics(rows),
        "labels": cfg.attack.labels,
        "defense": defenses.summary(cfg.defense, cfg.attack.model_defense, cfg.client.local_steps),
        "client": dict(cfg.client)
        if problems.local is None
        # the client's training (a captured file's own)
        else {
            "local_steps": problems.local.steps,
            "local_lr": problems.local.lr,
            "local_batch": problems.local.batch or "full",
        },
        "label_accuracy": None if victims is None else sum(r["label"] == r["attack_label"] for r in rows) / len(rows),
        "iterations": max(r["iterations"] for r in rows),
        "max_iterations": cfg.attack.max_iterations,
        "wall_time_s": round(
            cell.checkpoint.elapsed() if cell.checkpoint is not None else time.time() - cell.started, 3
        ),
        "device": str(cell.device),
        "victims": rows,
    }
    rec01 = (matched * std + mean).clamp(0, 1)
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
        save_tensors(cell.folder / "reconstructions.pt", tensors)
    titles = [f"#{r['index']}" + ("" if r["ssim"] is None else f"  SSIM {r['ssim']:.2f}") for r in rows]
    reconstruction_grid(
        cell.folder / "reconstructions.png",
        originals,
        rec01,
        titles,
        title=f"{cfg.attack.name.upper()} on {cfg.model.name}/{cfg.data.name}, p={cfg.model.dropout:g}"
        + (f", T={cfg.client.local_steps}" if cfg.client.local_steps > 1 else ""),
    )
    wandb_dir = (
        None
        if cell.wandb is None
        else cell.wandb.finish(
            summary, figure=cell.folder / "reconstructions.png", originals=originals, reconstructions=rec01
        )
    )
    write_json(cell.folder / "metrics.json", summary)
    final = cell.folder.finish()
    if cell.checkpoint is not None:  # the results are final; the attack state is not needed any more
        (final / cell.checkpoint.path.name).unlink(missing_ok=True)
    if wandb_dir:
        wandb_dir = str(final / Path(wandb_dir).relative_to(cell.folder.partial))
    return RunOutput(final, summary, wandb_dir)


# ---- curves: a file of the partial folder (also sent to the live W&B run) -----------------------------


def append_curves(cell: Cell, rows: list[dict[str, Any]]) -> None:
    """Add curve points ({"iteration": i, name: value, ...}) to the cell's curves.jsonl."""
    with open(cell.folder / "curves.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if cell.wandb is not None:
        cell.wandb.log(rows)  # and to the live W&B run


def read_curves(cell: Cell, upto: int | None = None) -> list[dict[str, Any]]:
    """The cell's curve points (only those at or before iteration `upto`; a torn last line is dropped)."""
    path = cell.folder / "curves.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if upto is None or row.get("iteration", 0) <= upto:
            out.append(row)
    return out


def trim_curves(cell: Cell) -> None:
    """On resume: keep the points of finished groups and of the running group up to its checkpoint."""
    ckpt = cell.checkpoint
    done = set(ckpt.done) if ckpt is not None else set()
    running, upto = (ckpt.running, ckpt.iteration) if ckpt is not None and ckpt.state is not None else (None, 0)
    rows = [
        r
        for r in read_curves(cell)
        if r.get("group", 0) in done or (r.get("group", 0) == running and r.get("iteration", 0) <= upto)
    ]
    write_text(cell.folder / "curves.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


__all__ = [
    "Cell",
    "RunOutput",
    "check",
    "open_cell",
    "prepare",
    "release",
    "evaluate",
    "write",
    "resolve_device",
    "num_problems",
    "METRICS",
]
