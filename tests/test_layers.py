"""The layers are what the contract says (pyproject.toml, enforced by `lint-imports` in .ci/run): every room of the
package is placed in a layer, and no two rooms import each other, whichever way round, lazy imports included."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("layers", ROOT / "docs" / "layers.py")
layers = importlib.util.module_from_spec(spec)
sys.modules["layers"] = layers
spec.loader.exec_module(layers)


def test_every_room_is_in_a_layer():
    placed = [room for layer in layers.layers() for room in layer]
    assert sorted(placed) == layers.rooms()  # a new module or package under dia/ needs its place in pyproject.toml


def test_rooms_import_only_rooms_below_them():
    level = {room: i for i, layer in enumerate(reversed(layers.layers())) for room in layer}
    upward = [(a, b) for a, uses in layers.imports().items() for b in uses if level[b] >= level[a]]
    assert upward == []  # the same rule lint-imports enforces; a cycle would need an upward import
