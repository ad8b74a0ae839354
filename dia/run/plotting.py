"""Pictures of a run: originals over reconstructions, each column titled with its SSIM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from dia.run.files import atomic_write


def reconstruction_grid(
    path: Path,
    originals: torch.Tensor | None,
    reconstructions: torch.Tensor,
    titles: Sequence[str],
    *,
    title: str,
    per_row: int = 8,
) -> Path:
    """Save a PNG: pairs of rows (original above reconstruction), `per_row` victims per pair; images in [0, 1].
    Without `originals` (an attacked update whose images nobody has), rows of reconstructions only."""
    n = reconstructions.shape[0]
    cols = min(n, per_row)
    pairs = -(-n // cols)
    per = 1 if originals is None else 2
    width = max(1.6 * cols, 0.075 * len(title) + 0.6)  # one victim: as wide as the title (9 pt: ~0.075 in a character)
    fig, axes = plt.subplots(per * pairs, cols, figsize=(width, 1.7 * per * pairs + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        shown = [(per * r + per - 1, reconstructions[i])] + ([] if originals is None else [(per * r, originals[i])])
        for row, image in shown:
            ax = axes[row][c]
            img = image.permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(
                img.squeeze(-1) if img.shape[-1] == 1 else img,
                cmap="gray" if img.shape[-1] == 1 else None,
                vmin=0,
                vmax=1,
            )
        axes[per * r][c].set_title(titles[i], fontsize=7)
    labels = ["reconstruction"] if originals is None else ["original", "reconstruction"]
    for row, text in enumerate(labels):
        axes[row][0].text(
            -0.15, 0.5, text, transform=axes[row][0].transAxes, rotation=90, va="center", ha="right", fontsize=8
        )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
