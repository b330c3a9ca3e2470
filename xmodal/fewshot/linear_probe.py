"""Linear probe: multinomial logistic regression on the support features (CLIP / CoOp baseline)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..featureset import FeatureSet
from ._common import check_features, check_fit_inputs, require_fitted, seeded
from .base import FewShotMethod, register


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float,
               init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 50
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean CE(x Wᵀ + b) + ‖W‖²/(2·C·n) (scikit-learn's objective divided by C·n; bias not
    penalised) with full-batch L-BFGS. Returns (W, b)."""
    n, d = x.shape
    w = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    reg = 1.0 / (2.0 * c * n)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + reg * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


@register("linear-probe")
class LinearProbe(FewShotMethod):
    """Logistic regression on the plain support features (no views, no text). The inverse L2 strength C is
    chosen on val (accuracy; ties → lower val cross-entropy), CoOp-style: a coarse log10 grid, then a finer
    grid around the best coarse value. Fits are warm-started along the grid."""

    training_free = False

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 coarse_exps: tuple[float, ...] = tuple(float(e) for e in range(-2, 7)),
                 fine_step: float = 0.25, fine_points: int = 2, max_iter: int = 50) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.coarse_exps, self.fine_step, self.fine_points, self.max_iter = coarse_exps, fine_step, fine_points, max_iter

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "LinearProbe":
        check_fit_inputs(support, val, text_classifier)
        dev, c = self.device, text_classifier.shape[0]
        x, y = support.features.float().to(dev), support.labels.long().to(dev)
        fv, yv = val.features.float().to(dev), val.labels.long().to(dev)
        tried: dict[float, tuple] = {}

        def run(exps, init=None):
            for e in sorted(exps):
                if e in tried:
                    init = tried[e][2]
                    continue
                wb = fit_logreg(x, y, c, 10.0 ** e, init, self.max_iter)
                with torch.no_grad():
                    logits = fv @ wb[0].T + wb[1]
                    acc = float((logits.argmax(1) == yv).float().mean())
                    loss = float(F.cross_entropy(logits, yv))
                tried[e] = (acc, loss, wb)
                init = wb

        with seeded(self.seed):
            run(self.coarse_exps)
            best = min(tried, key=lambda e: (-tried[e][0], tried[e][1], e))
            fine = [best + k * self.fine_step for k in range(-self.fine_points, self.fine_points + 1) if k]
            below = [e for e in tried if e < min(fine)]
            run(fine, tried[max(below)][2] if below else None)
        best = min(tried, key=lambda e: (-tried[e][0], tried[e][1], e))
        acc, loss, (self.w_, self.b_) = tried[best]
        self.selected_ = {"C": float(10.0 ** best), "log10_C": float(best), "val_acc": float(acc),
                          "val_loss": float(loss), "n_fits": len(tried)}
        return self

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        require_fitted(self, "w_")
        check_features(features, self.w_.shape[1])
        with torch.no_grad():
            scores = features.float().to(self.device) @ self.w_.T + self.b_
        return scores.to(features.device)
