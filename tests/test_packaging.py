"""The package-dir mapping installs collectors/analyzers/reports inside perfkit (architecture.md):
a package left out of ``packages`` would import in an editable install yet vanish from the wheel."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _packages_on_disk() -> set[str]:
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    found = set()
    for name, folder in mapping.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join([name, *rel.parts]))
    return found


def test_every_package_is_listed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    missing = _packages_on_disk() - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    assert listed <= _packages_on_disk(), f"listed but absent: {sorted(listed - _packages_on_disk())}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("perfkit-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_holds_every_package_and_data(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    for package in _packages_on_disk():
        assert f"{package.replace('.', '/')}/__init__.py" in names
    assert "perfkit/reports/templates/report.html" in names and "perfkit/reports/templates/base.css" in names
    assert "perfkit/collectors/site/sitecustomize.py" in names
    assert "perfkit/trainer/configs/tiny-cpu.toml" in names
    assert "perfkit/trainer/configs/gpt2-small-gpu.toml" in names


def test_wheel_has_no_bare_role_packages(wheel: zipfile.ZipFile) -> None:
    tops = {n.split("/", 1)[0] for n in wheel.namelist()}
    assert not tops & {"collectors", "analyzers", "reports", "tests", "bench"}, tops
