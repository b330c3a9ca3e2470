"""Helpers for tests of the harness (and of code built on it): a tiny ImageFolder and spy methods."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..featureset import FeatureSet
from ..fewshot.base import _REGISTRY, FewShotMethod


def make_tiny_imagefolder(root: str | Path, classes: int = 3, train: int = 6, test: int = 4, val: int = 0,
                          size: int = 32, seed: int = 0) -> Path:
    """Random ``size``-px PNGs in ``root/{train,test[,val]}/<class>/*.png``; each class gets its own mean colour
    so a classifier can beat chance."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    counts = {"train": train, "test": test, **({"val": val} if val else {})}
    for c in range(classes):
        base = rng.integers(0, 256, size=3)
        for split, n in counts.items():
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.integers(-60, 61, size=(size, size, 3))
                img = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"img{i:03d}.png")
    return root


@contextlib.contextmanager
def registered(name: str, cls: type[FewShotMethod]) -> Iterator[type[FewShotMethod]]:
    """Register ``cls`` under ``name`` for the duration of a ``with`` block."""
    previous = _REGISTRY.get(name)
    cls.name = name
    _REGISTRY[name] = cls
    try:
        yield cls
    finally:
        if previous is None:
            _REGISTRY.pop(name, None)
        else:
            _REGISTRY[name] = previous


class SpyMethod(FewShotMethod):
    """Zero-shot scores, but records everything the harness hands over (class attribute ``calls``)."""

    calls: list[dict[str, Any]] = []
    fail_after: int | None = None  # raise on the (fail_after + 1)-th fit: simulates a killed sweep

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "SpyMethod":
        type(self).calls.append({"event": "fit", "support": support, "val": val,
                                 "text_classifier": text_classifier, "seed": self.seed})
        fits = sum(1 for c in type(self).calls if c["event"] == "fit")
        if type(self).fail_after is not None and fits > type(self).fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.w_ = text_classifier.float()
        self.selected_ = {"alpha": 1.0, "seed_seen": self.seed}
        return self

    def decision_scores(self, features: Any) -> torch.Tensor:
        type(self).calls.append({"event": "scores", "arg": features})
        return self.logit_scale * features.float() @ self.w_.T
