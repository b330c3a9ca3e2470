"""What ``predict`` accepts: image files, folders (recursive), glob patterns, PIL images and image tensors.

Everything is normalised to a flat list of items (a path string, a PIL image or one (3, H, W) tensor), so
batching, error rows and output order are the same whatever the caller passed.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Iterable, Union

import torch
from PIL import Image

from ..data.base import open_rgb
from ..data.imagefolder import IMAGE_SUFFIXES
from ..errors import InputError, ShapeError

Item = Union[str, Image.Image, torch.Tensor]
_GLOB_CHARS = set("*?[")


def expand_paths(paths: Iterable[str | Path], missing: list[tuple[str, str]] | None = None) -> list[str]:
    """Files as given, folders walked recursively (image suffixes only, sorted), globs expanded (sorted).

    A path that names nothing (no such file, an empty folder, a pattern matching nothing) raises
    ``InputError``; when a ``missing`` list is given it is appended there as (path, message) instead, so a
    batch job can report it as one failed row and go on with the rest.
    """
    out: list[str] = []
    for raw in paths:
        try:
            out.extend(_expand_one(raw))
        except InputError as exc:
            if missing is None:
                raise
            missing.append((str(raw), str(exc)))
    return out


def _expand_one(raw: str | Path) -> list[str]:
    p = Path(raw).expanduser()
    if p.is_dir():
        found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise InputError(f"no image files under {p} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})",
                             hint="point at a folder that holds images, or at the image files themselves")
        return found
    if p.exists():
        return [str(p)]
    if _GLOB_CHARS & set(str(raw)):
        matches = sorted(m for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        if not matches:
            raise InputError(f"the pattern {raw} matches no file", hint="check the pattern (quote it so the "
                             "shell does not expand it) or list the files")
        return matches
    raise InputError(f"no such file or folder: {raw}", hint="check the path")


def normalise_inputs(inputs: Any) -> list[Item]:
    """Flatten ``inputs`` (one item, a list of items, a folder, a batch tensor) into a list of items."""
    if isinstance(inputs, (str, Path)):
        return list(expand_paths([inputs]))
    if isinstance(inputs, Image.Image):
        return [inputs]
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim == 3:
            return [inputs]
        if inputs.ndim == 4:
            return list(inputs.unbind(0))
        raise ShapeError(f"image tensors must be (3, H, W) or (N, 3, H, W), got {tuple(inputs.shape)}",
                         hint="pass raw pixels: uint8 0-255 or float 0-1, channels first")
    if isinstance(inputs, Iterable):
        out: list[Item] = []
        for x in inputs:
            if isinstance(x, (str, Path)):
                out.extend(expand_paths([x]))
            else:
                out.extend(normalise_inputs(x))
        return out
    raise InputError(f"cannot classify an object of type {type(inputs).__name__}",
                     hint="pass image paths, folders, PIL images or image tensors (or a list of them)")


def to_pil(item: Item) -> Image.Image:
    """Decode one item to an RGB PIL image; an unreadable file raises CorruptImageError naming it."""
    if isinstance(item, str):
        return open_rgb(item)
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] not in (1, 3):
            raise ShapeError(f"an image tensor must be (3, H, W) (or (1, H, W)), got {tuple(item.shape)}",
                             hint="pass raw pixels, channels first")
        from torchvision.transforms.functional import to_pil_image

        t = item.detach().cpu()
        if t.is_floating_point() and (float(t.min()) < 0 or float(t.max()) > 1):
            raise ShapeError("float image tensors must hold raw pixels in [0, 1] "
                             f"(got values in [{float(t.min()):.3g}, {float(t.max()):.3g}])",
                             hint="pass uint8 0-255 or float 0-1 pixels, not already-normalised ones")
        return to_pil_image(t).convert("RGB")
    raise InputError(f"cannot classify an object of type {type(item).__name__}",
                     hint="pass image paths, folders, PIL images or image tensors")


def item_name(item: Item, index: int) -> str:
    """How an item is named in outputs: its path, else its position."""
    return item if isinstance(item, str) else f"<input {index}>"
