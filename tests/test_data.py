"""Victim data: embedded sets, selection rules, and an ImageFolder of the user's own images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dia.config import compose
from dia.data import load_victims
from dia.errors import UserError


@pytest.mark.parametrize("name,shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32)), ("imagenet", (3, 224, 224))])
def test_embedded_sets_load_offline_in_unit_range(name, shape):
    cfg = compose([f"data={name}"]).data
    v = load_victims(cfg, indices=None, count=3, seed=None)
    assert v.images.shape == (3, *shape) and v.indices == [0, 1, 2]
    assert v.images.min() >= 0 and v.images.max() <= 1 and v.images.std() > 0.05
    assert v.labels.dtype == torch.long and (v.labels < cfg.num_classes).all()


def test_selection_by_count_and_seed_is_reproducible_and_distinct():
    cfg = compose([]).data
    a = load_victims(cfg, indices=None, count=10, seed=3).indices
    assert a == load_victims(cfg, indices=None, count=10, seed=3).indices
    assert len(set(a)) == 10 and a != load_victims(cfg, indices=None, count=10, seed=4).indices
    with pytest.raises(UserError, match="num_victims=200 out of range"):
        load_victims(cfg, indices=None, count=200, seed=None)


def test_imagefolder_resizes_center_crops_and_labels_by_subfolder(tmp_path):
    for label, colour in (("a_cat", (200, 30, 30)), ("b_dog", (30, 30, 200))):
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((300, 260, 3), colour, dtype=np.uint8)).save(tmp_path / label / "img.png")
    cfg = compose(["data=imagenet", "data.source=imagefolder", f"data.root={tmp_path}"]).data
    v = load_victims(cfg, indices=[0, 1], count=2, seed=None)
    assert v.images.shape == (2, 3, 224, 224) and v.labels.tolist() == [0, 1]
    assert v.images[0, 0].mean() > 0.7 and v.images[1, 2].mean() > 0.7


def test_flat_folder_with_label_file_and_statistics_saved_with_the_run(tmp_path):
    import json

    from omegaconf import OmegaConf

    from dia.train import main

    images = tmp_path / "imgs"
    images.mkdir()
    for i, value in enumerate((40, 120, 200)):
        Image.fromarray(np.full((40, 50, 3), value, dtype=np.uint8)).save(images / f"p{i}.png")
    (tmp_path / "labels.csv").write_text("p0.png,5\np1.png,7\np2.png,9\n")
    out = tmp_path / "runs"
    args = [
        "data=folder",
        f"data.root={images}",
        f"data.labels_file={tmp_path / 'labels.csv'}",
        "data.image_size=32",
        "data.num_classes=10",
        "num_victims=3",
        "attack.max_iterations=3",
        "attack.compile=false",
        "logger.wandb.mode=disabled",
        "run.progress=false",
        f"run.output_dir={out}",
    ]
    assert main(args) == 0
    run = next(p for p in out.iterdir() if not p.name.startswith("."))
    assert [v["label"] for v in json.loads((run / "metrics.json").read_text())["victims"]] == [5, 7, 9]
    saved = OmegaConf.load(run / "config.yaml").data
    assert saved.normalize == "dataset" and abs(saved.mean[0] - 120 / 255) < 1e-3  # computed from the folder


def test_folder_without_labels_for_every_image_is_one_clear_error(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("b.png,1\n")
    cfg = compose(["data=folder", f"data.root={tmp_path}", f"data.labels_file={tmp_path / 'labels.csv'}"]).data
    with pytest.raises(UserError, match="no label for 'a.png'"):
        load_victims(cfg, indices=None, count=1, seed=None)
