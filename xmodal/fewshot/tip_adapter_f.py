"""Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned (Zhang et al., ECCV 2022)."""
from __future__ import annotations

import torch

from ..featureset import FeatureSet
from ._cache import CacheModel, train_cache_model
from ._common import CLIP_LOGIT_SCALE, cache_keys, check_fit_inputs, key_source, seeded
from .base import FewShotMethod, register
from .tip_adapter import _TipSearchMixin


@register("tip-adapter-f")
class TipAdapterF(_TipSearchMixin, FewShotMethod):
    """Keys initialised from the Tip-Adapter cache and trained (values, W frozen).

    AdamW (lr 1e-3, eps 1e-4), cosine schedule, ``epochs`` epochs of shuffled batches; epoch e uses
    augmented view e mod V of each support image. Training logits use the initial α, β; the epoch with the
    best validation accuracy is kept, then (α, β) are grid-searched on validation as in Tip-Adapter.
    As in the reference code the trained keys are not re-normalised.
    """

    training_free = False

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 epochs: int = 20, lr: float = 1e-3, eps: float = 1e-4, batch_size: int = 256,
                 init_alpha: float = 1.0, init_beta: float = 1.0,
                 beta_scale: float = 10.0, alpha_scale: float = 10.0, n_beta: int = 50, n_alpha: int = 20) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.epochs, self.lr, self.eps, self.batch_size = epochs, lr, eps, batch_size
        self.init_alpha, self.init_beta = init_alpha, init_beta
        self.beta_scale, self.alpha_scale = beta_scale, alpha_scale
        self.n_beta, self.n_alpha = n_beta, n_alpha

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "TipAdapterF":
        check_fit_inputs(support, val, text_classifier)
        dev = self.device
        self.model_ = CacheModel(cache_keys(support), support.labels, text_classifier, self.logit_scale,
                                 train_keys=True).to(dev)
        fv, yv = val.features.float().to(dev), val.labels.to(dev)
        init_alpha = self.init_alpha * self.logit_scale / CLIP_LOGIT_SCALE
        with seeded(self.seed):
            best_epoch, curve = train_cache_model(
                self.model_, support, fv, yv, [{"params": [self.model_.keys]}],
                epochs=self.epochs, lr=self.lr, eps=self.eps, batch_size=self.batch_size,
                alpha=init_alpha, beta=self.init_beta, beta_t=None, seed=self.seed, device=dev)
        val_acc = self._search_image_cache(fv, yv)
        self.selected_ = {"alpha": float(self.alpha_), "beta": float(self.beta_), "epoch": int(best_epoch),
                          "val_acc": val_acc, "val_acc_per_epoch": [float(a) for a in curve],
                          "epochs": int(self.epochs), "lr": float(self.lr), "batch_size": int(self.batch_size),
                          "init_alpha": float(init_alpha), "init_beta": float(self.init_beta),
                          "cache_keys": key_source(support), **self._grid_info()}
        return self
