"""Support and validation when a classifier is fitted on *all* training images (``shots=None``).

The harness's rule at K = ∞: validation is min(K, 4) = 4 images per class, from the dataset's val split
when it has one (then every train image is support), else held out of the train images (seeded per
class exactly like ``fewshot_split``'s validation draw) with the rest as support.
"""
from __future__ import annotations

import numpy as np

from ..data import FewShotSplit
from ..data.base import ImageDataset
from ..errors import DatasetError

VAL_PER_CLASS = 4


def full_split(dataset: ImageDataset, seed: int, val_per_class: int = VAL_PER_CLASS) -> FewShotSplit:
    if "train" not in dataset.splits():
        raise DatasetError(f"{dataset.name} has no train split (splits: {dataset.splits()})",
                           hint="add a train/ folder: DATA/train/<class>/*.jpg")
    groups: dict[int, list] = {}
    for s in dataset.samples("train"):
        groups.setdefault(s.label, []).append(s)
    missing = [dataset.classnames[c] for c in range(len(dataset.classnames)) if c not in groups]
    if missing:
        raise DatasetError(f"{dataset.name}: classes with no training image: {missing[:5]}",
                           hint="give every class folder at least one image (two without a val/ folder)")
    has_val = "val" in dataset.splits()
    val_groups: dict[int, list] = {}
    if has_val:
        for s in dataset.samples("val"):
            val_groups.setdefault(s.label, []).append(s)
    support, val = [], []
    for label in sorted(groups):
        train = sorted(groups[label], key=lambda s: s.id)
        rng = np.random.default_rng([seed, label, 1])
        if has_val:
            pool = sorted(val_groups.get(label, []), key=lambda s: s.id)
            picks = rng.choice(len(pool), size=min(val_per_class, len(pool)), replace=False) if pool else []
            val.extend(pool[i] for i in picks)
            support.extend(train)
            continue
        if len(train) < 2:
            raise DatasetError(f"{dataset.name}: class {dataset.classnames[label]!r} has {len(train)} training "
                               "image; with no val split at least 2 are needed (one to fit, one to validate)",
                               hint="add images, or add a val/ folder with the same class folders")
        n_val = min(val_per_class, len(train) // 2)
        held = set(rng.choice(len(train), size=n_val, replace=False).tolist())
        val.extend(train[i] for i in sorted(held))
        support.extend(s for i, s in enumerate(train) if i not in held)
    if not val:
        raise DatasetError(f"{dataset.name}: no validation images (hyper-parameters are chosen on validation)",
                           hint="add images to the val/ class folders, or remove val/ to hold out train images")
    rule = (f"all train images as support; up to {val_per_class} per class from the val split" if has_val
            else f"up to {val_per_class} per class (at most half) held out of the train images; the rest is support")
    return FewShotSplit(support=support, val=val, test=[], shots=0, seed=seed, val_rule=rule)
