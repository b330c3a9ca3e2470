"""Hyper-parameters chosen by k-fold cross-validation over the support images, for K photos and no val set.

When a class has no image left for a validation set (``xmodal fit --shots 16`` on exactly 16 photos per
class, no ``val/``), the support is split into k stratified folds. Member i is the method fitted on every
fold but i, choosing its hyper-parameters on fold i alone: a held-out fold never trains the model it selects
for, the same val-only rule as with a validation set. Every support image trains k − 1 of the k members, so
all K images are used. The classifier is the k members together (mean of their class probabilities).

Why members rather than one refit on all K with "the chosen settings": each method chooses its settings
inside ``fit`` by searching on validation (α, β, γ grids, the training epoch, stage-2 fallback …), and a refit
on all K would have nothing held out to make those choices on; the members keep every choice validated
on images it never trained on, for every registered method, through the one ``fit`` protocol.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..featureset import FeatureSet
from ..fewshot.base import FewShotMethod
from ..fewshot.pixels import set_scores
from .plan import MAX_FOLDS, folds_for


def n_folds(support: FeatureSet, max_folds: int = MAX_FOLDS) -> int:
    """min(max_folds, distinct images of the smallest class); a class needs 2 (one to fit, one to validate)."""
    return folds_for(support.ids, support.labels.tolist(), support.classnames, max_folds)


def stratified_folds(support: FeatureSet, k: int, seed: int) -> list[list[str]]:
    """k folds of distinct sample ids; each class's images are dealt round-robin in a seeded order, so every
    fold holds ⌊n_c/k⌋ or ⌈n_c/k⌉ images of class c and a repeated image (CoOp's draw) stays in one fold."""
    folds: list[list[str]] = [[] for _ in range(k)]
    by_class: dict[int, list[str]] = {}
    for sample_id, label in zip(support.ids, support.labels.tolist()):
        group = by_class.setdefault(int(label), [])
        if sample_id not in group:
            group.append(sample_id)
    for label in sorted(by_class):
        ids = sorted(by_class[label])
        order = np.random.default_rng([seed, label, 2]).permutation(len(ids))
        for j, i in enumerate(order.tolist()):
            folds[(j + label) % k].append(ids[i])  # offset by class: fold sizes stay balanced
    return folds


def _rows(fs: FeatureSet, keep: set[str]) -> FeatureSet:
    """The rows of ``fs`` whose id is in ``keep`` (every copy of a repeated image), in their order."""
    return fs.subset([i for i in fs.ids if i in keep])


def _plain(fs: FeatureSet) -> FeatureSet:
    return FeatureSet(features=fs.features, labels=fs.labels, ids=fs.ids, classnames=fs.classnames, meta=fs.meta)


class CrossFitted:
    """k fitted members of one method; scores are the log of their mean class probabilities (so a softmax
    of ``decision_scores`` is that mean). Quacks like a fitted ``FewShotMethod`` for the classifier."""

    def __init__(self, members: list[FewShotMethod], folds: list[list[str]]) -> None:
        if len(members) != len(folds) or len(members) < 2:
            raise ValueError("CrossFitted needs one member per fold and at least 2 folds")
        self.members = members
        self.folds = folds
        self.name = members[0].name
        self.training_free = bool(getattr(members[0], "training_free", True))
        self.needs_backbone = bool(getattr(members[0], "needs_backbone", False))
        self.needs_images = bool(getattr(members[0], "needs_images", False))
        self.selected_ = {"selection": f"k-fold CV over support, k={len(folds)}", "k": len(folds),
                          "per_fold": [dict(m.selected_) for m in members]}

    @property
    def selection(self) -> str:
        return self.selected_["selection"]

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m.decision_scores(features).float().softmax(-1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-30).log()

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.decision_scores(features).argmax(dim=1)

    def bind_backbone(self, backbone: Any, pixels: Any = None) -> "CrossFitted":
        """Hand every member the backbone (tower methods need it after loading)."""
        for member in self.members:
            member.bind_backbone(backbone, pixels)
        return self

    def image_scores(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image-tower methods: the log of the members' mean probabilities on preprocessed images."""
        probs = torch.stack([m.image_scores(pixels).float().softmax(-1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-30).log()

    def get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        metas = []
        for i, member in enumerate(self.members):
            t, meta = member.get_state()
            tensors.update({f"fold{i}/{key}": value for key, value in t.items()})
            metas.append(meta)
        return tensors, {"crossfit": {"k": len(self.members), "folds": self.folds, "members": metas}}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: str = "cpu") -> "CrossFitted":
        spec = meta["crossfit"]
        members = []
        for i, member_meta in enumerate(spec["members"]):
            prefix = f"fold{i}/"
            sub = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            members.append(FewShotMethod.from_state(sub, member_meta, device=device))
        return cls(members, [list(map(str, f)) for f in spec["folds"]])


def method_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: str = "cpu") -> Any:
    """A saved method: one ``FewShotMethod``, or the cross-fitted members when the state says so."""
    if isinstance(meta, dict) and isinstance(meta.get("crossfit"), dict):
        return CrossFitted.from_state(tensors, meta, device)
    return FewShotMethod.from_state(tensors, meta, device=device)


def fit_crossfitted(make_method: Callable[[], FewShotMethod], support: FeatureSet, text_classifier: torch.Tensor,
                    seed: int, max_folds: int = MAX_FOLDS) -> tuple[CrossFitted, torch.Tensor, torch.Tensor]:
    """(members, out-of-fold probabilities (U, C), their labels (U,)) over the U distinct support images.

    Out-of-fold: each image is scored by the one member that did not train on it — an estimate of accuracy
    on new images (optimistic only because that member chose its settings on the same fold).
    """
    k = n_folds(support, max_folds)
    folds = stratified_folds(support, k, seed)
    members, oof_probs, oof_labels = [], [], []
    for fold in folds:
        held = set(fold)
        train = _rows(support, set(support.ids) - held)
        val = _plain(support.subset(fold))
        method = make_method()
        torch.manual_seed(seed)  # as the harness does before every fit
        method.fit(train, val, text_classifier.clone())
        with torch.no_grad():  # features, or the images themselves for an image-tower method
            oof_probs.append(set_scores(method, val).float().softmax(-1).cpu())
        oof_labels.append(val.labels.cpu())
        members.append(method)
    return CrossFitted(members, folds), torch.cat(oof_probs), torch.cat(oof_labels)


__all__ = ["CrossFitted", "fit_crossfitted", "folds_for", "method_from_state", "n_folds", "stratified_folds",
           "MAX_FOLDS"]
