"""Keep image paths named by split files and metadata inside the dataset folder.

A split file (CoOp's JSON, FGVCAircraft's txt, ImageNet's classnames.txt) names files relative to an
image folder. An entry that is absolute, contains ``..``, or is a symlink whose target lies outside
that folder would make xmodal read (and embed, and cache) a file the dataset does not contain; each is
refused with a ``DatasetError`` naming the entry and the split file.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import DatasetError


class ContainedPaths:
    """Checks relative entries against one root; resolves each parent folder once (cheap for 100k files)."""

    def __init__(self, root: Path, source: Path) -> None:
        self.root = Path(root)
        self.source = source  # the split / metadata file the entries come from (named in errors)
        self.real_root = os.path.realpath(self.root)
        self._dir_ok: dict[str, bool] = {}

    def _refuse(self, rel: str, why: str) -> DatasetError:
        return DatasetError(f"{self.source}: entry {rel!r} {why}; split files may only name files inside "
                            f"{self.root}", hint="fix or regenerate the split file (paths relative to the "
                            "image folder, no '..', no absolute paths, no symlinks leading out)")

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def join(self, rel: str) -> Path:
        """``root / rel`` after checking that it stays inside ``root`` (lexically and through symlinks)."""
        if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
            raise self._refuse(str(rel), "is not a relative file path")
        if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
            raise self._refuse(rel, "is an absolute path")
        parts = rel.replace("\\", "/").split("/")
        if ".." in parts:
            raise self._refuse(rel, "climbs out with '..'")
        path = self.root / rel
        parent = str(path.parent)
        ok = self._dir_ok.get(parent)
        if ok is None:
            ok = self._dir_ok[parent] = self._inside(os.path.realpath(parent))
        if not ok:
            raise self._refuse(rel, f"lies in a folder that resolves outside ({os.path.realpath(parent)})")
        if os.path.islink(path) and not self._inside(os.path.realpath(path)):
            raise self._refuse(rel, f"is a symlink to {os.path.realpath(path)}, outside the dataset")
        return path

    def component(self, name: str) -> str:
        """A single folder name (e.g. an ImageNet wnid) that must not be a path."""
        if not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
            raise self._refuse(name, "is not a single folder name")
        return name
