"""Synthetic feature sets for tests and timing: Gaussian class clusters on the unit sphere."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..featureset import FeatureSet


def make_split(centres: torch.Tensor, per_class: int, spread: float, views: int, view_noise: float,
               generator: torch.Generator, name: str) -> FeatureSet:
    c, d = centres.shape
    labels = torch.arange(c).repeat_interleave(per_class)
    feats = F.normalize(centres[labels] + spread * torch.randn(len(labels), d, generator=generator) / d**0.5, dim=-1)
    v = None
    if views:
        v = F.normalize(feats[None] + view_noise * torch.randn(views, len(labels), d, generator=generator) / d**0.5,
                        dim=-1)
    return FeatureSet(features=feats, labels=labels, ids=[f"{name}#{i}" for i in range(len(labels))],
                      classnames=[f"class{i}" for i in range(c)], views=v, meta={"split": name})


def make_task(num_classes: int = 4, dim: int = 32, shots: int = 8, val_per_class: int = 4, test_per_class: int = 50,
              spread: float = 1.0, views: int = 4, view_noise: float = 0.3, text_noise: float = 0.3,
              seed: int = 0) -> tuple[FeatureSet, FeatureSet, FeatureSet, torch.Tensor]:
    """(support, val, test, text_classifier). The text classifier rows are the class centres plus
    ``text_noise``-scaled Gaussian noise (relative to the centre's unit norm), L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)
    support = make_split(centres, shots, spread, views, view_noise, g, "support")
    val = make_split(centres, val_per_class, spread, 0, view_noise, g, "val")
    test = make_split(centres, test_per_class, spread, 0, view_noise, g, "test")
    text = F.normalize(centres + text_noise * torch.randn(num_classes, dim, generator=g) / dim**0.5 * 3, dim=-1)
    return support, val, test, text
