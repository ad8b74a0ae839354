"""Pictures of a run: originals over reconstructions, each column titled with its caption (index, SSIM).

The one painter of such pictures: a run's reconstructions.png (dia.run.record) and dia.report's montages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from dia.files import atomic_write


def reconstruction_figure(
    originals: torch.Tensor | None,
    reconstructions: torch.Tensor,
    captions: Sequence[str],
    *,
    title: str,
    per_row: int = 8,
) -> Any:
    """A matplotlib Figure: pairs of rows (original above reconstruction), `per_row` victims per pair, every pair
    labelled; images in [0, 1]. Without `originals` (an attacked update whose images nobody has), rows of
    reconstructions only."""
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
            img = image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
            gray = img.shape[-1] == 1
            ax.imshow(img.squeeze(-1) if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1)
        axes[per * r][c].set_title(captions[i] if i < len(captions) else "", fontsize=7)
    labels = ["reconstruction"] if originals is None else ["original", "reconstruction"]
    for pair in range(pairs):
        for k, text in enumerate(labels):
            axes[per * pair + k][0].text(
                -0.15,
                0.5,
                text,
                transform=axes[per * pair + k][0].transAxes,
                rotation=90,
                va="center",
                ha="right",
                fontsize=8,
            )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def reconstruction_grid(
    path: Path,
    originals: torch.Tensor | None,
    reconstructions: torch.Tensor,
    captions: Sequence[str],
    *,
    title: str,
    per_row: int = 8,
) -> Path:
    """Save `reconstruction_figure` as a PNG (written whole: temp file + rename)."""
    fig = reconstruction_figure(originals, reconstructions, captions, title=title, per_row=per_row)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
