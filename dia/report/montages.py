"""The report's montages: each run's originals above its reconstructions, from its reconstructions.pt, painted as
the run's own reconstructions.png is (dia.run.plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dia.report.collect import warn
from dia.run import record


def montage_figure(run: dict[str, Any], max_victims: int = 16) -> Any:
    """The montage of a run (a metrics.json's content with its `folder`) as a matplotlib Figure, None when its
    reconstructions.pt is missing or unreadable."""
    from dia.run.plotting import reconstruction_figure

    folder = Path(run["folder"])
    if not (folder / record.TENSORS).is_file():
        return None
    try:
        t = record.read_tensors(folder)
        orig, rec = t["originals"][:max_victims], t["reconstructions"][:max_victims]
        if orig.dim() != 4 or orig.shape != rec.shape or orig.shape[1] not in (1, 3):
            raise ValueError(f"tensors of shapes {tuple(orig.shape)} and {tuple(rec.shape)}")
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        warn(f"{first}; montage skipped")
        return None
    steps = run["client"].get("local_steps", 1) if isinstance(run.get("client"), dict) else 1
    title = record.picture_title(run["attack"], run["model"], run["data"], run["dropout"], steps) + f"  ({folder.name})"
    victims = [v for v in run["victims"][: len(orig)] if isinstance(v, dict)]
    captions = record.titles(victims)  # with the clients when they sent B > 1 images (as the rows say)
    return reconstruction_figure(orig, rec, captions, title=title, clients=captions.clients)


def montage(run: dict[str, Any], path: Path, max_victims: int = 16) -> Path | None:
    """montages/<run>.png (see `montage_figure`)."""
    import matplotlib.pyplot as plt

    fig = montage_figure(run, max_victims)
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
