"""The cache model shared by Tip-Adapter(-F) and XMAdapter, and its training loop.

One module computes, for L2-normalised image features f,

    logits = logit_scale · f Wᵀ + α · (γ · A_img L + (1 − γ) · A_txt L)
    A_img  = exp(−β (1 − f Kᵀ))                       K: image-cache keys (NK, D), L: one-hot values (NK, C)
    A_txt L = n_c · exp(−β_t (1 − ĝ M̂_cᵀ))            text branch (XMAdapter only), see TextBranch

With no text branch (or γ fixed at exactly 1) this *is* Tip-Adapter / Tip-Adapter-F, and
``train_cache_model`` is Tip-Adapter-F's loop, so XMAdapter reduces to them bit for bit.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..featureset import FeatureSet
from ._common import (adamw, batches, class_groups, cosine_lr, cpu_generator, epoch_features, epoch_view,
                      to_classes)


def mlp(d_in: int, d_out: int, arch: str) -> nn.Module:
    """XMAdapter's MetaNet / Img2TxtNet: CoCoOp meta-net layout Linear(d_in, d_in/16) → ReLU → Linear(·, d_out),
    or a single Linear(d_in, d_out) (``arch="linear"``)."""
    if arch == "mlp":
        hidden = max(1, d_in // 16)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, d_out))
    if arch == "linear":
        return nn.Linear(d_in, d_out)
    if arch == "identity":
        return nn.Identity()
    raise ValueError(f"unknown network architecture {arch!r}; use 'mlp', 'linear' or 'identity'")


class TextBranch(nn.Module):
    """XMAdapter's cross-modal (text) cache at class level.

    M = MetaNet(T) (C, D) from class text features T; ĝ = norm(Img2TxtNet(f)); the text-cache keys are
    F_txt = L·M̂ (each cache entry gets its class's row), so A_txt L [·, c] = n_c · exp(−β_t(1 − ĝ·M̂_c)),
    computed here without materialising the NK expanded rows.
    """

    def __init__(self, class_text: torch.Tensor, counts: torch.Tensor, img_dim: int, out_dim: int,
                 arch: str, tie_init: bool) -> None:
        super().__init__()
        self.register_buffer("class_text", class_text.float())
        self.register_buffer("counts", counts.float())
        text_dim = class_text.shape[1]
        self.meta_net = mlp(text_dim, out_dim, arch)
        self.img2txt = mlp(img_dim, out_dim, arch)
        if tie_init and arch != "identity" and text_dim == img_dim:
            # Start both maps equal, so ĝ·M̂_c begins as an image-text similarity measured through one shared
            # (random) projection instead of noise; they are trained separately afterwards.
            self.img2txt.load_state_dict(self.meta_net.state_dict())

    def class_keys(self) -> torch.Tensor:
        return F.normalize(self.meta_net(self.class_text), dim=-1)

    def class_sim(self, f: torch.Tensor) -> torch.Tensor:
        """(B, C) cosine similarity between the image's text-space feature and each class's text key."""
        return F.normalize(self.img2txt(f), dim=-1) @ self.class_keys().T


class Gamma(nn.Module):
    """Fusion weight γ: 'learned' scalar sigmoid(θ), 'per-sample' sigmoid(MLP(f)), or a constant."""

    def __init__(self, mode: str, init: float, img_dim: int) -> None:
        super().__init__()
        self.mode = mode
        self.value = float(init)
        if mode == "learned":
            self.theta = nn.Parameter(torch.tensor(_logit(init)))
        elif mode == "per-sample":
            hidden = max(1, img_dim // 16)
            self.net = nn.Sequential(nn.Linear(img_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.net[2].weight)
            nn.init.constant_(self.net[2].bias, _logit(init))  # starts at γ = init for every sample

    def forward(self, f: torch.Tensor):
        if self.mode == "learned":
            return torch.sigmoid(self.theta)
        if self.mode == "per-sample":
            return torch.sigmoid(self.net(f))  # (B, 1)
        return self.value  # python float: γ = 1 gives the image term exactly


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


class CacheModel(nn.Module):
    def __init__(self, keys: torch.Tensor, cache_labels: torch.Tensor, text_classifier: torch.Tensor,
                 logit_scale: float, train_keys: bool, text: TextBranch | None = None,
                 gamma: Gamma | None = None) -> None:
        super().__init__()
        c = text_classifier.shape[0]
        order, self.group = class_groups(cache_labels, c)  # class-sorted entries: A·L as a grouped sum
        keys, cache_labels = keys[order.to(keys.device)], cache_labels[order.to(cache_labels.device)]
        if train_keys:
            self.keys = nn.Parameter(keys.float().clone())
        else:
            self.register_buffer("keys", keys.float().clone())
        self.register_buffer("values", F.one_hot(cache_labels.long(), c).float())
        self.register_buffer("text_classifier", text_classifier.float())
        self.logit_scale = float(logit_scale)
        self.text = text
        self.gamma = gamma

    def zero_shot(self, f: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * f @ self.text_classifier.T

    def img_affinity(self, f: torch.Tensor, beta: float) -> torch.Tensor:
        """A_img L, (B, C)."""
        return to_classes(torch.exp(-beta * (1 - f @ self.keys.T)), self.values, self.group)

    def txt_affinity(self, f: torch.Tensor, beta_t: float) -> torch.Tensor:
        """A_txt L, (B, C)."""
        return torch.exp(-beta_t * (1 - self.text.class_sim(f))) * self.text.counts

    def constant_terms(self, f: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        """With frozen keys A_img L never changes: the training loop computes it once per input set."""
        return {} if self.keys.requires_grad else {"p_img": self.img_affinity(f, beta)}

    def forward(self, f: torch.Tensor, alpha: float, beta: float, beta_t: float | None = None,
                need_text: bool = False, p_img: torch.Tensor | None = None):
        """Returns (logits, A_img L, A_txt L or None). ``p_img``: A_img L already computed for ``f``."""
        if p_img is None:
            p_img = self.img_affinity(f, beta)
        p_txt = None
        g = 1.0 if self.gamma is None else self.gamma(f)
        use_text = self.text is not None and not (isinstance(g, float) and g == 1.0)
        if self.text is not None and (use_text or need_text):
            p_txt = self.txt_affinity(f, beta if beta_t is None else beta_t)
        p = g * p_img + (1 - g) * p_txt if use_text else p_img
        return self.zero_shot(f) + alpha * p, p_img, p_txt


WeightFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EvalFn = Callable[[], tuple[float, float]]


def resolve_epochs(epochs: int | str, n_train: int, batch_size: int, min_steps: int, max_epochs: int) -> int:
    """``epochs="auto"``: at least 20 epochs and at least ``min_steps`` optimiser steps (capped at ``max_epochs``).

    A 1-shot, 10-class support set is one batch, so 20 epochs are 20 steps; a 16-shot, 202-class set is
    13 batches, so 20 epochs are 260 steps. "auto" gives small support sets enough steps without
    lengthening large ones. An int is used as given.
    """
    if isinstance(epochs, str):
        if epochs != "auto":
            raise ValueError(f"epochs must be an int or 'auto', got {epochs!r}")
        per_epoch = max(1, math.ceil(n_train / batch_size))
        return int(min(max_epochs, max(20, math.ceil(min_steps / per_epoch))))
    if int(epochs) < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    return int(epochs)


def val_loss_acc(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of validation logits: the selection criterion of every trained cache method."""
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(-1) == labels).float().mean())


def better(cand: tuple[float, float], best: tuple[float, float] | None) -> bool:
    """Selection rule: lower validation log-loss wins; on an exact tie, higher accuracy; else keep the earlier one."""
    if best is None:
        return True
    return cand[0] < best[0] or (cand[0] == best[0] and cand[1] > best[1])


def constant_terms(model: nn.Module, x: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Terms of ``model(x, …)`` that training does not change (``model.constant_terms``), computed once per
    input set and passed back to ``forward`` as keyword arguments; {} for models without any."""
    fn = getattr(model, "constant_terms", None)
    if fn is None:
        return {}
    with torch.no_grad():
        return fn(x, beta)


def train_cache_model(
    model: nn.Module,
    support: FeatureSet,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    param_groups: list[dict],
    *,
    epochs: int,
    lr: float,
    eps: float,
    batch_size: int,
    alpha: float,
    beta: float,
    beta_t: float | None,
    seed: int,
    device: str,
    weight_fn: WeightFn | None = None,
    weight_decay: float = 0.01,
    eval_fn: EvalFn | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> tuple[int, list[float], list[float]]:
    """Tip-Adapter-F's loop: AdamW + cosine schedule, CE on the fused logits at the given (α, β).

    (α, β) are the training-free values searched on validation, not fixed constants. Epoch e trains on
    augmented view e mod V of every support image (plain features without views), in shuffled batches.
    The model is scored on val before training (epoch 0: the training-free state) and after every epoch;
    the state with the lowest validation log-loss (ties: higher accuracy, then the earlier epoch) is
    restored, so training can only be kept when it helps on validation. ``eval_fn()`` -> (loss, acc)
    replaces the default scoring (XMAdapter scores its best γ). ``weight_fn(p_img, p_txt, labels)`` gives
    per-sample loss weights (XMAdapter's hard-sample mining). Returns (best epoch, 0 = untrained;
    val accuracy per epoch incl. epoch 0; val loss per epoch incl. epoch 0).
    """
    gen = cpu_generator(seed)
    n = len(support)
    labels = support.labels.to(device)
    view_constants: dict[int | None, dict[str, torch.Tensor]] = {}  # per view: terms fixed while training
    val_constants = constant_terms(model, val_features, beta) if loss_fn is None and eval_fn is None else {}

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            if eval_fn is not None:
                return eval_fn()
            logits, _, _ = model(val_features, alpha, beta, beta_t, **val_constants)
            return val_loss_acc(logits, val_labels)

    best = evaluate()
    best_epoch, best_state = 0, {k: v.detach().clone() for k, v in model.state_dict().items()}
    acc_curve, loss_curve = [best[1]], [best[0]]
    if epochs > 0:
        opt = adamw(param_groups, lr=lr, eps=eps, weight_decay=weight_decay)
        sched = cosine_lr(opt, epochs * math.ceil(n / batch_size))
    for epoch in range(epochs):
        model.train()
        x_all = epoch_features(support, epoch).to(device)
        view = epoch_view(support, epoch)
        if loss_fn is None and view not in view_constants:
            view_constants[view] = constant_terms(model, x_all, beta)
        consts = view_constants.get(view, {})
        for idx in batches(n, batch_size, gen):
            idx = idx.to(device)
            x, y = x_all[idx], labels[idx]
            if loss_fn is not None:
                loss = loss_fn(x, y)
            else:
                logits, p_img, p_txt = model(x, alpha, beta, beta_t, need_text=weight_fn is not None,
                                             **{k: v[idx] for k, v in consts.items()})
                if weight_fn is not None and p_txt is not None:
                    w = weight_fn(p_img.detach(), p_txt.detach(), y)
                    loss = (w * F.cross_entropy(logits, y, reduction="none")).sum() / w.sum()
                else:
                    loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        cur = evaluate()
        acc_curve.append(cur[1])
        loss_curve.append(cur[0])
        if better(cur, best):
            best, best_epoch = cur, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch is not None:  # progress: (epochs done, total)
            on_epoch(epoch + 1, epochs)
    model.load_state_dict(best_state)
    model.eval()
    return best_epoch, acc_curve, loss_curve
