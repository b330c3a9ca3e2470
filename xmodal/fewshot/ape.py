"""APE: adaptive prior refinement, training-free (Zhu et al., "Not All Features Matter: Enhancing Few-shot
CLIP with Adaptive Prior Refinement", ICCV 2023). Written from the paper and its public code's formulas.

Channel selection (prior refinement). For the C classes, each with its text feature t_c and its cache
keys F_c (K_c rows), and every channel k:

    S_k = Σ_{i≠j} Σ_{m∈i} Σ_{n∈j} x_{i,m,k}·x_{j,n,k} / Σ_{i≠j} M_i·M_j      inter-class similarity
          (x_{c,·} = t_c together with the keys of class c, M_c = 1 + K_c)
    V_k = Var_c(t_{c,k})                                                 inter-class variance of the text
    J_k = −w₀·S_k + w₁·V_k,   keep the Q channels with the largest J (w = (0.7, 0.3) training-free)

Scores, with f', F', W' the selected channels re-normalised to unit length:

    R_fF' = exp(−β(1 − f'F'ᵀ))                                            cache affinity
    d_i   = KL₂(L_i ‖ softmax(F'_i W'ᵀ))                                  key i's disagreement with the text
    logits = logit_scale·f Wᵀ + α·R_fF'·(L ⊙ exp(γ·d))

(α, β, γ) and Q are grid-searched on validation accuracy (first best in Q, β, α, γ order).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..featureset import FeatureSet
from ._common import (CLIP_LOGIT_SCALE, alpha_grid_accuracy, cache_keys, check_features, check_fit_inputs,
                      class_groups, first_best, key_source, require_fitted, tip_grid)
from .base import FewShotMethod, register


def ape_criterion(text: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
                  w: tuple[float, float]) -> torch.Tensor:
    """J (D,) of APE's channel selection: −w₀·(inter-class similarity) + w₁·(text variance over classes).

    The pairwise sum over samples of different classes is computed from per-class channel sums s_c:
    Σ_{i≠j} s_i s_j = (Σ_c s_c)² − Σ_c s_c², and the pair count likewise from the class sizes.
    """
    c, d = text.shape
    x = text.double()
    sums = x.clone().index_add_(0, key_labels.long(), keys.double())            # s_c = t_c + Σ keys of c
    sizes = 1 + torch.bincount(key_labels.long(), minlength=c).double()         # M_c
    pairs = sizes.sum() ** 2 - (sizes ** 2).sum()
    sim = (sums.sum(0) ** 2 - (sums ** 2).sum(0)) / pairs
    var = x.var(dim=0)                                                          # unbiased, as torch.var
    return (-w[0] * sim + w[1] * var).float()


def select_channels(criterion: torch.Tensor, q: int) -> torch.Tensor:
    """Indices of the q channels with the largest criterion (sorted, so the selection is order-free)."""
    q = max(1, min(int(q), criterion.numel()))
    return torch.sort(torch.topk(criterion, q).indices).values


def class_sum(a: torch.Tensor, labels: torch.Tensor, num_classes: int, group: int | None = None) -> torch.Tensor:
    """(…, NK) -> (…, C): sum of the columns of each class (A·L without a dense one-hot matmul); a reshape
    when the columns are class-sorted in groups of ``group``."""
    if group:
        return a.reshape(*a.shape[:-1], num_classes, group).sum(-1)
    out = torch.zeros(*a.shape[:-1], num_classes, dtype=a.dtype, device=a.device)
    return out.index_add_(a.ndim - 1, labels, a)


def kl_to_text(keys_sel: torch.Tensor, text_sel: torch.Tensor, key_labels: torch.Tensor) -> torch.Tensor:
    """d_i = Σ_c L_ic·log₂((L_ic + 1e-6)/(p_ic + 1e-6)), p_i = softmax(F'_i W'ᵀ) (no temperature, as published)."""
    p = (keys_sel @ text_sel.T).softmax(-1)
    onehot = F.one_hot(key_labels.long(), text_sel.shape[0]).to(p.dtype)
    return (onehot * torch.log2((onehot + 1e-6) / (p + 1e-6))).sum(-1)


def _renorm(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return F.normalize(x[:, idx], dim=-1)


@register("ape")
class APE(FewShotMethod):
    """Training-free APE (see the module docstring for the formulas).

    Grids: Q = round(q·D) for q in ``feat_fracs`` (default {0.5, 0.7, 0.9}; the published configs use
    500–900 of RN50's 1,024 channels, tuned per dataset), Tip-Adapter's β and α grids (α scaled by
    logit_scale/100), γ ∈ {i·gamma_scale/n_gamma}. Everything is chosen on validation accuracy.
    """

    training_free = True

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 feat_fracs: Sequence[float] = (0.5, 0.7, 0.9), w: tuple[float, float] = (0.7, 0.3),
                 beta_scale: float = 10.0, alpha_scale: float = 10.0, gamma_scale: float = 1.0,
                 n_beta: int = 25, n_alpha: int = 20, n_gamma: int = 5) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.feat_fracs, self.w = feat_fracs, w
        self.beta_scale, self.alpha_scale, self.gamma_scale = beta_scale, alpha_scale, gamma_scale
        self.n_beta, self.n_alpha, self.n_gamma = n_beta, n_alpha, n_gamma

    def _grids(self) -> tuple[list[float], list[float], list[float]]:
        unit = self.logit_scale / CLIP_LOGIT_SCALE
        betas = tip_grid(self.beta_scale, self.n_beta)
        alphas = [a * unit for a in tip_grid(self.alpha_scale, self.n_alpha)]
        gammas = [i * self.gamma_scale / self.n_gamma for i in range(self.n_gamma)]
        return betas, alphas, gammas

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "APE":
        check_fit_inputs(support, val, text_classifier)
        dev = self.device
        c, d = text_classifier.shape
        order, group = class_groups(support.labels, c)
        keys = cache_keys(support)[order].to(dev)
        labels = support.labels.long()[order].to(dev)
        text = text_classifier.float().to(dev)
        fv, yv = val.features.float().to(dev), val.labels.to(dev)
        crit = ape_criterion(text, keys, labels, tuple(self.w))
        betas, alphas, gammas = self._grids()
        qs = list(dict.fromkeys(max(1, min(d, round(q * d))) for q in self.feat_fracs))
        zs = self.logit_scale * fv @ text.T
        a_t = torch.tensor(alphas, device=dev)
        buf = None
        acc = torch.empty(len(qs), len(betas), len(alphas), len(gammas), device=dev)
        with torch.no_grad():
            for qi, q in enumerate(qs):
                idx = select_channels(crit, q)
                sim = _renorm(fv, idx) @ _renorm(keys, idx).T                       # (M, NK)
                weights = torch.exp(torch.tensor(gammas, device=dev)[:, None]
                                    * kl_to_text(_renorm(keys, idx), _renorm(text, idx), labels)[None])  # (G, NK)
                for bi, beta in enumerate(betas):
                    aff = torch.exp(-beta * (1 - sim))                                # (M, NK)
                    for gi in range(len(gammas)):
                        p = class_sum(aff * weights[gi], labels, c, group)            # (M, C)
                        acc[qi, bi, :, gi], buf = alpha_grid_accuracy(zs, a_t, p, yv, buf)  # logits (A, M, C)
        qi, rest = divmod(first_best(acc), len(betas) * len(alphas) * len(gammas))
        bi, rest = divmod(rest, len(alphas) * len(gammas))
        ai, gi = divmod(rest, len(gammas))
        self.idx_ = select_channels(crit, qs[qi])
        self.keys_sel_ = _renorm(keys, self.idx_)
        self.text_ = text
        self.labels_ = labels
        self.num_classes_ = c
        self.group_ = group
        self.value_weights_ = torch.exp(gammas[gi] * kl_to_text(self.keys_sel_, _renorm(text, self.idx_), labels))
        self.alpha_, self.beta_, self.gamma_ = alphas[ai], betas[bi], gammas[gi]
        self.selected_ = {"alpha": float(self.alpha_), "beta": float(self.beta_), "gamma": float(self.gamma_),
                          "feat_num": int(qs[qi]), "feat_frac": float(qs[qi] / d), "feat_num_grid": qs,
                          "w": [float(v) for v in self.w], "val_acc": float(acc[qi, bi, ai, gi]),
                          "cache_keys": key_source(support), "cache_size": int(keys.shape[0]),
                          "n_beta": int(self.n_beta), "n_alpha": int(self.n_alpha), "n_gamma": int(self.n_gamma),
                          "beta_scale": float(self.beta_scale), "alpha_scale": float(self.alpha_scale),
                          "gamma_scale": float(self.gamma_scale)}
        return self

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        require_fitted(self, "idx_")
        check_features(features, self.text_.shape[1])
        f = features.float().to(self.device)
        with torch.no_grad():
            aff = torch.exp(-self.beta_ * (1 - _renorm(f, self.idx_) @ self.keys_sel_.T))
            cache = class_sum(aff * self.value_weights_, self.labels_, self.num_classes_, self.group_)
            scores = self.logit_scale * f @ self.text_.T + self.alpha_ * cache
        return scores.to(features.device)
