"""XMAdapter (Yang et al., arXiv 2404.12588): image cache + cross-modal text cache, fused by γ, with
hard-sample re-weighting. A reconstruction: see docs/fewshot.md and papers.md B.3 / B.8 for the readings.

    logits = logit_scale·f Wᵀ + α·(γ·A_img + (1 − γ)·A_txt)·L
    A_img  = exp(−β(1 − f F_imgᵀ))                      Tip-Adapter image cache (keys trained, as in Tip-Adapter-F)
    A_txt  = exp(−β_t(1 − ĝ F̂_txtᵀ)),  ĝ = norm(Img2TxtNet(f)),  F̂_txt = norm(MetaNet(T))[cache labels]
    loss   = Σ w_i CE_i / Σ w_i,  w_i = 1 + λ·d_i,  d_i = ½‖softmax(A_img L)_i − softmax(A_txt L)_i‖₁ (no gradient)

``xmadapter`` trains keys, MetaNet, Img2TxtNet and γ = sigmoid(θ); ``xmadapter-tf`` is training-free: the two
networks are identities (the text cache compares f with the class text features directly) and γ, α, β are
grid-searched on validation. With γ fixed at 1 they are Tip-Adapter-F and Tip-Adapter exactly.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import ShapeError
from ..featureset import FeatureSet
from ._cache import CacheModel, Gamma, TextBranch, better, constant_terms, train_cache_model, val_loss_acc
from ._common import (cache_grid_search, cache_keys, check_features, check_fit_inputs, key_source,
                      require_fitted, seeded)
from .base import FewShotMethod, register
from .tip_adapter import _TipSearchMixin

GAMMA_MODES = ("learned", "fixed", "search", "per-sample")
FALLBACK_RULES = ("margin", "sign-test")
WEIGHTINGS = ("continuous", "topq", "none")
DISAGREEMENTS = ("l1", "true-class")


def hard_sample_weights(p_img: torch.Tensor, p_txt: torch.Tensor, labels: torch.Tensor, lam: float,
                        mode: str = "continuous", q: float = 0.7, measure: str = "l1") -> torch.Tensor:
    """Per-sample loss weights from the disagreement of the image and text caches (computed without gradient).

    p_img, p_txt: (B, C) affinities A_img·L and A_txt·L. With P = softmax of each,
      measure 'l1':         d_i = ½‖P_img,i − P_txt,i‖₁ ∈ [0, 1]
      measure 'true-class': d_i = |P_img,i[y_i] − P_txt,i[y_i]|
      mode 'continuous':    w_i = 1 + λ·d_i
      mode 'topq':          w_i = 1 + λ·1[d_i ≥ quantile_q(d) and d_i > 0]
      mode 'none':          w_i = 1
    """
    if mode not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {mode!r}; use one of {WEIGHTINGS}")
    if measure not in DISAGREEMENTS:
        raise ValueError(f"unknown disagreement measure {measure!r}; use one of {DISAGREEMENTS}")
    with torch.no_grad():
        pi, pt = p_img.detach().softmax(-1), p_txt.detach().softmax(-1)
        if measure == "l1":
            d = 0.5 * (pi - pt).abs().sum(-1)
        else:
            y = labels.long()[:, None]
            d = (pi.gather(1, y) - pt.gather(1, y)).abs()[:, 0]
        if mode == "none" or lam == 0:
            return torch.ones_like(d)
        if mode == "continuous":
            return 1 + lam * d
        hard = (d >= torch.quantile(d, q)) & (d > 0)
        return 1 + lam * hard.to(d.dtype)


def sign_test_p(won: int, lost: int) -> float:
    """One-sided exact sign test on the validation images the two stages disagree on: P(X ≥ won) for
    X ~ Binomial(won + lost, ½) — how often stage 2 would win this many by chance if it were no better."""
    n = won + lost
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, k) for k in range(won, n + 1)) / 2 ** n)


def keeps_stage_two(won: int, lost: int, lower_loss: bool, rule: str = "sign-test", margin: int = 1,
                    p: float = 0.05) -> bool:
    """The fallback decision from the validation images stage 2 alone classifies right (``won``) and stage 1
    alone classifies right (``lost``): "sign-test" — more wins, significant at level ``p``; "margin" — at
    least ``margin`` more wins (0: as many, with a lower validation log-loss, ``lower_loss``)."""
    if rule not in FALLBACK_RULES:
        raise ValueError(f"unknown fallback_rule {rule!r}; use one of {FALLBACK_RULES}")
    if rule == "sign-test":
        return won > lost and sign_test_p(won, lost) <= p
    if margin > 0:
        return won - lost >= margin
    return won > lost or (won == lost and lower_loss)


class _XMBase(_TipSearchMixin, FewShotMethod):
    arch_default = "mlp"

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 gamma_mode: str = "learned", gamma: float = 0.5, gamma_grid: Sequence[float] | None = None,
                 net_arch: str | None = None, text_dim: int | None = None, tie_init: bool = True,
                 class_text_features: torch.Tensor | None = None, text_source: str | None = None,
                 beta_text: float | None = None,
                 lam: float = 1.0, weighting: str = "continuous", q: float = 0.7, disagreement: str = "l1",
                 train_keys: bool = True, epochs: int | str = "auto", min_steps: int = 200, max_epochs: int = 200,
                 lr: float = 1e-3, eps: float = 1e-4, weight_decay: float = 0.01,
                 batch_size: int = 256, net_lr: float = 1e-2, gamma_lr: float = 0.05,
                 beta_scale: float = 10.0, alpha_scale: float = 10.0, n_beta: int = 50, n_alpha: int = 20) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        if gamma_mode not in GAMMA_MODES:
            raise ValueError(f"unknown gamma_mode {gamma_mode!r}; use one of {GAMMA_MODES}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; use one of {WEIGHTINGS}")
        if disagreement not in DISAGREEMENTS:
            raise ValueError(f"unknown disagreement {disagreement!r}; use one of {DISAGREEMENTS}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        self.gamma_mode, self.gamma = gamma_mode, float(gamma)
        self.gamma_grid = list(gamma_grid) if gamma_grid is not None else [i / 10 for i in range(11)]
        self.net_arch = net_arch or self.arch_default
        self.text_dim, self.tie_init = text_dim, tie_init
        self.class_text_features, self.text_source = class_text_features, text_source
        self.beta_text = beta_text
        self.lam, self.weighting, self.q, self.disagreement = float(lam), weighting, float(q), disagreement
        self.train_keys = train_keys
        self.epochs, self.min_steps, self.max_epochs = epochs, min_steps, max_epochs
        self.lr, self.eps, self.weight_decay, self.batch_size = lr, eps, weight_decay, batch_size
        self.net_lr = net_lr
        self.gamma_lr = gamma_lr
        self.beta_scale, self.alpha_scale = beta_scale, alpha_scale
        self.n_beta, self.n_alpha = n_beta, n_alpha

    # ------------------------------------------------------------------------------------------ pieces

    def _class_text(self, text_classifier: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Source of the text cache: the zero-shot classifier rows (default) or external class text features."""
        if self.class_text_features is None:
            return text_classifier.float(), "zeroshot-classifier"
        t = self.class_text_features
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] != text_classifier.shape[0]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
            raise ShapeError(f"class_text_features must be (C={text_classifier.shape[0]}, D_text) like the "
                             f"text_classifier {tuple(text_classifier.shape)}, got {shape}")
        return torch.nn.functional.normalize(t.float(), dim=-1), self.text_source or "external"

    def _weight_fn(self):
        if self.weighting == "none" or self.lam == 0:
            return None
        return lambda p_img, p_txt, y: hard_sample_weights(p_img, p_txt, y, self.lam, self.weighting, self.q,
                                                           self.disagreement)

    def _text_off(self) -> bool:
        return self.gamma_mode == "fixed" and self.gamma == 1.0

    def _build(self, support: FeatureSet, text_classifier: torch.Tensor, train: bool) -> tuple[CacheModel, str]:
        class_text, source = self._class_text(text_classifier)
        img_dim = support.dim
        if self.net_arch == "identity":
            if class_text.shape[1] != img_dim:
                raise ShapeError(f"the training-free text cache compares image features {tuple(support.features.shape)} "
                                 f"with class text features {tuple(class_text.shape)} directly, so their widths "
                                 "must match; use the trained 'xmadapter' (MetaNet/Img2TxtNet) for other widths")
            out_dim = img_dim
        else:
            out_dim = self.text_dim or max(1, img_dim // 2)
        counts = torch.bincount(support.labels.long(), minlength=text_classifier.shape[0])
        with seeded(self.seed + 1):  # network init: own seed, independent of the batch order
            text = TextBranch(class_text, counts, img_dim, out_dim, self.net_arch, self.tie_init)
            gamma_mode = self.gamma_mode if train else "fixed"
            if gamma_mode == "search":
                gamma_mode = "fixed"  # constant at the initial γ while training; searched afterwards
            gamma = Gamma(gamma_mode, self.gamma, img_dim)
        model = CacheModel(cache_keys(support), support.labels, text_classifier, self.logit_scale,
                           train_keys=train and self.train_keys, text=text, gamma=gamma)
        return model.to(self.device), source

    def _search(self, fv: torch.Tensor, yv: torch.Tensor) -> dict:
        """(γ,) β, α on validation with the (trained) model; sets alpha_, beta_, beta_t_ and the final γ."""
        m = self.model_
        betas, alphas = self._betas(), self._alphas()
        with torch.no_grad():
            zs, img_sim = m.zero_shot(fv), fv @ m.keys.T
            if self._text_off():
                txt_sim, gammas = None, None
            else:
                txt_sim = m.text.class_sim(fv)
                if self.gamma_mode == "search":
                    gammas = self.gamma_grid
                elif self.gamma_mode == "per-sample":
                    gammas = m.gamma(fv)[:, 0]
                else:
                    gammas = [float(m.gamma(fv))]
            gi, bi, ai, acc = cache_grid_search(zs, yv, img_sim, m.values, betas, alphas, txt_class_sim=txt_sim,
                                                txt_counts=m.text.counts, gammas=gammas, txt_beta=self.beta_text,
                                                group=m.group)
        self.alpha_, self.beta_ = alphas[ai], betas[bi]
        self.beta_t_ = self.beta_ if self.beta_text is None else float(self.beta_text)
        if self.gamma_mode == "search":
            m.gamma.value = float(self.gamma_grid[gi])
        if self.gamma_mode == "per-sample" and gammas is not None:
            gamma_value = float(gammas.mean())
        elif self._text_off():
            gamma_value = 1.0
        else:
            gamma_value = float(gammas[gi]) if isinstance(gammas, list) else float(m.gamma(fv))
        return {"alpha": float(self.alpha_), "beta": float(self.beta_), "beta_text": float(self.beta_t_),
                "beta_text_tied": self.beta_text is None, "gamma": gamma_value, "gamma_mode": self.gamma_mode,
                "val_acc": float(acc[gi, bi, ai]), **self._grid_info()}

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        require_fitted(self, "model_")
        check_features(features, self.model_.keys.shape[1])
        self.model_.eval()
        with torch.no_grad():
            scores, _, _ = self.model_(features.float().to(self.device), self.alpha_, self.beta_, self.beta_t_)
        return scores.to(features.device)


@register("xmadapter")
class XMAdapter(_XMBase):
    """Trained XMAdapter, in two stages that each start from the previous solution.

    1. Tip-Adapter-F (``tip-adapter-f`` with the same schedule): training-free (α₀, β₀) searched on
       validation, keys fine-tuned, guarded so it never falls below Tip-Adapter on validation.
    2. From Tip-Adapter-F's keys and (α, β): keys (``lr``), MetaNet and Img2TxtNet (``net_lr``) and γ
       (learned modes) trained with hard-sample weighted CE. Epoch 0 (untrained text branch) is a candidate;
       epochs are selected on validation log-loss (ties: accuracy), scored at the best γ of the grid in
       "search" mode; then γ, α, β (β_t tied) are grid-searched on validation.
    3. Fallback (``fallback``; default on in "search" mode): unless stage 2 beats stage 1 on validation, the
       model *is* the stage-1 Tip-Adapter-F (γ = 1, its keys, α, β). ``fallback_rule="margin"``: stage 2 must
       classify at least ``fallback_margin`` more validation images correctly (0: as many, with a lower
       log-loss); ``"sign-test"`` (default): among the validation images the stages disagree on, stage 2's
       wins must pass a one-sided exact sign test at level ``fallback_p`` (0.05; the bar grows with the
       validation set — a one-image margin stopped protecting at 808 validation images, docs/fewshot.md).
    ``train_keys``: whether stage 2 keeps training the image-cache keys (False: stage 1's keys stay fixed and
    only the text branch and γ learn; the image affinities are then computed once, not every step).

    Default ``gamma_mode="search"`` (papers.md B.3.4 option (c)); see docs/fewshot.md for the development
    protocol that chose it. With ``gamma_mode="fixed", gamma=1`` stage 2 is skipped: Tip-Adapter-F exactly.
    """

    training_free = False

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 gamma_mode: str = "search", fallback: bool | None = None, fallback_rule: str = "sign-test",
                 fallback_margin: int = 1, fallback_p: float = 0.05, train_keys: bool = True, **params) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale, gamma_mode=gamma_mode,
                         train_keys=train_keys, **params)
        if fallback_rule not in FALLBACK_RULES:
            raise ValueError(f"unknown fallback_rule {fallback_rule!r}; use one of {FALLBACK_RULES}")
        if not 0.0 < fallback_p <= 1.0:
            raise ValueError(f"fallback_p must lie in (0, 1], got {fallback_p}")
        self.fallback, self.fallback_rule = fallback, fallback_rule
        self.fallback_margin, self.fallback_p = fallback_margin, float(fallback_p)

    def _uses_fallback(self) -> bool:
        """Default: fall back to Tip-Adapter-F in "search" mode only; the other γ modes are ablation readings."""
        return self.gamma_mode == "search" if self.fallback is None else bool(self.fallback)

    def _stage1(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor):
        from .tip_adapter_f import TipAdapterF

        taf = TipAdapterF(seed=self.seed, device=self.device, logit_scale=self.logit_scale, epochs=self.epochs,
                          min_steps=self.min_steps, max_epochs=self.max_epochs, lr=self.lr, eps=self.eps,
                          batch_size=self.batch_size, weight_decay=self.weight_decay, beta_scale=self.beta_scale,
                          alpha_scale=self.alpha_scale, n_beta=self.n_beta, n_alpha=self.n_alpha)
        return taf.fit(support, val, text_classifier)

    def _val_logits(self, fv: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model_(fv, self.alpha_, self.beta_, self.beta_t_)[0]

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "XMAdapter":
        check_fit_inputs(support, val, text_classifier)
        dev = self.device
        taf = self._stage1(support, val, text_classifier)
        ts = taf.selected_
        self.model_, source = self._build(support, text_classifier, train=True)
        m = self.model_
        with torch.no_grad():
            m.keys.copy_(taf.model_.keys.detach())
        fv, yv = val.features.float().to(dev), val.labels.to(dev)
        alpha1, beta1 = float(ts["alpha"]), float(ts["beta"])
        common = {"text_source": source, "net_arch": self.net_arch, "text_dim": int(m.text.class_keys().shape[1]),
                  "tie_init": bool(self.tie_init), "train_keys": bool(self.train_keys), "lam": self.lam,
                  "weighting": self.weighting, "q": self.q, "disagreement": self.disagreement,
                  "epochs": int(ts["epochs"]), "lr": float(self.lr), "net_lr": float(self.net_lr),
                  "gamma_lr": float(self.gamma_lr), "batch_size": int(self.batch_size),
                  "selection": "val log-loss, then accuracy", "cache_keys": key_source(support),
                  "stage1": {k: ts[k] for k in ("alpha", "beta", "epoch", "kept", "val_acc", "val_loss",
                                                "val_acc_training_free")}}
        if self._text_off():
            self._fallback(taf)
            self.selected_ = {**self._fallback_info(taf), **common, "stage2_epoch": None,
                              "kept": "tip-adapter-f"}
            return self
        groups = []
        if self.train_keys:
            groups.append({"params": [m.keys], "lr": self.lr})
        groups.append({"params": list(m.text.parameters()), "lr": self.net_lr})
        gamma_params = list(m.gamma.parameters())
        if gamma_params:
            lr_g = self.gamma_lr if self.gamma_mode == "learned" else self.net_lr  # per-sample γ: a network
            groups.append({"params": gamma_params, "lr": lr_g})
        beta_t = None if self.beta_text is None else float(self.beta_text)
        eval_fn = self._grid_eval(fv, yv, alpha1, beta1, beta_t) if self.gamma_mode == "search" else None
        with seeded(self.seed):
            best_epoch, curve, losses = train_cache_model(
                m, support, fv, yv, groups, epochs=int(ts["epochs"]), lr=self.lr, eps=self.eps,
                batch_size=self.batch_size, alpha=alpha1, beta=beta1, beta_t=beta_t, seed=self.seed, device=dev,
                weight_fn=self._weight_fn(), weight_decay=self.weight_decay, eval_fn=eval_fn,
                on_epoch=self.on_epoch)
        m.eval()
        chosen = self._search(fv, yv)
        logits2 = self._val_logits(fv)
        loss2, _ = val_loss_acc(logits2, yv)
        acc2 = chosen["val_acc"]
        stage2 = {"stage2_epoch": int(best_epoch), "stage2_val_acc": float(acc2), "stage2_val_loss": float(loss2),
                  "val_acc_per_epoch": [float(a) for a in curve], "val_loss_per_epoch": [float(v) for v in losses]}
        with torch.no_grad():
            right2 = logits2.argmax(-1) == yv
            right1 = taf.decision_scores(fv).argmax(-1) == yv
        won, lost = int((right2 & ~right1).sum()), int((right1 & ~right2).sum())
        stage2["val_images_won_lost"] = [won, lost]
        if self.fallback_rule == "sign-test":
            stage2["sign_test_p"] = sign_test_p(won, lost)
        wins = keeps_stage_two(won, lost, loss2 < ts["val_loss"], self.fallback_rule, self.fallback_margin,
                               self.fallback_p)
        if wins or not self._uses_fallback():
            self.selected_ = {**chosen, **common, **stage2, "val_loss": float(loss2), "kept": "xmadapter"}
        else:
            self._fallback(taf)
            self.selected_ = {**self._fallback_info(taf), **common, **stage2, "kept": "tip-adapter-f"}
        return self

    def _grid_eval(self, fv, yv, alpha: float, beta: float, beta_t: float | None):
        """Validation (log-loss, accuracy) at the best γ of the grid, for epoch selection in "search" mode."""
        m = self.model_
        gammas = [float(g) for g in self.gamma_grid]

        frozen = constant_terms(m, fv, beta).get("p_img")  # frozen keys: A_img L computed once

        def evaluate() -> tuple[float, float]:
            zs = m.zero_shot(fv)
            p_img = m.img_affinity(fv, beta) if frozen is None else frozen
            p_txt = m.txt_affinity(fv, beta if beta_t is None else beta_t)
            g = torch.tensor(gammas, dtype=zs.dtype, device=zs.device)[:, None, None]
            logits = zs[None] + alpha * (g * p_img[None] + (1 - g) * p_txt[None])        # (G, M, C), all γ at once
            n_g, n_m, n_c = logits.shape
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, n_c), yv.repeat(n_g),
                                                       reduction="none").view(n_g, n_m).mean(1)
            accs = (logits.argmax(-1) == yv).float().mean(1)
            best = None
            for cand in zip(losses.tolist(), accs.tolist()):
                if better(cand, best):
                    best = cand
            return best

        return evaluate

    def _fallback(self, taf) -> None:
        """Become the stage-1 Tip-Adapter-F exactly: its keys, γ = 1 (text branch not evaluated), its α, β."""
        m = self.model_
        with torch.no_grad():
            m.keys.copy_(taf.model_.keys.detach())
        m.gamma = Gamma("fixed", 1.0, m.keys.shape[1]).to(self.device)
        self.alpha_, self.beta_ = taf.alpha_, taf.beta_
        self.beta_t_ = self.beta_ if self.beta_text is None else float(self.beta_text)

    def _fallback_info(self, taf) -> dict:
        ts = taf.selected_
        return {"alpha": float(ts["alpha"]), "beta": float(ts["beta"]), "beta_text": float(self.beta_t_),
                "beta_text_tied": self.beta_text is None, "gamma": 1.0, "gamma_mode": self.gamma_mode,
                "val_acc": float(ts["val_acc"]), "val_loss": float(ts["val_loss"]), "epoch": int(ts["epoch"]),
                **self._grid_info()}


@register("xmadapter-tf")
class XMAdapterTF(_XMBase):
    """Training-free XMAdapter: MetaNet and Img2TxtNet are identities, so the text cache scores
    exp(−β_t(1 − f·t̂_c)) against the class text features t_c (zero-shot classifier rows by default);
    γ ∈ gamma_grid, β and α are grid-searched jointly on validation (gamma_mode 'search'; 'fixed' also
    allowed). No hard-sample weighting (nothing is trained)."""

    training_free = True
    arch_default = "identity"

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *,
                 gamma_mode: str = "search", **params) -> None:
        if gamma_mode not in ("search", "fixed"):
            raise ValueError(f"xmadapter-tf has nothing to train: gamma_mode must be 'search' or 'fixed', "
                             f"got {gamma_mode!r} (use 'xmadapter' for learned γ)")
        params.setdefault("net_arch", "identity")
        if params["net_arch"] != "identity":
            raise ValueError("xmadapter-tf uses identity maps for MetaNet/Img2TxtNet (untrained networks would be "
                             "random); use 'xmadapter' for trained networks")
        super().__init__(seed=seed, device=device, logit_scale=logit_scale, gamma_mode=gamma_mode, **params)

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "XMAdapterTF":
        check_fit_inputs(support, val, text_classifier)
        self.model_, source = self._build(support, text_classifier, train=False)
        fv, yv = val.features.float().to(self.device), val.labels.to(self.device)
        chosen = self._search(fv, yv)
        self.selected_ = {**chosen, "text_source": source, "net_arch": "identity",
                          "cache_keys": key_source(support)}
        if self.gamma_mode == "search":
            self.selected_["gamma_grid"] = [float(g) for g in self.gamma_grid]
        return self
