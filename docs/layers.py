"""Draw dia's layers from the code: docs/figures/layers.png.

    python docs/layers.py            # redraw (needs import-linter's grimp, in dia's [dev] extra)

The layers are pyproject.toml's import-linter contract (what `lint-imports` enforces); each room (a module or
package directly under dia/) is drawn in its layer with its line count, and under it the rooms it imports (every
import, those inside functions too, from grimp's graph of the code). tests/test_layers.py checks that every room
is in a layer, so a new module has to be placed.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def layers() -> list[list[str]]:
    """The main contract's layers, top first, each a list of rooms."""
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    return [[r.strip() for r in layer.replace(":", "|").split("|")] for layer in spec["layers"]]


def rooms() -> list[str]:
    """Every room of the package: a module or package directly under dia/."""
    pkg = ROOT / "dia"
    out = [p.stem for p in pkg.glob("*.py") if p.stem not in ("__init__", "__main__")]
    out += [p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    return sorted(set(out) - {"assets", "configs"})


def imports() -> dict[str, set[str]]:
    """room -> the rooms it imports (every import but `if TYPE_CHECKING:` ones; the lazy facade dia/__init__.py
    is not a room)."""
    import grimp

    sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph("dia", exclude_type_checking_imports=True)
    out: dict[str, set[str]] = defaultdict(set)
    for module in graph.modules:
        parts = module.split(".")
        if len(parts) < 2:
            continue
        for target in graph.find_modules_directly_imported_by(module):
            other = target.split(".")
            if len(other) > 1 and other[1] != parts[1]:
                out[parts[1]].add(other[1])
    return out


def lines(room: str) -> int:
    path = ROOT / "dia" / room
    files = list(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    return sum(len(f.read_text().splitlines()) for f in files)


def draw(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    stack, deps = layers(), imports()
    fig, ax = plt.subplots(figsize=(13, 0.95 * len(stack) + 0.8))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, len(stack))
    ax.axis("off")
    for i, layer in enumerate(stack):
        y = len(stack) - 1 - i
        width = 12.2 / len(layer)
        for j, room in enumerate(layer):
            x = 0.7 + j * width
            ax.add_patch(
                FancyBboxPatch(
                    (x + 0.05, y + 0.12),
                    width - 0.1,
                    0.76,
                    boxstyle="round,pad=0.02",
                    fc="#e8f0fb" if i < 4 else "#eef7ea" if i < 9 else "#f5f5f5",
                    ec="#667",
                )
            )
            uses = ", ".join(sorted(deps.get(room, ())))
            ax.text(
                x + width / 2,
                y + 0.62,
                f"{room}  ({lines(room)} lines)",
                ha="center",
                va="center",
                fontsize=9 if width > 2 else 7.5,
                weight="bold",
            )
            ax.text(
                x + width / 2,
                y + 0.32,
                f"imports: {uses}" if uses else "imports nothing of dia",
                ha="center",
                va="center",
                fontsize=6.5,
                wrap=True,
                color="#333",
            )
        ax.text(0.05, y + 0.5, str(len(stack) - i), ha="left", va="center", fontsize=9, color="#666")
    ax.set_title(
        "dia's layers (pyproject.toml's import-linter contract; each room imports only rooms below it)", fontsize=10
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw(ROOT / "docs" / "figures" / "layers.png"))
