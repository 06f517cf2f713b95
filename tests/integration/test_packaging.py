"""The distribution installs one import name, ``defectops``: the repository's top-level folders become its subpackages
(pyproject's package-dir mapping), every source and data file is in the wheel, and the old top-level names are gone.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from repo_paths import REPO

PACKAGES = ("core", "pipelines", "training", "evaluation", "registry", "serving")
DATA = ("*.py", "*.yaml", "*.html", "*.css")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (found,) = out.glob("defectops-*.whl")
    return found


def test_wheel_has_one_top_level_name_and_every_file(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"defectops"}
    expected = {f"defectops/{p.relative_to(REPO).as_posix()}" for pkg in PACKAGES for pattern in DATA
                for p in (REPO / pkg).rglob(pattern) if "__pycache__" not in p.parts}
    assert expected - set(names) == set(), "files missing from the wheel: list their package in pyproject.toml"
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "defectops = defectops.pipelines.cli:main" in entry


def test_installed_wheel_imports_only_under_defectops(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    old = subprocess.run([sys.executable, "-c", "import training"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert old.returncode != 0 and "No module named 'training'" in old.stderr
    new = subprocess.run([sys.executable, "-c", "import defectops.training, defectops.core.layout as l; "
                                                "print(defectops.training.__file__); print(l.RUN.metrics)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert new.returncode == 0, new.stderr[-2000:]
    assert new.stdout.splitlines() == [str(target / "defectops" / "training" / "__init__.py"), "metrics.json"]

