"""ImageFolder layout: ``root/<split>/<class>/<image>`` (users' own data, the shared CIFAR-10 subset)."""
from __future__ import annotations

from pathlib import Path

from ..errors import DatasetError
from .base import ImageDataset, Sample
from .templates import SIMPLE

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = ("train", "val", "test")


class ImageFolderDataset(ImageDataset):
    """Splits are the sub-folders named train/val/test; classes are the folders inside them (sorted)."""

    def __init__(self, root: str | Path, name: str | None = None, templates: list[str] | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise DatasetError(f"ImageFolder root {self.root} {what}; expected {self.root}/<split>/<class>/*.jpg",
                               hint="pass the folder that holds train/ and test/")
        self._splits = [s for s in SPLIT_NAMES if (self.root / s).is_dir()]
        if not self._splits:
            raise DatasetError(
                f"no train/val/test folders under {self.root}; expected {self.root}/train/<class>/*.jpg "
                "(and test/, optionally val/)"
            )
        per_split = {s: sorted(d.name for d in (self.root / s).iterdir() if d.is_dir()) for s in self._splits}
        self.classnames = per_split[self._splits[0]]
        if not self.classnames:
            raise DatasetError(f"{self.root / self._splits[0]} has no class folders; expected "
                               f"{self.root / self._splits[0]}/<class>/*.jpg",
                               hint="put each class's images in its own sub-folder")
        for split, names in per_split.items():
            if names != self.classnames:
                extra = sorted(set(names) ^ set(self.classnames))
                raise DatasetError(f"class folders differ between splits of {self.root} (split {split!r}: {extra})")
        self.name = name or f"imagefolder:{self.root.name}"
        self.templates = templates or list(SIMPLE)
        self._cache: dict[str, list[Sample]] = {}

    @property
    def cache_id(self) -> str:
        return f"imagefolder:{self.root.resolve()}"

    def splits(self) -> list[str]:
        return list(self._splits)

    def samples(self, split: str) -> list[Sample]:
        if split not in self._splits:
            raise DatasetError(f"{self.name} has no split {split!r}; available: {self._splits}")
        if split not in self._cache:
            out = []
            for label, cls in enumerate(self.classnames):
                for f in sorted((self.root / split / cls).iterdir()):
                    if f.suffix.lower() in IMAGE_SUFFIXES:
                        out.append(Sample(id=f"{split}/{cls}/{f.name}", label=label, path=str(f)))
            self._cache[split] = out
        return self._cache[split]
