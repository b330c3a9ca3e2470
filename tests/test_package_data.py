"""The wheel ships every file the package reads: pyproject's package-data globs cover each non-Python file.

Why: a static file (web page, vendored JS/CSS, template) left out of the globs works from the repository
and is missing from an installed wheel; ``scripts/check_wheel.sh`` shows it end to end, this test catches
it in the suite without building anything.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is 3.11+, tomli is its backport
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xmodal"


def _package_data() -> dict[str, list[str]]:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    return tool.get("package-data", {})


def _packages() -> list[str]:
    return sorted(".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")
                  if "__pycache__" not in p.parts)


def shipped_files(package_data: dict[str, list[str]]) -> set[Path]:
    """The files setuptools adds for these globs (its rules: globs relative to each package's folder, ``**`` recursive)."""
    files: set[Path] = set()
    for package in _packages():
        for pattern in package_data.get(package, []) + package_data.get("*", []):
            folder = ROOT.joinpath(*package.split("."))
            files |= {Path(f) for f in glob.glob(os.path.join(folder, pattern), recursive=True) if os.path.isfile(f)}
    return files


def data_files() -> set[Path]:
    return {p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and p.suffix not in {".py", ".pyc"}}


def test_every_non_python_file_in_the_package_is_shipped():
    needed = data_files()
    assert any(p.name == "index.html" for p in needed), "the serve page was not found"
    missing = sorted(str(p.relative_to(ROOT)) for p in needed - shipped_files(_package_data()))
    assert not missing, f"add these to [tool.setuptools.package-data] in pyproject.toml: {missing}"


def test_every_glob_still_matches_a_file():
    for package, patterns in _package_data().items():
        for pattern in patterns:
            assert shipped_files({package: [pattern]}), f"package-data glob {package}: {pattern} matches nothing"


def test_the_check_would_catch_a_file_outside_the_globs():
    """Globs naming only the page (``static/*.html``) leave the vendored API-docs assets out; the check must say so."""
    shipped = shipped_files({"xmodal.serve": ["static/*.html"]})
    assert any(p.name == "swagger-ui.css" for p in data_files() - shipped)
