"""GDA: Gaussian discriminant analysis on the features, blended with zero-shot logits
(Wang et al., "A hard-to-beat baseline for training-free CLIP-based adaptation", ICLR 2024)."""
from __future__ import annotations

import math

import torch

from ..featureset import FeatureSet
from ._common import check_features, check_fit_inputs, first_best, require_fitted
from .base import FewShotMethod, register


def ledoit_wolf_shrinkage(x: torch.Tensor, cov: torch.Tensor | None = None) -> float:
    """Ledoit-Wolf shrinkage coefficient for already-centred samples x (n, p) (scikit-learn's formula,
    ``assume_centered=True``), towards (tr(S)/p)·I. ``cov`` = xᵀx/n if already computed."""
    n, p = x.shape
    x = x.double()
    sq_norms = (x * x).sum(1)
    emp_trace = sq_norms.sum() / n                                 # tr(S)
    mu = emp_trace / p
    if cov is None:
        gram = (x @ x.T if n < p else x.T @ x) / n
    else:
        gram = x @ x.T / n if n < p else cov.double()
    delta_ = (gram * gram).sum()                                   # ‖S‖_F² (= ‖XXᵀ‖_F²/n²)
    beta_ = (sq_norms * sq_norms).sum()                            # Σ_i ‖x_i‖⁴ = Σ (X²ᵀX²)
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * emp_trace + p * mu**2) / p
    beta = torch.minimum(beta, delta)
    return 0.0 if float(beta) == 0 else float(beta / delta)


def gda_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, shrinkage: float | str = "ledoit-wolf"
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Linear discriminant of a shared-covariance Gaussian model.

    μ_c class means; Σ = (1 − s)·S + s·(tr(S)/D)·I with S the pooled within-class covariance (divided by n)
    and s Ledoit-Wolf's coefficient (or the given float); W = μΣ⁻¹ (C, D), b_c = −½ μ_cΣ⁻¹μ_cᵀ + log π_c
    with π_c the class frequencies. Computed in float64. Without any within-class scatter Σ ∝ I (s = 1);
    a singular Σ gets the smallest ridge (10⁻⁸·tr(Σ)/D upwards) that makes it positive definite.
    Returns (W, b, s).
    """
    x = x.double()
    n, d = x.shape
    counts = torch.bincount(y, minlength=num_classes).double()
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0)[:, 0].tolist()
        raise ValueError(f"GDA needs at least one support sample per class; classes {missing[:5]} have none")
    means = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device).index_add_(0, y, x) / counts[:, None]
    xc = x - means[y]
    cov = xc.T @ xc / n
    s = ledoit_wolf_shrinkage(xc, cov) if shrinkage == "ledoit-wolf" else float(shrinkage)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"shrinkage must be 'ledoit-wolf' or a number in [0, 1], got {shrinkage!r}")
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    scale = float(torch.trace(cov)) / d
    if scale <= 1e-12:  # no within-class scatter (e.g. 1 shot, no views): Σ ∝ I, nearest class mean
        cov, s, scale = eye / d, 1.0, 1.0 / d
    else:
        cov = (1 - s) * cov + s * scale * eye
    chol, info = torch.linalg.cholesky_ex(cov)
    ridge = 1e-8
    while int(info) != 0 and ridge < 1:  # singular Σ (s = 0 with n < D): add the smallest ridge that works
        chol, info = torch.linalg.cholesky_ex(cov + ridge * scale * eye)
        ridge *= 10
    w = torch.cholesky_solve(means.T, chol).T                      # μΣ⁻¹ (Σ symmetric)
    b = -0.5 * (w * means).sum(1) + torch.log(counts / n)
    return w, b, s


@register("gda")
class GDA(FewShotMethod):
    """logits = logit_scale·f Wᵀ + α·(f W_gdaᵀ + b_gda), α from a log grid chosen on val (first best, i.e. the
    smallest α among ties). With ``use_views`` the augmented-view embeddings are extra samples for the class
    means and covariance (our reading; see docs/fewshot.md)."""

    training_free = True

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 shrinkage: float | str = "ledoit-wolf", use_views: bool = True,
                 alpha_min_exp: float = -4.0, alpha_max_exp: float = 4.0, n_alpha: int = 41) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.shrinkage, self.use_views = shrinkage, use_views
        self.alpha_min_exp, self.alpha_max_exp, self.n_alpha = alpha_min_exp, alpha_max_exp, n_alpha

    def _alphas(self) -> list[float]:
        if self.n_alpha == 1:
            return [10 ** self.alpha_min_exp]
        step = (self.alpha_max_exp - self.alpha_min_exp) / (self.n_alpha - 1)
        return [10 ** (self.alpha_min_exp + i * step) for i in range(self.n_alpha)]

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "GDA":
        check_fit_inputs(support, val, text_classifier)
        dev = self.device
        x, y = support.features.float(), support.labels.long()
        n_views = 0
        if self.use_views and support.views is not None and support.views.shape[0] > 0:
            n_views = support.views.shape[0]
            x = torch.cat([x, support.views.float().reshape(-1, support.dim)])
            y = y.repeat(n_views + 1)
        w, b, s = gda_classifier(x.to(dev), y.to(dev), text_classifier.shape[0], self.shrinkage)
        self.text_classifier_ = text_classifier.float().to(dev)
        self.w_, self.b_ = w.float(), b.float()
        fv, yv = val.features.float().to(dev), val.labels.to(dev)
        alphas = self._alphas()
        with torch.no_grad():
            zs = self.logit_scale * fv @ self.text_classifier_.T
            g = fv @ self.w_.T + self.b_
            a = torch.tensor(alphas, device=dev)[:, None, None]
            acc = ((zs[None] + a * g[None]).argmax(-1) == yv).float().mean(-1)
        ai = first_best(acc)
        self.alpha_ = alphas[ai]
        self.selected_ = {"alpha": float(self.alpha_), "shrinkage": float(s),
                          "shrinkage_rule": self.shrinkage if isinstance(self.shrinkage, str) else "fixed",
                          "samples_per_image": 1 + n_views, "val_acc": float(acc[ai]),
                          "alpha_grid": [float(math.log10(alphas[0])), float(math.log10(alphas[-1])), len(alphas)]}
        return self

    def gda_scores(self, features: torch.Tensor) -> torch.Tensor:
        """The GDA logits alone, f W_gdaᵀ + b."""
        require_fitted(self, "w_")
        check_features(features, self.w_.shape[1])
        return (features.float().to(self.device) @ self.w_.T + self.b_).to(features.device)

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        require_fitted(self, "w_")
        check_features(features, self.w_.shape[1])
        f = features.float().to(self.device)
        with torch.no_grad():
            scores = self.logit_scale * f @ self.text_classifier_.T + self.alpha_ * (f @ self.w_.T + self.b_)
        return scores.to(features.device)
