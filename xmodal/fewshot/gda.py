"""GDA: Gaussian discriminant analysis on the features, blended with zero-shot logits
(Wang et al., "A hard-to-beat baseline for training-free CLIP-based adaptation", ICLR 2024).

Two readings, chosen by ``preset``:

* ``"published"`` (default), as the paper's code: samples = the augmented views only (plain features
  when there are none), precision Σ⁻¹ = D·pinv(X_cᵀX_c + tr(Ŝ)·I) with X_c the class-centred samples and
  Ŝ = X_cᵀX_c/(N − 1) (equivalent to shrinking towards tr·I/D with weight D/(N − 1 + D)), uniform class
  prior, α ∈ {10⁻⁴, …, 10²} (7 points).
* ``"ledoit-wolf"``: xmodal's earlier reading: samples = plain features plus every view, pooled
  covariance S (÷N) shrunk with Ledoit-Wolf's coefficient, empirical class prior, α on a 41-point log grid
  10⁻⁴ … 10⁴.

Any of ``estimator``, ``samples``, ``prior`` and the α grid can be set on their own to mix the two.
"""
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
    x, counts, means, xc = _class_means(x, y, num_classes)
    n, d = x.shape
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


def published_gda(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GDA's published closed form (uniform prior), in float64.

    μ_c class means, X_c = x − μ_y, Ŝ = X_cᵀX_c/(N − 1), P = D·pinv(X_cᵀX_c + tr(Ŝ)·I);
    W = μP (C, D), b_c = log(1/C) − ½ μ_c P μ_cᵀ. The matrix is positive definite whenever tr(Ŝ) > 0
    (then pinv = inverse, computed by Cholesky); with no within-class scatter it is 0 and so is P.
    """
    x, counts, means, xc = _class_means(x, y, num_classes)
    n, d = x.shape
    scatter = xc.T @ xc
    trace = float(torch.trace(scatter)) / max(n - 1, 1)
    if trace <= 0:
        precision = torch.zeros(d, d, dtype=x.dtype, device=x.device)
        w = means @ precision
    else:
        chol = torch.linalg.cholesky(scatter + trace * torch.eye(d, dtype=x.dtype, device=x.device))
        w = d * torch.cholesky_solve(means.T, chol).T
    b = -0.5 * (w * means).sum(1) + math.log(1.0 / num_classes)
    return w, b


def _class_means(x: torch.Tensor, y: torch.Tensor, num_classes: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x in float64, class counts, class means μ_c, centred rows x − μ_y): what both estimators start from."""
    x = x.double()
    counts = torch.bincount(y, minlength=num_classes).double()
    _check_counts(counts)
    means = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)
    means = means / counts[:, None]
    return x, counts, means, x - means[y]


def _check_counts(counts: torch.Tensor) -> None:
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0)[:, 0].tolist()
        raise ValueError(f"GDA needs at least one support sample per class; classes {missing[:5]} have none")


PRESETS = {
    "published": {"estimator": "published", "samples": "views", "prior": "uniform",
                  "alpha_min_exp": -4.0, "alpha_max_exp": 2.0, "n_alpha": 7},
    "ledoit-wolf": {"estimator": "ledoit-wolf", "samples": "features+views", "prior": "empirical",
                    "alpha_min_exp": -4.0, "alpha_max_exp": 4.0, "n_alpha": 41},
}
SAMPLES = ("views", "features+views", "features")


@register("gda")
class GDA(FewShotMethod):
    """logits = logit_scale·f Wᵀ + α·(f W_gdaᵀ + b_gda), α from a log grid chosen on validation accuracy (first
    best, i.e. the smallest α among ties). ``preset="published"`` (default) follows the paper's code,
    ``preset="ledoit-wolf"`` is xmodal's earlier reading; see the module docstring and docs/fewshot.md.

    estimator: "published" | "ledoit-wolf" | a float s (Σ = (1 − s)S + s·tr(S)/D·I)
    samples:   "views" (views only; plain features when there are none) | "features+views" | "features"
    prior:     "uniform" | "empirical" (class frequencies of the samples)
    """

    training_free = True

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 preset: str = "published", estimator: float | str | None = None, samples: str | None = None,
                 prior: str | None = None, shrinkage: float | str | None = None, use_views: bool | None = None,
                 alpha_min_exp: float | None = None, alpha_max_exp: float | None = None,
                 n_alpha: int | None = None) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.preset, self.estimator, self.samples, self.prior = preset, estimator, samples, prior
        self.shrinkage, self.use_views = shrinkage, use_views  # older names: shrinkage=estimator, use_views=False
        self.alpha_min_exp, self.alpha_max_exp, self.n_alpha = alpha_min_exp, alpha_max_exp, n_alpha

    def _settings(self) -> dict:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown GDA preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        cfg = dict(PRESETS[self.preset])
        if self.shrinkage is not None:
            cfg["estimator"] = self.shrinkage
        if self.use_views is False:
            cfg["samples"] = "features"
        for key in ("estimator", "samples", "prior", "alpha_min_exp", "alpha_max_exp", "n_alpha"):
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        if cfg["samples"] not in SAMPLES:
            raise ValueError(f"samples must be one of {SAMPLES}, got {cfg['samples']!r}")
        if cfg["prior"] not in ("uniform", "empirical"):
            raise ValueError(f"prior must be 'uniform' or 'empirical', got {cfg['prior']!r}")
        return cfg

    @staticmethod
    def _alphas(cfg: dict) -> list[float]:
        lo, hi, n = cfg["alpha_min_exp"], cfg["alpha_max_exp"], int(cfg["n_alpha"])
        if n == 1:
            return [10 ** lo]
        step = (hi - lo) / (n - 1)
        return [10 ** (lo + i * step) for i in range(n)]

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "GDA":
        check_fit_inputs(support, val, text_classifier)
        cfg = self._settings()
        dev = self.device
        c = text_classifier.shape[0]
        has_views = support.views is not None and support.views.shape[0] > 0
        n_views = support.views.shape[0] if has_views else 0
        plain_x, plain_y = support.features.float(), support.labels.long()
        if cfg["samples"] == "views" and has_views:
            x, y, used = support.views.float().reshape(-1, support.dim), plain_y.repeat(n_views), "views"
        elif cfg["samples"] == "features+views" and has_views:
            x = torch.cat([plain_x, support.views.float().reshape(-1, support.dim)])
            y, used = plain_y.repeat(n_views + 1), "features+views"
        else:
            x, y, used = plain_x, plain_y, "features"
        x, y = x.to(dev), y.to(dev)
        est = cfg["estimator"]
        if est == "published":
            w, b = published_gda(x, y, c)
            s = None
        else:
            w, b, s = gda_classifier(x, y, c, est)
        if cfg["prior"] == "uniform" and est != "published":
            counts = torch.bincount(y, minlength=c).double()
            b = b - torch.log(counts / counts.sum()) + math.log(1.0 / c)
        elif cfg["prior"] == "empirical" and est == "published":
            counts = torch.bincount(y, minlength=c).double()
            b = b - math.log(1.0 / c) + torch.log(counts / counts.sum())
        self.text_classifier_ = text_classifier.float().to(dev)
        self.w_, self.b_ = w.float(), b.float()
        fv, yv = val.features.float().to(dev), val.labels.to(dev)
        alphas = self._alphas(cfg)
        with torch.no_grad():
            zs = self.logit_scale * fv @ self.text_classifier_.T
            g = fv @ self.w_.T + self.b_
            a = torch.tensor(alphas, device=dev)[:, None, None]
            acc = ((zs[None] + a * g[None]).argmax(-1) == yv).float().mean(-1)
        ai = first_best(acc)
        self.alpha_ = alphas[ai]
        self.selected_ = {"alpha": float(self.alpha_), "preset": self.preset,
                          "estimator": est if isinstance(est, str) else "fixed",
                          "shrinkage": None if s is None else float(s),
                          "samples": used, "samples_per_image": n_views if used == "views" else
                          (1 + n_views if used == "features+views" else 1),
                          "prior": cfg["prior"], "val_acc": float(acc[ai]),
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
