"""Few-shot episodes: K support images per class, a small validation set, the untouched test split.

Sampling depends only on (seed, class, sorted sample ids), never on file-system listing order or
the machine, so the same seed selects the same images everywhere.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..errors import DatasetError, UsageError
from .base import ImageDataset, Sample


@dataclass
class FewShotSplit:
    support: list[Sample]
    val: list[Sample]
    test: list[Sample]
    shots: int
    seed: int
    val_rule: str  # how val was drawn, stored with every result


def _by_class(samples: list[Sample]) -> dict[int, list[Sample]]:
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.label].append(s)
    return {label: sorted(group, key=lambda s: s.id) for label, group in groups.items()}


def _draw(group: list[Sample], k: int, rng: np.random.Generator) -> list[Sample]:
    """k items without replacement; with replacement only if the class has fewer than k (CoOp's rule)."""
    replace = len(group) < k
    picks = rng.choice(len(group), size=k, replace=replace)
    return [group[i] for i in picks]


def _check_shots_value(shots: object) -> None:
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise UsageError(f"shots must be an integer >= 1, got {shots!r}", hint="use --shots 1 or more")


def train_groups(dataset: ImageDataset) -> dict[int, list[Sample]]:
    """The train split by class, after the checks every few-shot episode needs (a train split, at least
    two classes, every class present, no sample listed twice)."""
    if "train" not in dataset.splits():
        raise DatasetError(f"{dataset.name} has no train split; few-shot needs one (splits: {dataset.splits()})",
                           hint="add a train/ folder (ImageFolder) or a 'train' list (split file)")
    if len(dataset.classnames) < 2:
        raise DatasetError(f"{dataset.name} has {len(dataset.classnames)} class(es); few-shot classification "
                           "needs at least 2", hint="add class folders (one per class) to the dataset")
    train_samples = dataset.samples("train")
    ids = [s.id for s in train_samples]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise DatasetError(f"{dataset.name}: the train split lists {dup!r} more than once",
                           hint="remove the duplicate entries from the split file")
    train = _by_class(train_samples)
    missing = [dataset.classnames[c] for c in range(len(dataset.classnames)) if c not in train]
    if missing:
        raise DatasetError(f"{dataset.name}: classes with no training image: {missing[:5]}",
                           hint="add images to those class folders or remove the empty folders")
    return train


def check_shots(dataset: ImageDataset, shots: int | list[int], needs_val: bool = False) -> dict[int, list[Sample]]:
    """Refuse shot counts no class can supply (before any work); returns ``train_groups(dataset)``.

    A class with fewer than K images gets its support drawn with replacement (CoOp's rule), but when not
    even the largest class has K images a "K-shot" result would rest on repeats only, so it is an error.
    ``needs_val``: validation images are drawn from train (the harness, no val split), so the shot count
    the error suggests leaves one image per class for validation: the suggestion then works when run.
    """
    values = [shots] if not isinstance(shots, (list, tuple)) else list(shots)
    for k in values:
        _check_shots_value(k)
    train = train_groups(dataset)
    largest = max(len(g) for g in train.values())
    too_many = sorted(k for k in values if k > largest)
    if too_many:
        raise UsageError(f"{dataset.name}: no class has {too_many[0]} training images (the largest has {largest}); "
                         f"{too_many[0]}-shot episodes would repeat the same images",
                         hint=_shots_hint(dataset, train, needs_val and "val" not in dataset.splits(), largest))
    return train


def _shots_hint(dataset: ImageDataset, train: dict[int, list[Sample]], val_from_train: bool, largest: int) -> str:
    """A --shots value that works: every class keeps an image for validation when val comes from train."""
    if not val_from_train:
        return f"use --shots {largest} or fewer for this dataset"
    label, smallest = min(((c, len(g)) for c, g in train.items()), key=lambda x: (x[1], x[0]))
    if smallest >= 2:
        return (f"use --shots {smallest - 1} or fewer for this dataset (class {dataset.classnames[label]!r} has "
                f"{smallest} training images and keeps one for validation)")
    return (f"add a val/ split, or a second training image to class {dataset.classnames[label]!r} (validation "
            "images are drawn from the train images left after the support draw)")


def _support_only(train: dict[int, list[Sample]], shots: int, seed: int) -> list[Sample]:
    """The support draw of ``fewshot_split`` alone (the same images for the same seed)."""
    return [s for label in sorted(train) for s in _draw(train[label], shots, np.random.default_rng([seed, label]))]


def fewshot_split(dataset: ImageDataset, shots: int, seed: int, val_per_class: int | None = None,
                  test_split: str = "test", if_no_val: str = "error") -> FewShotSplit:
    """K per class from train; val = min(K, 4) per class from the val split (CoOp's rule) or, when the
    dataset has no val split, from the train images not chosen as support; test = the full test split.

    ``if_no_val``: what to do when some class has no image left for validation — ``"error"`` (the harness:
    a K-shot result needs a validation set) or ``"empty"`` (return ``val=[]`` for every class, so the caller
    chooses hyper-parameters by cross-validation over the support images instead)."""
    if if_no_val not in ("error", "empty"):
        raise ValueError(f"if_no_val must be 'error' or 'empty', got {if_no_val!r}")
    _check_shots_value(shots)
    n_val = min(shots, 4) if val_per_class is None else val_per_class
    if n_val < 0:
        raise UsageError(f"val_per_class must be >= 0, got {val_per_class}")
    train = check_shots(dataset, shots, needs_val=bool(n_val) and if_no_val == "error")
    small = {dataset.classnames[c]: len(g) for c, g in train.items() if len(g) < shots}
    if small:
        warnings.warn(f"{dataset.name}: {len(small)} class(es) have fewer than {shots} training images "
                      f"({dict(list(small.items())[:5])}); their support sets repeat images (drawn with "
                      "replacement, as CoOp does)", stacklevel=2)
    support, val = [], []
    has_val = "val" in dataset.splits()
    val_groups = _by_class(dataset.samples("val")) if has_val else {}
    for label in sorted(train):
        rng = np.random.default_rng([seed, label])
        chosen = _draw(train[label], shots, rng)
        support.extend(chosen)
        if has_val:
            pool = val_groups.get(label, [])
        else:
            taken = {s.id for s in chosen}
            pool = [s for s in train[label] if s.id not in taken]
        if n_val and not pool and if_no_val == "empty":
            return FewShotSplit(support=_support_only(train, shots, seed), val=[],
                                test=dataset.samples(test_split) if test_split in dataset.splits() else [],
                                shots=shots, seed=seed, val_rule="none: a class has no image left for validation")
        if n_val and not pool:
            where = "in the val split" if has_val else f"left in train after drawing {shots} support image(s)"
            raise DatasetError(f"{dataset.name}: no validation image for class {dataset.classnames[label]!r} "
                               f"({where}; it has {len(train[label])} training image(s))",
                               hint=_shots_hint(dataset, train, True, shots) if not has_val
                               else "add validation images for that class to the val split")
        val.extend(_draw(pool, min(n_val, len(pool)), np.random.default_rng([seed, label, 1])) if n_val else [])
    rule = (f"min(K,4)={n_val} per class from the val split" if has_val
            else f"min(K,4)={n_val} per class from train images not in the support set (dataset has no val split)")
    test = dataset.samples(test_split) if test_split in dataset.splits() else []
    return FewShotSplit(support=support, val=val, test=test, shots=shots, seed=seed, val_rule=rule)
