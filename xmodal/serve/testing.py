"""Helpers for tests of the service (and anything built on it): a small fitted classifier saved to disk."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

from PIL import Image


def fit_tiny_classifier(root: str | Path, method: str = "tip-adapter", shots: int = 4, seed: int = 0,
                        classes: int = 3) -> tuple[Any, Path, Path]:
    """Fit ``method`` with the random ``tiny:clip`` backbone on a generated ImageFolder, save it,
    and load it back. Returns (loaded classifier, saved folder, image folder)."""
    from ..bench.testing import make_tiny_imagefolder
    from ..classifier import FewShotClassifier

    root = Path(root)
    images = make_tiny_imagefolder(root / "images", classes=classes, train=8, test=4, seed=seed)
    cache = root / "cache"
    clf = FewShotClassifier(backbone="tiny:clip", method=method, shots=shots, seed=seed, cache_dir=cache, device="cpu")
    clf.fit(f"imagefolder:{images}")
    model_dir = root / "model"
    clf.save(model_dir)
    return FewShotClassifier.load(model_dir, device="cpu", cache_dir=cache), model_dir, images


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(color: tuple[int, int, int] = (30, 160, 40), size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A few-hundred-byte PNG whose header claims ``width`` x ``height`` pixels (a decompression-bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
