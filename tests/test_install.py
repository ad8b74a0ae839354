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


DIST = "dia-leakage"  # `dia` on PyPI is another project (a work-log tool): ours must never be installed by that name


def test_the_distribution_has_a_name_of_its_own_and_every_install_line_uses_it():
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DIST
    # the wheel's file name is the normalized distribution name (PEP 427): .ci/wheel installs exactly that file
    assert f"dist/{DIST.replace('-', '_')}-*.whl" in (ROOT / ".ci" / "wheel").read_text()
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*.py")]
    texts += list((ROOT / "dia").rglob("*.py"))
    for path in texts:
        for line in path.read_text().splitlines():
            # `pip install dia`, `pip install "dia[flower]"`: the other project
            assert not re.search(r"pip install\s+(-U\s+)?[\"']?dia(\[|[\"'\s]|$)", line), (path, line)
    readme = (ROOT / "README.md").read_text()
    assert DIST in readme and 'pip install -e ".[flower]"' in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme  # the CPU build on a CPU-only machine
