"""LP++: a linear probe whose class weights blend visual prototypes with the text embeddings
(Huang et al., "LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP", CVPR 2024). Written from the
paper and its public code's formulas.

    logits_c(f) = w_cᵀf + b_c + α_c·(f·t_c)                    (t_c: zero-shot classifier row, no temperature)
    loss        = mean_i CE(logits(f_i), y_i)

Block-coordinate descent with data-driven step sizes (no learning-rate search):

    W, b : SGD with momentum 0.9, step η_w = 4N / λ_max(FᵀF)       (F: the N training features)
    α    : every 10 steps one gradient step of size η_α = N / (4·max_c Σ_i (f_i·t_c)²), on the gradient
           summed since the start of training (the official optimiser never zeroes α's gradient)
    init : w_c = Σ_{i∈c} f_i (class sums), b ~ U(−1/√D, 1/√D) (PyTorch's default Linear bias init),
           α_c = 250·mean_c mean_{i∈c}(f_i·t_c)        (own-class similarity; one value for all classes)

The defaults reproduce the official code's behaviour; each deviation is a named option:
``alpha_init_rule="all-pairs"`` (mean over every class–text pair), ``alpha_grad="window"`` (gradient summed over
the last ``alpha_every`` steps only), ``bias_init="zeros"``.

``epochs`` full-batch steps (300 as published); the epoch with the best validation accuracy (ties: lower
validation log-loss, then the earlier epoch; the initial state is epoch 0) is kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..featureset import FeatureSet
from ._common import check_features, check_fit_inputs, require_fitted, seeded
from .base import FewShotMethod, register


@register("lp++")
class LPPlusPlus(FewShotMethod):
    """LP++ (formulas in the module docstring). ``samples``: "features" (default: one embedding per support
    image) or "features+views" (augmented views as extra samples). ``alpha_init_rule``, ``alpha_grad`` and ``bias_init``
    select the official behaviour (default) or a named deviation (module docstring)."""

    training_free = False

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 epochs: int = 300, alpha_every: int = 10, momentum: float = 0.9, alpha_init_scale: float = 250.0,
                 samples: str = "features", alpha_init_rule: str = "own-class", alpha_grad: str = "accumulate",
                 bias_init: str = "uniform") -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.epochs, self.alpha_every, self.momentum = epochs, alpha_every, momentum
        self.alpha_init_scale, self.samples = alpha_init_scale, samples
        self.alpha_init_rule, self.alpha_grad, self.bias_init = alpha_init_rule, alpha_grad, bias_init

    def _check_options(self) -> None:
        for name, allowed in (("samples", ("features", "features+views")), ("alpha_init_rule", ("own-class", "all-pairs")),
                              ("alpha_grad", ("accumulate", "window")), ("bias_init", ("uniform", "zeros"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")

    def _logits(self, f: torch.Tensor, w: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor,
                ft: torch.Tensor | None = None) -> torch.Tensor:
        """``ft``: f·Tᵀ when already computed (it does not change while training)."""
        return f @ w.T + b + alpha * (f @ self.text_.T if ft is None else ft)

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "LPPlusPlus":
        check_fit_inputs(support, val, text_classifier)
        self._check_options()
        dev = self.device
        c = text_classifier.shape[0]
        x, y = support.features.float(), support.labels.long()
        if self.samples == "features+views" and support.views is not None and support.views.shape[0] > 0:
            x = torch.cat([x, support.views.float().reshape(-1, support.dim)])
            y = y.repeat(support.views.shape[0] + 1)
        x, y = x.to(dev), y.to(dev)
        self.text_ = text_classifier.float().to(dev)
        n = x.shape[0]
        counts = torch.bincount(y, minlength=c).float().clamp_min(1)
        xt = x @ self.text_.T                                                     # (N, C) f·t_j
        class_mean_xt = torch.zeros(c, c, device=dev).index_add_(0, y, xt) / counts[:, None]
        own = class_mean_xt.diagonal()[torch.bincount(y, minlength=c) > 0]      # class c's mean f·t_c
        alpha0 = self.alpha_init_scale * float(own.mean() if self.alpha_init_rule == "own-class" else class_mean_xt.mean())
        lam_max = float(torch.linalg.eigvalsh((x.T @ x).double())[-1])
        lr_w = 4.0 * n / max(lam_max, 1e-12)
        lr_alpha = n / (4.0 * max(float((xt ** 2).sum(0).max()), 1e-12))
        w = torch.zeros(c, x.shape[1], device=dev).index_add_(0, y, x).requires_grad_(True)
        b = torch.zeros(c, device=dev)
        if self.bias_init == "uniform":  # nn.Linear's default: U(−1/√fan_in, 1/√fan_in), from the method's seed
            bound = 1.0 / x.shape[1] ** 0.5
            b = torch.empty(c).uniform_(-bound, bound, generator=torch.Generator().manual_seed(self.seed)).to(dev)
        b.requires_grad_(True)
        alpha = torch.full((c,), alpha0, device=dev, requires_grad=True)
        fv, yv = val.features.float().to(dev), val.labels.to(dev)
        fvt = fv @ self.text_.T
        opt = torch.optim.SGD([w, b], lr=lr_w, momentum=self.momentum)

        def score() -> tuple[float, float]:
            with torch.no_grad():
                logits = self._logits(fv, w, b, alpha, fvt)
                return float((logits.argmax(-1) == yv).float().mean()), float(F.cross_entropy(logits, yv))

        def snapshot():
            return w.detach().clone(), b.detach().clone(), alpha.detach().clone()

        best, best_epoch, best_state = score(), 0, snapshot()
        curve = [best[0]]
        alpha_grad = torch.zeros_like(alpha)
        with seeded(self.seed):
            for epoch in range(1, self.epochs + 1):
                loss = F.cross_entropy(self._logits(x, w, b, alpha, xt), y)
                opt.zero_grad(set_to_none=True)
                if alpha.grad is not None:
                    alpha.grad = None
                loss.backward()
                opt.step()
                alpha_grad += alpha.grad
                if epoch % self.alpha_every == 0:  # block-coordinate step on α with its own step size
                    with torch.no_grad():
                        alpha -= lr_alpha * alpha_grad
                    if self.alpha_grad == "window":
                        alpha_grad.zero_()
                cur = score()
                curve.append(cur[0])
                if cur[0] > best[0] or (cur[0] == best[0] and cur[1] < best[1]):
                    best, best_epoch, best_state = cur, epoch, snapshot()
                if self.on_epoch is not None:
                    self.on_epoch(epoch, self.epochs)
        self.w_, self.b_, self.alpha_ = best_state
        self.selected_ = {"epoch": int(best_epoch), "val_acc": float(best[0]), "val_loss": float(best[1]),
                          "epochs": int(self.epochs), "lr_w": float(lr_w), "lr_alpha": float(lr_alpha),
                          "alpha_init": float(alpha0), "alpha_mean": float(self.alpha_.mean()),
                          "alpha_every": int(self.alpha_every), "momentum": float(self.momentum),
                          "samples": self.samples, "n_train": int(n), "alpha_init_rule": self.alpha_init_rule,
                          "alpha_grad": self.alpha_grad, "bias_init": self.bias_init,
                          "selection": "val accuracy, then log-loss"}
        return self

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        require_fitted(self, "w_")
        check_features(features, self.w_.shape[1])
        with torch.no_grad():
            scores = self._logits(features.float().to(self.device), self.w_, self.b_, self.alpha_)
        return scores.to(features.device)
