"""The wheel is the package: every Python package of dia/ and every folder of configs/ and slurm/ is listed in
pyproject.toml, so `pip install` from the wheel (what `pip install git+URL` builds) finds them all
(.ci/wheel builds, installs and runs it from outside the checkout)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_and_data_folder_ships_in_the_wheel():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dia").rglob("__init__.py")}
    configs = {"dia.configs"} | {f"dia.configs.{p.name}" for p in (ROOT / "configs").iterdir() if p.is_dir()}
    assert code | configs | {"dia.slurm.templates"} == listed
    assert setup["package-dir"] == {"dia.configs": "configs", "dia.slurm.templates": "slurm"}
    data = setup["package-data"]
    for folder in configs:
        assert data[folder] == ["*.yaml"], folder
    assert set(data["dia.slurm.templates"]) >= {"*.sbatch", "*.sh"}


def test_the_configs_and_templates_are_found_beside_the_package_in_a_checkout():
    from dia.config import config_dir
    from dia.slurm import SLURM_DIR

    assert config_dir() == ROOT / "configs" and SLURM_DIR == ROOT / "slurm"
