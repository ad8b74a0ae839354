"""Pictures of a run: originals over reconstructions, each column titled with its SSIM."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dia.run.files import atomic_write  # noqa: E402


def reconstruction_grid(
    path: Path, originals: torch.Tensor, reconstructions: torch.Tensor, titles: Sequence[str], *, title: str, per_row: int = 8
) -> Path:
    """Save a PNG: pairs of rows (original above reconstruction), `per_row` victims per pair; images in [0, 1]."""
    n = originals.shape[0]
    cols = min(n, per_row)
    pairs = -(-n // cols)
    width = max(1.6 * cols, 0.075 * len(title) + 0.6)  # one victim: as wide as the title (9 pt: ~0.075 in a character)
    fig, axes = plt.subplots(2 * pairs, cols, figsize=(width, 3.4 * pairs + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        for row, image in ((2 * r, originals[i]), (2 * r + 1, reconstructions[i])):
            ax = axes[row][c]
            img = image.permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
        axes[2 * r][c].set_title(titles[i], fontsize=7)
    axes[0][0].text(-0.15, 0.5, "original", transform=axes[0][0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    axes[1][0].text(-0.15, 0.5, "reconstruction", transform=axes[1][0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
