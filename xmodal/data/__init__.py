"""Image datasets behind one spec syntax, few-shot sampling and prompt templates.

Dataset specs (CLI and configs):
  imagefolder:PATH       PATH/<split>/<class>/*.jpg
  coop:NAME@ROOT         CoOp layout under ROOT (the 11 standard datasets + ImageNet-V2/-Sketch/-A/-R)
  cifar10:PATH           CIFAR-10 as an ImageFolder or the official python batches
  fashion-mnist[:PATH]   idx .gz files (default /usr/share/datasets/fashion-mnist)
  digits                 scikit-learn's 8x8 digits
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DatasetError
from .arrays import load_cifar10_batches, load_digits_dataset, load_fashion_mnist
from .base import ImageDataset, Sample
from .coop import COOP_DATASETS, STANDARD_11, CoopDataset
from .imagefolder import ImageFolderDataset
from .sampler import FewShotSplit, check_shots, fewshot_split
from .templates import CIFAR

DATASET_SPECS = {
    "imagefolder:PATH": "PATH/<split>/<class>/*.jpg (your own data)",
    "coop:NAME@ROOT": "CoOp layout; NAME in " + ", ".join(COOP_DATASETS),
    "cifar10:PATH": "CIFAR-10 as ImageFolder or official python batches",
    "fashion-mnist[:PATH]": "Fashion-MNIST idx files (default /usr/share/datasets/fashion-mnist)",
    "digits": "scikit-learn 8x8 digits (fixed 2/3 train, 1/3 test split)",
}


def load_dataset(spec: str) -> ImageDataset:
    """Build the dataset named by ``spec`` (see module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "imagefolder":
        if not arg:
            raise DatasetError("imagefolder needs a path: imagefolder:/path/to/root")
        return ImageFolderDataset(arg, name=spec)
    if kind == "coop":
        name, sep, root = arg.partition("@")
        if not sep or not name or not root:
            raise DatasetError(f"coop spec must be coop:NAME@ROOT (e.g. coop:DTD@/data), got {spec!r}")
        return CoopDataset(name, root)
    if kind == "cifar10":
        if not arg:
            raise DatasetError("cifar10 needs a path: cifar10:/path/to/cifar10")
        if (Path(arg) / "train").is_dir():
            return ImageFolderDataset(arg, name=spec, templates=list(CIFAR))
        return load_cifar10_batches(arg)
    if kind == "fashion-mnist":
        return load_fashion_mnist(arg or None)
    if kind == "digits":
        return load_digits_dataset()
    raise DatasetError(f"unknown dataset spec {spec!r}; known forms: " + "; ".join(DATASET_SPECS))


__all__ = ["ImageDataset", "Sample", "FewShotSplit", "fewshot_split", "check_shots", "load_dataset", "DATASET_SPECS",
           "COOP_DATASETS", "STANDARD_11"]
