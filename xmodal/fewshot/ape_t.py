"""APE-T: the trained variant of APE (Zhu et al., ICCV 2023). Written from the paper and its public code's
formulas; see ``ape.py`` for the channel selection.

Trained parameters (everything else frozen): a category residual R (C, Q) on the Q selected channels,
added to the text classifier and to every cache key of that class, and one value weight per cache entry:

    W̃ = W + R on the selected channels,  F̃_i = F_i + R_{y_i} on the selected channels,  Ṽ = L ⊙ v (v: (NK, 1))
    logits = logit_scale·f W̃ᵀ + α·exp(−β(1 − f F̃ᵀ))·Ṽ

Channels: J with w = (0.2, 0.8) (the published training setting), Q = round(feat_frac·D).
At R = 0, v = 1 the model is Tip-Adapter exactly, so training starts from Tip-Adapter's (α, β) searched on
validation; the untrained state is epoch 0 of the selection (validation log-loss, ties: accuracy); (α, β)
are re-searched for the chosen epoch, and the training-free solution is kept if that loses validation
accuracy. Optimiser as published: AdamW (lr 1e-4 as the published ImageNet config, chosen over 1e-3 on the
development protocol; eps 1e-3, weight decay 0.1), cosine, batches of 256.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..featureset import FeatureSet
from ._cache import resolve_epochs, train_cache_model, val_loss_acc
from ._common import (CLIP_LOGIT_SCALE, cache_grid_search, cache_keys, check_features, check_fit_inputs, class_groups,
                      key_source, require_fitted, seeded, tip_grid)
from .ape import ape_criterion, class_sum, select_channels
from .base import FewShotMethod, register


class APETModel(nn.Module):
    """The residual model; ``forward`` has the cache models' signature so the shared training loop drives it."""

    def __init__(self, keys: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, idx: torch.Tensor,
                 logit_scale: float) -> None:
        super().__init__()
        c = text.shape[0]
        order, self.group = class_groups(labels, c)  # class-sorted entries: A·Ṽ as a grouped sum
        keys, labels = keys[order.to(keys.device)], labels[order.to(labels.device)]
        self.register_buffer("base_keys", keys.float().clone())
        self.register_buffer("labels", labels.long().clone())
        self.register_buffer("text", text.float().clone())
        self.register_buffer("idx", idx.long().clone())
        self.register_buffer("values", nn.functional.one_hot(labels.long(), c).float())
        self.res = nn.Parameter(torch.zeros(c, idx.numel()))
        self.value_weights = nn.Parameter(torch.ones(keys.shape[0], 1))
        self.logit_scale = float(logit_scale)

    def effective(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys F̃, text W̃, values Ṽ) with the residual and value weights applied."""
        keys = self.base_keys.index_add(1, self.idx, self.res[self.labels])
        text = self.text.index_add(1, self.idx, self.res)
        return keys, text, self.values * self.value_weights

    def constant_terms(self, f: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        """f·Fᵀ and f·Wᵀ with the base keys and text: fixed while training, computed once per input set."""
        return {"base_sim": f @ self.base_keys.T, "base_text": f @ self.text.T}

    def forward(self, f: torch.Tensor, alpha: float, beta: float, beta_t: float | None = None,
                need_text: bool = False, base_sim: torch.Tensor | None = None,
                base_text: torch.Tensor | None = None):
        # F̃ and W̃ add the residual on the selected channels, so f·F̃ᵀ = f·Fᵀ + (f_Q·Rᵀ)[:, labels] and
        # f·W̃ᵀ = f·Wᵀ + f_Q·Rᵀ: one small (B, C) product carries the gradient, the full keys are never rebuilt
        base_sim = f @ self.base_keys.T if base_sim is None else base_sim
        base_text = f @ self.text.T if base_text is None else base_text
        r = f[:, self.idx] @ self.res.T                                                   # (B, C)
        # class-sorted groups of K entries: repeat each class's column K times (its gradient is then a sum
        # over K, not a scatter over NK indices)
        r_keys = r.repeat_interleave(self.group, dim=1) if self.group else r[:, self.labels]   # (B, NK)
        aff = torch.exp(-beta * (1 - (base_sim + r_keys)))
        if self.group:
            cache = class_sum(aff * self.value_weights[:, 0], self.labels, self.values.shape[1], self.group)
        else:
            cache = aff @ (self.values * self.value_weights)
        return self.logit_scale * (base_text + r) + alpha * cache, cache, None


@register("ape-t")
class APET(FewShotMethod):
    """Trained APE: category residual + value weights (formulas in the module docstring)."""

    training_free = False

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 feat_frac: float = 0.7, w: tuple[float, float] = (0.2, 0.8),
                 epochs: int | str = "auto", min_steps: int = 200, max_epochs: int = 200,
                 lr: float = 1e-4, eps: float = 1e-3, weight_decay: float = 0.1, batch_size: int = 256,
                 beta_scale: float = 10.0, alpha_scale: float = 10.0, n_beta: int = 50, n_alpha: int = 20) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.feat_frac, self.w = feat_frac, w
        self.epochs, self.min_steps, self.max_epochs = epochs, min_steps, max_epochs
        self.lr, self.eps, self.weight_decay, self.batch_size = lr, eps, weight_decay, batch_size
        self.beta_scale, self.alpha_scale, self.n_beta, self.n_alpha = beta_scale, alpha_scale, n_beta, n_alpha

    def _search(self, fv: torch.Tensor, yv: torch.Tensor) -> float:
        """(β, α) on validation accuracy for the current model (Tip-Adapter's grids); sets alpha_, beta_."""
        unit = self.logit_scale / CLIP_LOGIT_SCALE
        betas = tip_grid(self.beta_scale, self.n_beta)
        alphas = [a * unit for a in tip_grid(self.alpha_scale, self.n_alpha)]
        with torch.no_grad():
            keys, text, values = self.model_.effective()
            plain = bool((self.model_.value_weights == 1).all())  # unweighted values: the grouped sum applies
            _, bi, ai, acc = cache_grid_search(self.logit_scale * fv @ text.T, yv, fv @ keys.T, values, betas, alphas,
                                               group=self.model_.group if plain else None)
        self.alpha_, self.beta_ = alphas[ai], betas[bi]
        return float(acc[0, bi, ai])

    def _loss_acc(self, fv: torch.Tensor, yv: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            logits, _, _ = self.model_(fv, self.alpha_, self.beta_)
        return val_loss_acc(logits, yv)

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "APET":
        check_fit_inputs(support, val, text_classifier)
        dev = self.device
        d = text_classifier.shape[1]
        keys = cache_keys(support).to(dev)
        labels = support.labels.long().to(dev)
        text = text_classifier.float().to(dev)
        q = max(1, min(d, round(self.feat_frac * d)))
        idx = select_channels(ape_criterion(text, keys, labels, tuple(self.w)), q)
        self.model_ = APETModel(keys, labels, text, idx, self.logit_scale).to(dev)
        fv, yv = val.features.float().to(dev), val.labels.to(dev)
        base_acc = self._search(fv, yv)
        alpha0, beta0 = self.alpha_, self.beta_
        base_loss, _ = self._loss_acc(fv, yv)
        start = {k: v.detach().clone() for k, v in self.model_.state_dict().items()}
        epochs = resolve_epochs(self.epochs, len(support), self.batch_size, self.min_steps, self.max_epochs)
        with seeded(self.seed):
            best_epoch, curve, losses = train_cache_model(
                self.model_, support, fv, yv, [{"params": list(self.model_.parameters())}],
                epochs=epochs, lr=self.lr, eps=self.eps, batch_size=self.batch_size, alpha=alpha0, beta=beta0,
                beta_t=None, seed=self.seed, device=dev, weight_decay=self.weight_decay,
                on_epoch=self.on_epoch)
        kept, val_acc, val_loss = "training-free", base_acc, base_loss
        if best_epoch > 0:
            acc = self._search(fv, yv)
            if acc >= base_acc:
                kept, val_acc = "trained", acc
                val_loss, _ = self._loss_acc(fv, yv)
            else:
                self.model_.load_state_dict(start)
                self.alpha_, self.beta_, best_epoch = alpha0, beta0, 0
        self.model_.eval()
        self.selected_ = {"alpha": float(self.alpha_), "beta": float(self.beta_), "epoch": int(best_epoch),
                          "kept": kept, "val_acc": float(val_acc), "val_loss": float(val_loss),
                          "val_acc_training_free": float(base_acc), "val_acc_per_epoch": [float(a) for a in curve],
                          "val_loss_per_epoch": [float(v) for v in losses], "init_alpha": float(alpha0),
                          "init_beta": float(beta0), "feat_num": int(q), "feat_frac": float(q / d),
                          "w": [float(v) for v in self.w], "epochs": int(epochs), "lr": float(self.lr),
                          "eps": float(self.eps), "weight_decay": float(self.weight_decay),
                          "batch_size": int(self.batch_size), "selection": "val log-loss, then accuracy",
                          "cache_keys": key_source(support), "n_beta": int(self.n_beta), "n_alpha": int(self.n_alpha),
                          "beta_scale": float(self.beta_scale), "alpha_scale": float(self.alpha_scale)}
        return self

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        require_fitted(self, "model_")
        check_features(features, self.model_.text.shape[1])
        with torch.no_grad():
            scores, _, _ = self.model_(features.float().to(self.device), self.alpha_, self.beta_)
        return scores.to(features.device)
