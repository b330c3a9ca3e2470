"""Preprocessed images of an episode's samples, by id: what image-tower methods (CLIP-LoRA) train on.

``view=None`` is the backbone's deterministic eval transform; ``view=v`` the v-th random augmentation
(the backbone's train transform), seeded by (seed, v, sample id) so every run draws the same crops.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch


class PixelSource:
    """``source(ids, view=None) -> (N, 3, H, W)`` for samples of ``dataset`` (any split)."""

    def __init__(self, dataset: Any, backbone: Any, seed: int = 0) -> None:
        self.dataset, self.backbone, self.seed = dataset, backbone, int(seed)
        self._by_id: dict[str, Any] | None = None

    def _sample(self, sample_id: str) -> Any:
        if self._by_id is None:
            self._by_id = {s.id: s for split in self.dataset.splits() for s in self.dataset.samples(split)}
        if sample_id not in self._by_id:
            raise KeyError(f"sample {sample_id!r} is not in dataset {getattr(self.dataset, 'name', '?')}")
        return self._by_id[sample_id]

    def __call__(self, ids: list[str], view: int | None = None) -> torch.Tensor:
        transform = self.backbone.preprocess if view is None else self.backbone.augment_preprocess()
        out = []
        for sample_id in ids:
            image = self.dataset.load_image(self._sample(sample_id))
            if view is None:
                out.append(transform(image))
                continue
            digest = hashlib.sha256(f"{self.seed}|{view}|{sample_id}".encode()).digest()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int.from_bytes(digest[:8], "little"))
                out.append(transform(image))
        return torch.stack(out) if out else torch.empty(0)


def predict_ids(method: Any, ids: list[str], chunk: int = 256) -> torch.Tensor:
    """Predicted labels of an image-tower method for samples ``ids``, decoding ``chunk`` images at a time
    (the images of a test split do not fit in memory at once)."""
    out = [method.image_scores(method._pixels(ids[i:i + chunk])).argmax(dim=1).cpu()
           for i in range(0, len(ids), chunk)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def set_scores(method: Any, fs: Any, chunk: int = 256) -> torch.Tensor:
    """(N, C) scores of a fitted method for the samples of a FeatureSet: from the cached features, or — for
    an image-tower method — from the images themselves (through its bound pixel source)."""
    if not getattr(method, "needs_images", False):
        return method.decision_scores(fs.features.clone())
    ids = list(fs.ids)
    out = [method.image_scores(method._pixels(ids[i:i + chunk])).cpu() for i in range(0, len(ids), chunk)]
    return torch.cat(out) if out else torch.empty(0, fs.num_classes)
