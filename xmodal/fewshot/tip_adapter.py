"""Tip-Adapter (Zhang et al., ECCV 2022): training-free key-value cache of the support features."""
from __future__ import annotations

import torch

from ..featureset import FeatureSet
from ._cache import CacheModel
from ._common import (CLIP_LOGIT_SCALE, cache_grid_search, cache_keys, check_features, check_fit_inputs, key_source,
                      require_fitted, tip_grid)
from .base import FewShotMethod, register


class _TipSearchMixin:
    """Tip-Adapter's (β, α) grids: β_i = 0.1 + i(s_β − 0.1)/n_β, α_j = (0.1 + j(s_α − 0.1)/n_α)·logit_scale/100."""

    beta_scale: float
    alpha_scale: float
    n_beta: int
    n_alpha: int
    logit_scale: float

    def _betas(self) -> list[float]:
        return tip_grid(self.beta_scale, self.n_beta)

    def _alphas(self) -> list[float]:
        unit = self.logit_scale / CLIP_LOGIT_SCALE
        return [a * unit for a in tip_grid(self.alpha_scale, self.n_alpha)]

    def _grid_info(self) -> dict:
        return {"beta_scale": float(self.beta_scale), "alpha_scale": float(self.alpha_scale),
                "n_beta": int(self.n_beta), "n_alpha": int(self.n_alpha)}

    def _search_image_cache(self, fv: torch.Tensor, yv: torch.Tensor) -> float:
        """Grid-search (β, α) of the image cache ``self.model_`` on validation; sets alpha_, beta_; returns val acc."""
        betas, alphas = self._betas(), self._alphas()
        with torch.no_grad():
            _, bi, ai, acc = cache_grid_search(self.model_.zero_shot(fv), yv, fv @ self.model_.keys.T,
                                               self.model_.values, betas, alphas, group=self.model_.group)
        self.alpha_, self.beta_ = alphas[ai], betas[bi]
        return float(acc[0, bi, ai])

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Image-cache scores with the selected α, β (XMAdapter overrides this to add its text cache)."""
        require_fitted(self, "model_")
        check_features(features, self.model_.keys.shape[1])
        with torch.no_grad():
            scores, _, _ = self.model_(features.float().to(self.device), self.alpha_, self.beta_)
        return scores.to(features.device)


@register("tip-adapter")
class TipAdapter(_TipSearchMixin, FewShotMethod):
    """logits = logit_scale·f Wᵀ + α·exp(−β(1 − f Kᵀ))·L.

    Keys K: mean of the support's augmented-view embeddings, L2-normalised (plain features when the
    FeatureSet has no views); values L: one-hot labels. (α, β) maximise validation accuracy over
    Tip-Adapter's grid (first best in β-major order on ties). The α grid is scaled by logit_scale/100.
    """

    training_free = True

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 beta_scale: float = 10.0, alpha_scale: float = 10.0, n_beta: int = 50, n_alpha: int = 20) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.beta_scale, self.alpha_scale = beta_scale, alpha_scale
        self.n_beta, self.n_alpha = n_beta, n_alpha

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "TipAdapter":
        check_fit_inputs(support, val, text_classifier)
        dev = self.device
        self.model_ = CacheModel(cache_keys(support), support.labels, text_classifier, self.logit_scale,
                                 train_keys=False).to(dev)
        val_acc = self._search_image_cache(val.features.float().to(dev), val.labels.to(dev))
        self.selected_ = {"alpha": float(self.alpha_), "beta": float(self.beta_),
                          "val_acc": val_acc, "cache_keys": key_source(support),
                          "cache_size": int(self.model_.keys.shape[0]), **self._grid_info()}
        return self
