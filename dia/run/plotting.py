"""Pictures of a run: originals over reconstructions, each column titled with its caption (index, SSIM), each
client's images framed when clients send several.

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
    clients: Sequence[int] | None = None,
) -> Any:
    """A matplotlib Figure: pairs of rows (original above reconstruction), `per_row` victims per pair, every pair
    labelled and set apart from the next; images in [0, 1]. Without `originals` (an attacked update whose images
    nobody has), rows of reconstructions only. With `clients` (the client of each image, when clients send B > 1
    images: their images shared one gradient), each client's images are framed and named, and a pair of rows holds
    whole clients."""
    n = reconstructions.shape[0]
    groups = _groups(clients, n)
    b = max(len(g) for g in groups)
    cols = min(n, max(b, per_row // b * b))  # whole clients in a row
    pairs = -(-n // cols)
    per = 1 if originals is None else 2
    gap = 0.25 if clients else 0.15  # between pairs of rows (relative to an image's height): room for client names
    ratios = [r for pair in range(pairs) for r in [1.0] * per + ([gap] if pair < pairs - 1 else [])]
    width = max(1.6 * cols, 0.075 * len(title) + 0.6)  # one victim: as wide as the title (9 pt: ~0.075 in a character)
    height = 1.7 * sum(ratios) + 0.4 + (0.3 if clients else 0)
    fig, grid = plt.subplots(
        len(ratios), cols, figsize=(width, height), squeeze=False, gridspec_kw={"height_ratios": ratios}
    )
    for ax in grid.flat:
        ax.axis("off")
    rows = [grid[(per + 1) * pair : (per + 1) * pair + per] for pair in range(pairs)]  # each pair's axes, no gap row
    for i in range(n):
        r, c = divmod(i, cols)
        shown = [(per - 1, reconstructions[i])] + ([] if originals is None else [(0, originals[i])])
        for row, image in shown:
            img = image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
            gray = img.shape[-1] == 1
            rows[r][row][c].imshow(img.squeeze(-1) if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1)
        rows[r][0][c].set_title(captions[i] if i < len(captions) else "", fontsize=7)
    labels = ["reconstruction"] if originals is None else ["original", "reconstruction"]
    for pair in rows:
        for k, text in enumerate(labels):
            ax = pair[k][0]
            ax.text(-0.15, 0.5, text, transform=ax.transAxes, rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.12 / height if clients else 0, 1, 1))  # room for the last clients' names
    if clients:
        _frame_clients(fig, rows, groups, cols, [clients[g[0]] for g in groups])
    return fig


def _groups(clients: Sequence[int] | None, n: int) -> list[list[int]]:
    """The images of each client, in order (one image each without `clients`)."""
    if not clients:
        return [[i] for i in range(n)]
    out: list[list[int]] = []
    for i, k in enumerate(clients[:n]):
        if out and clients[out[-1][-1]] == k:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _frame_clients(fig: Any, rows: list[Any], groups: list[list[int]], cols: int, names: list[int]) -> None:
    """A frame around each client's images (both rows of its pair, captions included), its name below."""
    from matplotlib.patches import Rectangle

    renderer = fig.canvas.get_renderer()
    to_figure = fig.transFigure.inverted()
    for group, name in zip(groups, names):
        r = group[0] // cols
        axes = [rows[r][k][i % cols] for k in range(len(rows[r])) for i in group]
        boxes = [  # the images and their captions (not the pair's row labels beside the first column)
            to_figure.transform_bbox(box)
            for ax in axes
            for box in (ax.get_window_extent(renderer), ax.title.get_window_extent(renderer))
            if box.width > 0
        ]
        x0, y0 = min(b.x0 for b in boxes), min(b.y0 for b in boxes)
        x1, y1 = max(b.x1 for b in boxes), max(b.y1 for b in boxes)
        pad = 0.004
        fig.add_artist(
            Rectangle(
                (x0 - pad, y0 - pad),
                x1 - x0 + 2 * pad,
                y1 - y0 + 2 * pad,
                transform=fig.transFigure,
                fill=False,
                lw=1.0,
                ec="0.35",
            )
        )
        fig.text((x0 + x1) / 2, y0 - pad - 0.003, f"client {name}", ha="center", va="top", fontsize=7, color="0.25")


def reconstruction_grid(
    path: Path,
    originals: torch.Tensor | None,
    reconstructions: torch.Tensor,
    captions: Sequence[str],
    *,
    title: str,
    per_row: int = 8,
    clients: Sequence[int] | None = None,
) -> Path:
    """Save `reconstruction_figure` as a PNG (written whole: temp file + rename)."""
    fig = reconstruction_figure(originals, reconstructions, captions, title=title, per_row=per_row, clients=clients)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
