"""What every image dataset looks like to the rest of xmodal."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

from PIL import Image

from ..errors import CorruptImageError


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``id`` is stable across machines (relative path or ``name#index``)."""

    id: str
    label: int
    path: str | None = None  # set for file-backed samples; None for in-memory arrays


class ImageDataset(abc.ABC):
    """A labelled image collection with named splits ("train", "val", "test").

    Subclasses provide ``classnames``, ``templates`` (zero-shot prompt templates with one ``{}``),
    ``splits()`` and ``samples(split)``; file-backed ones get ``load_image`` for free.
    """

    name: str
    classnames: list[str]
    templates: list[str]

    @abc.abstractmethod
    def splits(self) -> list[str]:
        """Names of the splits this dataset has."""

    @abc.abstractmethod
    def samples(self, split: str) -> list[Sample]:
        """All samples of a split, in a fixed order."""

    def content_key(self, split: str) -> str | None:
        """A digest of the pixels of an in-memory split (None for file-backed data, whose files are
        fingerprinted by size and mtime). Part of the feature cache key."""
        return None

    def load_image(self, sample: Sample) -> Image.Image:
        """Decode one sample to an RGB PIL image; a broken file raises CorruptImageError naming it."""
        if sample.path is None:
            raise NotImplementedError(f"{type(self).__name__} must override load_image for in-memory samples")
        return open_rgb(sample.path)

    @property
    def cache_id(self) -> str:
        """Identity used in feature-cache keys (two specs naming the same files share features)."""
        return self.name

    def describe(self) -> str:
        sizes = ", ".join(f"{s}={len(self.samples(s))}" for s in self.splits())
        return f"{self.name}: {len(self.classnames)} classes; {sizes}"


def open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise CorruptImageError(f"image file not found: {path}") from None
    except Exception as exc:  # PIL raises several types for broken files
        # the message names the file; which option skips such files depends on the command (its hint says)
        raise CorruptImageError(f"cannot decode image {path}: {exc}") from exc


ImageLoader = Callable[[Sample], Image.Image]
