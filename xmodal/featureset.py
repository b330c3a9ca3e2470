"""FeatureSet: cached embeddings of a set of images, with labels and stable ids.

This is what flows from `xmodal.features` into every few-shot method: methods never see images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ShapeError


@dataclass
class FeatureSet:
    """Embeddings of N images.

    features   (N, D) float32, L2-normalised image embeddings (deterministic preprocessing)
    labels     (N,) int64 class indices
    ids        N stable sample ids (relative paths or "<name>#<index>")
    classnames class names, index = label
    views      optional (V, N, D) embeddings of V random augmentations of each image
    meta       provenance: backbone fingerprint, dataset, split, preprocessing ...
    """

    features: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    classnames: list[str]
    views: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.features.ndim != 2:
            raise ShapeError(f"features must be (N, D), got {tuple(self.features.shape)}")
        if self.labels.shape != (n,):
            raise ShapeError(f"labels must be ({n},) to match features, got {tuple(self.labels.shape)}")
        if len(self.ids) != n:
            raise ShapeError(f"{len(self.ids)} ids for {n} feature rows")
        if self.views is not None and (self.views.ndim != 3 or self.views.shape[1:] != self.features.shape):
            raise ShapeError(f"views must be (V, {n}, {self.features.shape[1]}), got {tuple(self.views.shape)}")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classnames)):
            raise ShapeError(f"labels must lie in [0, {len(self.classnames)}); got range "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def subset(self, ids: list[str]) -> "FeatureSet":
        """Rows with the given ids, in that order; unknown ids raise with the first few named."""
        index = {sample_id: row for row, sample_id in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise KeyError(f"{len(missing)} ids not in this FeatureSet (e.g. {missing[:3]}); "
                           "were the features extracted from the same dataset split?")
        rows = torch.tensor([index[i] for i in ids], dtype=torch.long)
        return FeatureSet(
            features=self.features[rows], labels=self.labels[rows], ids=list(ids),
            classnames=self.classnames,
            views=None if self.views is None else self.views[:, rows],
            meta=dict(self.meta),
        )
