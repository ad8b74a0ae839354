"""Reconstruction quality as pure functions over N images (and LPIPS, which needs backbone weights).

Image metrics take [0, 1] images (N, C, H, W) and return (N,); MSE is taken in normalized space as
the paper's code reports it.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and torchmetrics load when a metric is computed: the table itself is cheap to import
    import torch
    from torch import Tensor


def mse(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).pow(2).flatten(1).mean(1)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(x: Tensor, y: Tensor) -> Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")


def match(reconstructions: Tensor, originals: Tensor) -> Tensor:
    """Which reconstruction belongs to which original, for one batch of B images (order is lost in a gradient).

    Optimal assignment (Hungarian, scipy) maximizing the total SSIM; returns perm with
    reconstructions[perm[i]] matched to originals[i].
    """
    import torch
    from scipy.optimize import linear_sum_assignment

    b = originals.shape[0]
    if b == 1:
        return torch.zeros(1, dtype=torch.long)
    rec = reconstructions.repeat_interleave(b, dim=0)  # pairs (r, o) for all r, o
    orig = originals.repeat(b, 1, 1, 1)
    score = ssim(rec, orig).view(b, b)  # score[r, o]
    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    perm = torch.empty(b, dtype=torch.long)
    perm[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return perm


def match_problems(reconstructions: Tensor, originals: Tensor) -> list[Tensor]:
    """`match` for every problem: reconstructions (K, B, C, H, W) in [0, 1], originals (K * B, C, H, W)."""
    b = reconstructions.shape[1]
    return [match(rec, originals[k * b : (k + 1) * b]) for k, rec in enumerate(reconstructions)]


def problem_ssim(reconstructions: Tensor, originals: Tensor) -> Tensor:
    """Mean SSIM per problem (K,) of reconstructions (K, B, C, H, W) in [0, 1] against their originals
    (K * B, C, H, W), each batch matched first (`match_problems`)."""
    import torch

    b = reconstructions.shape[1]
    return torch.stack(
        [
            ssim(rec[perm], originals[k * b : (k + 1) * b]).mean()
            for k, (rec, perm) in enumerate(zip(reconstructions, match_problems(reconstructions, originals)))
        ]
    )


MASK_MEASURES = ("recall", "precision", "bal_acc", "accuracy")
# The keys `mask_measures` always returns: each measure, then its all-keep and initialisation baselines.
MASK_KEYS = tuple(f"mask_{m}{s}" for m in MASK_MEASURES for s in ("", "_keep_all", "_init"))


@dataclass(frozen=True)
class Metric:
    """One per-victim measure of a run: its key (metrics.json, curves, loggers), how tables and figures label it,
    whether higher is better, and how one value is printed. `brief`: in one-line summaries; `column`: a
    column of the tables (dia.report's, and dia.train's console table unless not `console`: that one fits 120
    columns, so the mask measures' baselines stay out of it); every metric is in metrics.json and the loggers.

    An image metric has `fn(reconstructions, originals) -> (N,)` on [0, 1] images, or on normalized images
    with `normalized` (MSE, as the paper's code reports it); `fn` may return None (LPIPS without its backbone).
    Mask measures have no `fn`: `mask_measures` computes them together."""

    key: str
    label: str
    higher_is_better: bool
    fmt: str
    brief: bool = False
    column: bool = True
    console: bool = True
    fn: Callable[[Tensor, Tensor], Tensor | None] | None = None
    normalized: bool = False

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def format(self, value: float | None) -> str:
        return "-" if value is None else self.fmt.format(value)


_MASK_LABELS = {
    "recall": "drop recall",
    "precision": "drop precision",
    "bal_acc": "mask bal. acc.",
    "accuracy": "mask accuracy",
}
_BASELINES = {"": "", "_keep_all": " (keep-all)", "_init": " (init)"}
# The one table of what a run reports per victim, in the order tables show it: dia.train's console,
# metrics.json's means (dia.run.summary), dia.report's tables and figures and the W&B summary read it.
METRICS: list[Metric] = [
    Metric("ssim", "SSIM", True, "{:.3f}", brief=True, fn=ssim),
    Metric("psnr", "PSNR", True, "{:.2f}", brief=True, fn=psnr),
    Metric("lpips", "LPIPS", False, "{:.3f}", brief=True, fn=lambda x, y: lpips(x, y)),
    Metric("mse", "MSE", False, "{:.4f}", brief=True, fn=mse, normalized=True),
    *(
        Metric(
            f"mask_{m}{b}",
            _MASK_LABELS[m] + _BASELINES[b],
            True,
            "{:.3f}",
            brief=(m, b) == ("bal_acc", ""),
            column=m != "accuracy" and (m == "bal_acc" or b != "_keep_all"),
            console=b == "",
        )
        for m in ("bal_acc", "recall", "precision", "accuracy")
        for b in _BASELINES
    ),
]

METRIC = {m.key: m for m in METRICS}


def register_metric(metric: Metric) -> Metric:
    """Add a metric to the table (an image metric: with `fn`): every run, logger and report then has it."""
    unregister_metric(metric.key)
    METRICS.append(metric)
    METRIC[metric.key] = metric
    return metric


def unregister_metric(key: str) -> None:
    """Remove a metric added by `register_metric` (one experiment's, or one test's)."""
    METRICS[:] = [m for m in METRICS if m.key != key]
    METRIC.pop(key, None)


def mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The mean of each metric (and of each per-part mask measure a row has) over the victims that have it."""
    keys = [m.key for m in METRICS]
    out: dict[str, float | None] = {}
    for k in [*keys, *dict.fromkeys(k for r in rows for k in r if k.startswith("mask_") and k not in keys)]:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def _confusion_measures(drop_pred: Tensor, drop_true: Tensor) -> dict[str, Tensor]:
    """Measures of dropped-unit detection from (K, N) predicted drop probabilities (0/1 or expected) and truth.

    Positives are dropped units. Counts may be expectations (a fractional `drop_pred`), which gives the
    expected counts of a random prediction drawn independently of the truth. A ratio with a zero
    denominator (precision when nothing is predicted dropped) is NaN.
    """
    tp = (drop_pred * drop_true).sum(1)
    fp = (drop_pred * (1 - drop_true)).sum(1)
    pos = drop_true.sum(1)
    neg = (1 - drop_true).sum(1)
    tn = neg - fp
    recall, specificity = tp / pos, tn / neg
    return {
        "recall": recall,
        "precision": tp / (tp + fp),
        "bal_acc": (recall + specificity) / 2,
        "accuracy": (tp + tn) / (pos + neg),
    }


def mask_measures(
    recovered: Mapping[str, Tensor], true: Mapping[str, Tensor], parts: Mapping[str, str], rates: Mapping[str, float]
) -> dict[str, Tensor]:
    """How well recovered dropout masks find the client's dropped units, per problem; {name: (K,)}.

    `recovered` and `true` map site -> (K, ...) keep-masks (recovered ones may be fractional: rounded at
    0.5), over the sites that were recovered; `parts` maps a site to the part of the network it belongs
    to (e.g. "attention", "mlp"); `rates` gives each site's dropout probability p.

    For the recovered masks: `mask_recall` (dropped units found), `mask_precision` (units predicted
    dropped that were), `mask_bal_acc` (mean of the recall of dropped and of kept units: 0.5 for any mask
    that ignores the truth), `mask_accuracy` (entries right, dominated by the kept majority) and
    `mask_bal_acc_<part>` per part. Beside each overall measure two baselines, computed the same way:
    `<measure>_keep_all` (nothing dropped) and `<measure>_init` (the expectation for a Bernoulli(1-p) draw,
    DIA's initialisation).
    """
    import torch

    names = list(recovered)
    drop_true = torch.cat([(1 - true[n].float()).flatten(1) for n in names], dim=1)
    drop_pred = torch.cat([(recovered[n] < 0.5).float().flatten(1) for n in names], dim=1)
    drop_init = torch.cat([torch.full_like(true[n].float().flatten(1), rates[n]) for n in names], dim=1)
    out: dict[str, Tensor] = {}
    for suffix, pred in (("", drop_pred), ("_keep_all", torch.zeros_like(drop_pred)), ("_init", drop_init)):
        for measure, value in _confusion_measures(pred, drop_true).items():
            out[f"mask_{measure}{suffix}"] = value
    for part in sorted(set(parts[n] for n in names)):
        sites = [n for n in names if parts[n] == part]
        t = torch.cat([(1 - true[n].float()).flatten(1) for n in sites], dim=1)
        r = torch.cat([(recovered[n] < 0.5).float().flatten(1) for n in sites], dim=1)
        out[f"mask_bal_acc_{part}"] = _confusion_measures(r, t)["bal_acc"]
    return out


LPIPSFn = Callable[["Tensor", "Tensor"], "Tensor"]
_lpips_cache: dict[str, LPIPSFn | None] = {}
LPIPS_MIN_SIZE = 64  # AlexNet's pooling needs inputs of at least ~64 px; smaller images are upsampled


def lpips_from_network(net: torch.nn.Module) -> LPIPSFn:
    """Wrap an `lpips.LPIPS` network as a metric on [0, 1] images of any size and channel count."""
    import torch
    import torch.nn.functional as F

    def fn(x: Tensor, y: Tensor) -> Tensor:
        def prep(z: Tensor) -> Tensor:
            z = z.expand(-1, 3, -1, -1) if z.shape[1] == 1 else z
            if min(z.shape[-2:]) < LPIPS_MIN_SIZE:
                z = F.interpolate(z, size=(LPIPS_MIN_SIZE, LPIPS_MIN_SIZE), mode="bilinear", align_corners=False)
            return z * 2 - 1

        device = next(net.parameters()).device
        with torch.no_grad():
            return net(prep(x.to(device)), prep(y.to(device))).flatten().cpu()

    return fn


def lpips_marker(net: str = "alex") -> Path:
    """The file that remembers, for this machine, that LPIPS's pretrained `net` could not be had:
    $DIA_CACHE_DIR (default ~/.cache/dia, or $XDG_CACHE_HOME/dia) / lpips-<net>-unavailable."""
    base = os.environ.get("DIA_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dia"
    return Path(base) / f"lpips-{net}-unavailable"


def _weights_in_hub_cache(net: str) -> bool:
    """Whether torchvision's weights of `net` lie in the torch hub cache (put there since the failure)."""
    import torch

    try:
        return any((Path(torch.hub.get_dir()) / "checkpoints").glob(f"{net}*.pth"))
    except OSError:
        return False


def load_lpips(net: str = "alex") -> LPIPSFn | None:
    """LPIPS with pretrained `net` backbone, or None when its weights cannot be had.

    Tried once per machine: a failure (offline, no weights in the torch hub cache) warns once, saying so, and is
    remembered in `lpips_marker(net)`; later processes report LPIPS as null without trying (or a download attempt
    on the console). It is tried again when the marker is deleted, when DIA_RETRY_LPIPS=1, or when the weights
    appear in the torch hub cache."""
    if net in _lpips_cache:
        return _lpips_cache[net]
    import torch

    marker = lpips_marker(net)
    if marker.is_file() and not os.environ.get("DIA_RETRY_LPIPS") and not _weights_in_hub_cache(net):
        _lpips_cache[net] = None
        return None
    try:
        import lpips

        # torch.hub's "Downloading: ..." line (on stdout) would land in the middle of a progress bar
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net=net, verbose=False).eval()
        fn: LPIPSFn | None = lpips_from_network(model)
        with contextlib.suppress(OSError):
            marker.unlink(missing_ok=True)
    except Exception as exc:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        remembered = ""
        with contextlib.suppress(OSError):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"LPIPS ({net}) could not be loaded: {why}\ndelete this file to try again\n")
            remembered = (
                f" Not tried again on this machine ({marker}): delete that file or set DIA_RETRY_LPIPS=1 to retry."
            )
        warnings.warn(
            f"LPIPS disabled: the pretrained {net} backbone could not be loaded ({why}); reported as null. Put the "
            f"torchvision weights in the torch hub cache ({torch.hub.get_dir()}) or go online to enable it."
            + remembered,
            RuntimeWarning,
            stacklevel=2,
        )
        fn = None
    _lpips_cache[net] = fn
    return fn


def lpips(x: Tensor, y: Tensor) -> Tensor | None:
    """LPIPS (AlexNet) of [0, 1] images, or None when the backbone's weights cannot be had (`load_lpips`)."""
    fn = load_lpips("alex")
    return None if fn is None else fn(x, y)
