"""Which images a classifier is fitted on, decided before any model is loaded (no torch here).

``xmodal fit`` lists the dataset, draws support and validation and checks that the selection can work
(a validation image per class, or at least 2 distinct photos per class for cross-validation) first, so a
wrong folder, a too-large ``--shots`` or a class with one photo is reported at once, not after the
backbone and torch have loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import FewShotSplit
from ..errors import DatasetError, InputError

MAX_FOLDS = 4  # the harness validates on min(K, 4) images per class; 4 folds hold out K/4 per class


def resolve_dataset(data: Any) -> tuple[Any, str]:
    """(dataset, spec) from a spec (``imagefolder:PATH`` …), an ImageFolder path or an ``ImageDataset``."""
    from ..data import load_dataset
    from ..data.base import ImageDataset

    if isinstance(data, ImageDataset):
        return data, str(getattr(data, "spec", None) or data.name)
    if isinstance(data, Path) or (isinstance(data, str) and Path(data).expanduser().is_dir()):
        spec = f"imagefolder:{Path(data).expanduser().resolve()}"
        return load_dataset(spec), spec
    if isinstance(data, str):
        return load_dataset(data), data
    raise InputError(f"cannot fit on an object of type {type(data).__name__}",
                     hint="pass a dataset spec (imagefolder:PATH, cifar10:PATH ...), a folder or an ImageDataset")


def folds_for(ids: list[str], labels: list[int], classnames: list[str], max_folds: int = MAX_FOLDS) -> int:
    """min(max_folds, distinct images of the smallest class); a class needs 2 (one to fit, one to validate)."""
    counts: dict[int, set[str]] = {}
    for sample_id, label in zip(ids, labels):
        counts.setdefault(int(label), set()).add(sample_id)
    smallest = min(counts.items(), key=lambda kv: (len(kv[1]), kv[0]))
    if len(smallest[1]) < 2:
        name = classnames[smallest[0]]
        raise DatasetError(f"class {name!r} has 1 distinct training image and no validation image: "
                           "cross-validation needs at least 2 (one to fit, one to validate)",
                           hint="add images to that class (or a val/ folder with the same class folders)")
    return min(max_folds, len(smallest[1]))


def plan_split(dataset: Any, shots: int | None, seed: int) -> FewShotSplit:
    """Support and validation as ``xmodal fewshot`` draws them (every train image when ``shots`` is None);
    ``val`` is empty when a class has no image left for validation, and cross-validation is then feasible."""
    from ..data import fewshot_split
    from .split import full_split

    split = (full_split(dataset, seed) if shots is None
             else fewshot_split(dataset, shots, seed, if_no_val="empty"))
    if not split.val:
        folds_for([s.id for s in split.support], [s.label for s in split.support], list(dataset.classnames))
    return split


__all__ = ["resolve_dataset", "plan_split", "folds_for", "MAX_FOLDS"]
