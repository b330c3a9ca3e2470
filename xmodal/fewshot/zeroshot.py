"""Zero-shot classification with the prompt-ensemble text classifier (nothing is fitted)."""
from __future__ import annotations

import torch

from ..featureset import FeatureSet
from .base import FewShotMethod, register


@register("zeroshot")
class ZeroShot(FewShotMethod):
    """logits = logit_scale · f Wᵀ, W = L2-normalised mean of the prompt-template text embeddings."""

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "ZeroShot":
        self.text_classifier_ = text_classifier.float()
        self.selected_ = {}
        return self

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * features.float() @ self.text_classifier_.T
