"""CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck MLP on the image features."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..featureset import FeatureSet
from ._common import (adamw, batches, check_features, check_fit_inputs, cosine_lr, cpu_generator, epoch_features,
                      first_best, require_fitted)
from .base import FewShotMethod, register


def _linear_init(fan_in: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init (kaiming-uniform, a=√5 ⇒ U(−1/√fan_in, 1/√fan_in)), drawn from ``generator``."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


@register("clip-adapter")
class CLIPAdapter(FewShotMethod):
    """f' = r·MLP(f) + (1 − r)·f,  MLP = ReLU∘Linear(D/4→D)∘ReLU∘Linear(D→D/4) (no biases, reduction 4);
    logits = logit_scale·norm(f') Wᵀ with the zero-shot classifier W frozen.

    One adapter per residual ratio r in ``ratios`` (same initialisation), trained together in one batched
    model (AdamW is element-wise, so this equals separate runs) with CE on shuffled batches; epoch e uses
    augmented view e mod V. For each r the epoch with the best val accuracy is kept; then r is chosen on val
    (ties → smaller r)."""

    training_free = False

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 ratios: Sequence[float] = (0.2, 0.4, 0.6, 0.8), reduction: int = 4, epochs: int = 20,
                 lr: float = 1e-2, weight_decay: float = 0.01, batch_size: int = 256) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.ratios, self.reduction = [float(r) for r in ratios], reduction
        self.epochs, self.lr, self.weight_decay, self.batch_size = epochs, lr, weight_decay, batch_size

    def _forward(self, f: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """f (B, D) → logits (R, B, C) for all ratios at once."""
        a = F.relu(F.relu(f[None] @ w1) @ w2)                      # (R, B, D)
        mixed = r[:, None, None] * a + (1 - r[:, None, None]) * f[None]
        return self.logit_scale * F.normalize(mixed, dim=-1) @ self.text_classifier_.T

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "CLIPAdapter":
        check_fit_inputs(support, val, text_classifier)
        dev, d = self.device, support.dim
        hidden = max(1, d // self.reduction)
        self.text_classifier_ = text_classifier.float().to(dev)
        gen = cpu_generator(self.seed)
        n_r = len(self.ratios)
        w1 = _linear_init(d, (d, hidden), gen).expand(n_r, d, hidden).clone().to(dev).requires_grad_(True)
        w2 = _linear_init(hidden, (hidden, d), gen).expand(n_r, hidden, d).clone().to(dev).requires_grad_(True)
        r = torch.tensor(self.ratios, device=dev)
        opt = adamw([w1, w2], lr=self.lr, weight_decay=self.weight_decay)
        n = len(support)
        sched = cosine_lr(opt, self.epochs * math.ceil(n / self.batch_size))
        y_all = support.labels.long().to(dev)
        fv, yv = val.features.float().to(dev), val.labels.to(dev)
        best_acc = torch.full((n_r,), -1.0, device=dev)
        best_epoch = torch.zeros(n_r, dtype=torch.long)
        best_w1, best_w2 = w1.detach().clone(), w2.detach().clone()
        for epoch in range(self.epochs):
            x_all = epoch_features(support, epoch).to(dev)
            for idx in batches(n, self.batch_size, gen):
                idx = idx.to(dev)
                logits = self._forward(x_all[idx], w1, w2, r)          # (R, B, C)
                y = y_all[idx]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(n_r), reduction="sum")
                loss = loss / len(idx)                               # Σ_r mean CE_r: independent per ratio
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                acc = (self._forward(fv, w1, w2, r).argmax(-1) == yv).float().mean(-1)
                better = acc > best_acc
                best_acc = torch.where(better, acc, best_acc)
                best_epoch[better.cpu()] = epoch + 1
                best_w1[better], best_w2[better] = w1.detach()[better], w2.detach()[better]
            if self.on_epoch is not None:
                self.on_epoch(epoch + 1, self.epochs)
        ri = first_best(best_acc)
        self.ratio_ = self.ratios[ri]
        self.w1_, self.w2_ = best_w1[ri:ri + 1], best_w2[ri:ri + 1]
        self.selected_ = {"ratio": float(self.ratio_), "epoch": int(best_epoch[ri]), "val_acc": float(best_acc[ri]),
                          "val_acc_per_ratio": {str(k): float(a) for k, a in zip(self.ratios, best_acc.tolist())},
                          "epochs": int(self.epochs), "lr": float(self.lr), "batch_size": int(self.batch_size),
                          "reduction": int(self.reduction)}
        return self

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        require_fitted(self, "w1_")
        check_features(features, self.w1_.shape[1])
        with torch.no_grad():
            r = torch.tensor([self.ratio_], device=self.device)
            scores = self._forward(features.float().to(self.device), self.w1_, self.w2_, r)[0]
        return scores.to(features.device)
