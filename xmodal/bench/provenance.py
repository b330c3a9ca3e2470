"""Provenance stamped on every result row: package version, git commit, time."""
from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import re
import subprocess
from pathlib import Path

import xmodal

_PKG_DIR = Path(list(xmodal.__path__)[0]).resolve()


@functools.lru_cache(maxsize=1)
def xmodal_version() -> str:
    """Installed distribution version, else ``xmodal.__version__``, else pyproject's, else "unknown"."""
    try:
        return importlib.metadata.version("xmodal")
    except importlib.metadata.PackageNotFoundError:
        pass
    version = getattr(xmodal, "__version__", None)
    if version:
        return str(version)
    pyproject = _PKG_DIR.parent / "pyproject.toml"
    if pyproject.is_file():
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), flags=re.MULTILINE)
        if match:
            return match.group(1)
    return "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_PKG_DIR), *args], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the repository the package was imported from, or "unknown" (e.g. a wheel install)."""
    return _git("rev-parse", "HEAD") or "unknown"


@functools.lru_cache(maxsize=1)
def git_dirty() -> bool | None:
    """True when tracked files differ from HEAD (results may not be reproducible from the commit)."""
    if git_commit() == "unknown":
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def utc_timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")
