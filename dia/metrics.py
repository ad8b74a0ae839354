"""Reconstruction quality as pure functions over N images (and LPIPS, which needs backbone weights).

Image metrics take [0, 1] images (N, C, H, W) and return (N,); MSE is taken in normalized space as
the paper's code reports it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def mse(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).pow(2).flatten(1).mean(1)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    return peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(x: Tensor, y: Tensor) -> Tensor:
    return structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")


def match(reconstructions: Tensor, originals: Tensor) -> Tensor:
    """Which reconstruction belongs to which original, for one batch of B images (order is lost in a gradient).

    Optimal assignment (Hungarian, scipy) maximizing the total SSIM; returns perm with
    reconstructions[perm[i]] matched to originals[i].
    """
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


def mask_recovery(recovered: Mapping[str, Tensor], true: Mapping[str, Tensor]) -> Tensor:
    """Fraction of mask entries that rounding the recovered masks gets right, per problem; (K, ...) -> (K,).

    Over the sites that were recovered (an attack may leave some, e.g. DropPath, unmodelled).
    """
    hits = total = 0
    for name, r in recovered.items():
        t = true[name]
        hits = hits + ((r >= 0.5).float() == t).flatten(1).sum(1)
        total = total + t[0].numel()
    return torch.as_tensor(hits, dtype=torch.float32) / total


LPIPSFn = Callable[[Tensor, Tensor], Tensor]
_lpips_cache: dict[str, LPIPSFn | None] = {}
LPIPS_MIN_SIZE = 64  # AlexNet's pooling needs inputs of at least ~64 px; smaller images are upsampled


def lpips_from_network(net: torch.nn.Module) -> LPIPSFn:
    """Wrap an `lpips.LPIPS` network as a metric on [0, 1] images of any size and channel count."""

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


def load_lpips(net: str = "alex") -> LPIPSFn | None:
    """LPIPS with pretrained `net` backbone, or None (with one warning) when its weights cannot be had."""
    if net in _lpips_cache:
        return _lpips_cache[net]
    try:
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net=net, verbose=False).eval()
        fn: LPIPSFn | None = lpips_from_network(model)
    except Exception as exc:  # noqa: BLE001 - no network, no cached weights, or no lpips package
        warnings.warn(
            f"LPIPS disabled: the pretrained {net} backbone could not be loaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); reported as null. "
            "Put the torchvision weights in the torch hub cache (or go online) to enable it.",
            RuntimeWarning,
            stacklevel=2,
        )
        fn = None
    _lpips_cache[net] = fn
    return fn
