"""Datasets held in memory as uint8 arrays: CIFAR-10 python batches, Fashion-MNIST idx, sklearn digits."""
from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError
from .base import ImageDataset, Sample
from .cifar_batch import read_cifar_batch
from .templates import CIFAR, DIGITS, FASHION

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class ArrayDataset(ImageDataset):
    """Images as (N, H, W) or (N, H, W, 3) uint8 arrays per split; ids are ``<name>/<split>#<index>``."""

    def __init__(self, name: str, classnames: list[str], templates: list[str],
                 arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.name, self.classnames, self.templates = name, classnames, templates
        self._arrays = arrays
        self._digests: dict[str, str] = {}

    def content_key(self, split: str) -> str | None:
        """SHA-256 of a split's images and labels: two copies with equal labels but other pixels differ."""
        if split not in self._arrays:
            return None
        if split not in self._digests:
            h = hashlib.sha256()
            for arr in self._arrays[split]:
                arr = np.ascontiguousarray(arr)
                h.update(f"{arr.dtype.str}{arr.shape}".encode())
                h.update(memoryview(arr).cast("B"))
            self._digests[split] = h.hexdigest()[:32]
        return self._digests[split]

    def splits(self) -> list[str]:
        return list(self._arrays)

    def samples(self, split: str) -> list[Sample]:
        if split not in self._arrays:
            raise DatasetError(f"{self.name} has no split {split!r}; available: {list(self._arrays)}")
        labels = self._arrays[split][1]
        return [Sample(id=f"{split}#{i}", label=int(y)) for i, y in enumerate(labels)]

    def load_image(self, sample: Sample) -> Image.Image:
        split, _, index = sample.id.partition("#")
        img = self._arrays[split][0][int(index)]
        return Image.fromarray(img).convert("RGB")


def load_cifar10_batches(path: str | Path) -> ArrayDataset:
    """The official ``cifar-10-batches-py`` files (data_batch_1..5, test_batch), read without unpickling
    arbitrary objects (see ``cifar_batch``)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 folder {root} does not exist",
                           hint="pass cifar10:PATH with PATH an ImageFolder (PATH/train/<class>/...) or the "
                                "extracted cifar-10-batches-py folder")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for n in names:
            f = root / n
            if not f.is_file():
                raise DatasetError(f"CIFAR-10 batch file {f} is missing; download cifar-10-python.tar.gz from "
                                   "https://www.cs.toronto.edu/~kriz/cifar.html and extract it under that folder")
            x, y = read_cifar_batch(f)
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    arrays = {"train": read([f"data_batch_{i}" for i in range(1, 6)]), "test": read(["test_batch"])}
    return ArrayDataset("cifar10", CIFAR10_CLASSES, list(CIFAR), arrays)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"cannot read idx file {path}: {exc}") from exc
    if len(data) < 4:
        raise DatasetError(f"{path} is truncated: no idx header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte idx file")
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path} is truncated: incomplete idx header")
    shape = struct.unpack(">" + "I" * ndim, data[4: 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def load_fashion_mnist(path: str | Path | None = None) -> ArrayDataset:
    root = Path(path or DEFAULT_FASHION_MNIST)

    def find(stem: str) -> Path:
        for cand in (root / f"{stem}.gz", root / stem):
            if cand.is_file():
                return cand
        raise DatasetError(f"Fashion-MNIST file {stem}(.gz) not found in {root}; on Debian run "
                           "`apt-get install dataset-fashion-mnist`, or pass fashion-mnist:/path/to/folder")

    arrays = {}
    for split, p in (("train", "train"), ("test", "t10k")):
        images, labels = _read_idx(find(f"{p}-images-idx3-ubyte")), _read_idx(find(f"{p}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"Fashion-MNIST {p} files disagree: images {images.shape}, labels {labels.shape} "
                               f"in {root}")
        if len(labels) and labels.max() >= len(FASHION_CLASSES):
            raise DatasetError(f"Fashion-MNIST {p} labels go up to {labels.max()}; expected 0..9")
        arrays[split] = (images, labels.astype(np.int64))
    return ArrayDataset("fashion-mnist", FASHION_CLASSES, list(FASHION), arrays)


def load_digits_dataset(test_fraction: float = 1 / 3) -> ArrayDataset:
    """scikit-learn's 8x8 digits, scaled to 0-255; a fixed stratified split (seed 0) into train/test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=0, stratify=d.target)
    tr.sort(), te.sort()
    arrays = {"train": (images[tr], d.target[tr].astype(np.int64)), "test": (images[te], d.target[te].astype(np.int64))}
    return ArrayDataset("digits", [str(i) for i in range(10)], list(DIGITS), arrays)
