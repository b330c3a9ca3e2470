"""Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned (Zhang et al., ECCV 2022)."""
from __future__ import annotations

import torch

from ..featureset import FeatureSet
from ._cache import CacheModel, resolve_epochs, train_cache_model, val_loss_acc
from ._common import cache_keys, check_fit_inputs, key_source, seeded
from .base import FewShotMethod, register
from .tip_adapter import _TipSearchMixin


@register("tip-adapter-f")
class TipAdapterF(_TipSearchMixin, FewShotMethod):
    """Keys initialised from the Tip-Adapter cache and trained (values, W frozen).

    1. Training-free start: (α₀, β₀) grid-searched on validation exactly as Tip-Adapter.
    2. AdamW (lr 1e-3, eps 1e-4, weight decay 0.01), cosine schedule, CE on
       ``logit_scale·f Wᵀ + α₀·exp(−β₀(1 − f Kᵀ))·L``; epoch e uses augmented view e mod V of each image.
       ``epochs="auto"``: max(20, ⌈min_steps / batches per epoch⌉) epochs, at most ``max_epochs``.
    3. Epoch selection on validation log-loss at (α₀, β₀) (ties: accuracy), the untrained keys (epoch 0)
       being a candidate; then (α, β) re-searched on validation for the chosen keys.
    4. Guard: if the trained solution's validation accuracy is below the training-free one, the
       training-free keys and (α₀, β₀) are kept, so validation accuracy never drops below Tip-Adapter's.
    As in the reference code the trained keys are not re-normalised.
    """

    training_free = False

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 epochs: int | str = "auto", min_steps: int = 200, max_epochs: int = 200,
                 lr: float = 1e-3, eps: float = 1e-4, batch_size: int = 256, weight_decay: float = 0.01,
                 beta_scale: float = 10.0, alpha_scale: float = 10.0, n_beta: int = 50, n_alpha: int = 20) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.epochs, self.min_steps, self.max_epochs = epochs, min_steps, max_epochs
        self.lr, self.eps, self.batch_size, self.weight_decay = lr, eps, batch_size, weight_decay
        self.beta_scale, self.alpha_scale = beta_scale, alpha_scale
        self.n_beta, self.n_alpha = n_beta, n_alpha

    def _val_loss_acc(self, fv: torch.Tensor, yv: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            logits, _, _ = self.model_(fv, self.alpha_, self.beta_)
        return val_loss_acc(logits, yv)

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "TipAdapterF":
        check_fit_inputs(support, val, text_classifier)
        dev = self.device
        keys0 = cache_keys(support)
        self.model_ = CacheModel(keys0, support.labels, text_classifier, self.logit_scale, train_keys=True).to(dev)
        fv, yv = val.features.float().to(dev), val.labels.to(dev)
        base_acc = self._search_image_cache(fv, yv)
        alpha0, beta0 = self.alpha_, self.beta_
        base_loss, _ = self._val_loss_acc(fv, yv)
        epochs = resolve_epochs(self.epochs, len(support), self.batch_size, self.min_steps, self.max_epochs)
        with seeded(self.seed):
            best_epoch, curve, losses = train_cache_model(
                self.model_, support, fv, yv, [{"params": [self.model_.keys]}],
                epochs=epochs, lr=self.lr, eps=self.eps, batch_size=self.batch_size, alpha=alpha0, beta=beta0,
                beta_t=None, seed=self.seed, device=dev, weight_decay=self.weight_decay,
                on_epoch=self.on_epoch)
        kept = "training-free"
        val_acc, val_loss = base_acc, base_loss
        if best_epoch > 0:
            acc = self._search_image_cache(fv, yv)
            if acc >= base_acc:
                kept, val_acc = "trained", acc
                val_loss, _ = self._val_loss_acc(fv, yv)
            else:  # the re-searched trained keys lost accuracy on val: back to the training-free solution
                with torch.no_grad():
                    self.model_.keys.copy_(keys0.to(dev))
                self.alpha_, self.beta_ = alpha0, beta0
                best_epoch = 0
        self.selected_ = {"alpha": float(self.alpha_), "beta": float(self.beta_), "epoch": int(best_epoch),
                          "kept": kept, "val_acc": float(val_acc), "val_loss": float(val_loss),
                          "val_acc_training_free": float(base_acc), "val_acc_per_epoch": [float(a) for a in curve],
                          "val_loss_per_epoch": [float(v) for v in losses],
                          "init_alpha": float(alpha0), "init_beta": float(beta0),
                          "epochs": int(epochs), "lr": float(self.lr), "batch_size": int(self.batch_size),
                          "weight_decay": float(self.weight_decay), "selection": "val log-loss, then accuracy",
                          "cache_keys": key_source(support), **self._grid_info()}
        return self
