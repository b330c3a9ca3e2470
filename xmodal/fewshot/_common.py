"""Helpers shared by the few-shot methods: input checks, cache building, vectorised grid search.

Nothing here is registered; the leading underscore keeps ``_load_all`` from importing it as a method.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import ShapeError
from ..featureset import FeatureSet

# Tip-Adapter's search grids are written for CLIP's logit scale (100); xmodal scales every α grid (and the
# α used while training) by logit_scale / 100 so the cache term keeps the same weight relative to the
# zero-shot term for backbones with a different temperature. For logit_scale = 100 nothing changes.
CLIP_LOGIT_SCALE = 100.0


# --------------------------------------------------------------------------------------------- checks


def check_fit_inputs(support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> None:
    """Raise ShapeError, naming the shapes, unless support, val and the text classifier agree."""
    if not isinstance(text_classifier, torch.Tensor) or text_classifier.ndim != 2:
        shape = tuple(text_classifier.shape) if isinstance(text_classifier, torch.Tensor) else type(text_classifier)
        raise ShapeError(f"text_classifier must be a (C, D) tensor, got {shape}")
    c, d = text_classifier.shape
    if support.dim != d:
        raise ShapeError(f"support features {tuple(support.features.shape)} and text_classifier "
                         f"{tuple(text_classifier.shape)} disagree on the embedding width ({support.dim} vs {d}); "
                         "were they produced by the same backbone?")
    if val.dim != d:
        raise ShapeError(f"val features {tuple(val.features.shape)} and text_classifier "
                         f"{tuple(text_classifier.shape)} disagree on the embedding width ({val.dim} vs {d})")
    if support.num_classes != c or val.num_classes != c:
        raise ShapeError(f"text_classifier {tuple(text_classifier.shape)} has {c} classes but support has "
                         f"{support.num_classes} and val {val.num_classes} class names")
    if len(support) == 0:
        raise ShapeError("support set is empty")
    if len(val) == 0:
        raise ShapeError("validation set is empty: hyper-parameters are chosen on val, never on test")


def check_features(features: torch.Tensor, dim: int, what: str = "features") -> None:
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != dim:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ShapeError(f"{what} must be (N, {dim}) to match the fitted model, got {shape}")


def require_fitted(method, attr: str) -> None:
    if not hasattr(method, attr):
        raise RuntimeError(f"{type(method).__name__} is not fitted yet: call fit(support, val, text_classifier)")


# --------------------------------------------------------------------------------------------- caches


def cache_keys(fs: FeatureSet) -> torch.Tensor:
    """Tip-Adapter cache keys: mean over the augmented views (if any), L2-normalised; else the features."""
    if fs.views is not None and fs.views.shape[0] > 0:
        return F.normalize(fs.views.float().mean(0), dim=-1)
    return fs.features.float()


def key_source(fs: FeatureSet) -> str:
    return f"mean-of-{fs.views.shape[0]}-views" if fs.views is not None and fs.views.shape[0] > 0 else "features"


def epoch_view(fs: FeatureSet, epoch: int) -> int | None:
    """Which augmented view epoch ``epoch`` trains on (``epoch mod V``); None without views (plain features)."""
    if fs.views is not None and fs.views.shape[0] > 0:
        return epoch % fs.views.shape[0]
    return None


def epoch_features(fs: FeatureSet, epoch: int) -> torch.Tensor:
    """Training inputs for one epoch: view ``epoch mod V`` of every support image (plain features if no views)."""
    view = epoch_view(fs, epoch)
    return fs.features.float() if view is None else fs.views[view].float()


def class_groups(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, int | None]:
    """(order, K): a stable order that sorts cache entries by class, and K when every class then has exactly
    K consecutive entries (the sampler's K-shot sets), else None. With K, ``A·L`` (one-hot values) is a
    reshape-and-sum over K instead of an (NK × C) matmul: the same numbers, C times fewer operations."""
    order = torch.argsort(labels.long(), stable=True)
    counts = torch.bincount(labels.long(), minlength=num_classes)
    k = int(counts[0]) if len(counts) == num_classes and bool((counts == counts[0]).all()) and int(counts[0]) > 0 else None
    return order, k


def to_classes(a: torch.Tensor, values: torch.Tensor, group: int | None) -> torch.Tensor:
    """(…, NK) affinities -> (…, C): ``a @ values``, as a grouped sum when the entries are class-sorted in groups."""
    if group:
        return a.reshape(*a.shape[:-1], values.shape[1], group).sum(-1)
    return a @ values


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels.long(), num_classes).float()


# --------------------------------------------------------------------------------------------- grids


def tip_grid(scale: float, n: int) -> list[float]:
    """Tip-Adapter's search grid: 0.1 + i·(scale − 0.1)/n for i = 0..n−1."""
    if n < 1:
        raise ValueError(f"grid size must be ≥ 1, got {n}")
    return [0.1 + i * (scale - 0.1) / n for i in range(n)]


def first_best(acc: torch.Tensor) -> int:
    """Flat index of the first maximum (grid order decides ties, as in Tip-Adapter's strict '>' loop)."""
    flat = acc.reshape(-1)
    return int(torch.nonzero(flat == flat.max())[0, 0])


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(-1) == labels).float().mean())


def alpha_grid_accuracy(zs: torch.Tensor, alphas: torch.Tensor, p: torch.Tensor, labels: torch.Tensor,
                        buf: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation accuracy of argmax(zs + α·p) for every α at once: p (…, M, C) → (accuracy (…, A), buffer).

    The logits are written into one reused buffer (a multiply, then an in-place add: the same operations
    and rounding as ``zs + α·p``) — about twice as fast as allocating the (…, A, M, C) block every call.
    """
    shape = (*p.shape[:-2], alphas.numel(), *p.shape[-2:])
    if buf is None or buf.shape != shape or buf.dtype != p.dtype:
        buf = torch.empty(shape, dtype=p.dtype, device=p.device)
    torch.mul(p.unsqueeze(-3), alphas.to(p)[:, None, None], out=buf)
    buf.add_(zs)
    return (buf.argmax(-1) == labels).float().mean(-1), buf


def cache_grid_search(
    zs: torch.Tensor,
    labels: torch.Tensor,
    img_sim: torch.Tensor,
    values: torch.Tensor,
    betas: Sequence[float],
    alphas: Sequence[float],
    txt_class_sim: torch.Tensor | None = None,
    txt_counts: torch.Tensor | None = None,
    gammas: Sequence[float] | torch.Tensor | None = None,
    txt_beta: float | None = None,
    chunk_elems: int = 1 << 21,  # ~8 MB per block: cache-friendly; 1 << 24 was 2× slower at 202 classes
    group: int | None = None,
) -> tuple[int, int, int, torch.Tensor]:
    """Grid search of (γ, β, α) for cache logits ``zs + α·(γ·A_img + (1−γ)·A_txt)·L`` on validation.

    zs            (M, C) zero-shot logits of the val features
    img_sim       (M, NK) cosine similarities of val features to the image-cache keys
    values        (NK, C) one-hot cache values L
    txt_class_sim (M, C) cosine similarities in the text-cache space, one per class (optional); the text
                  affinity A_txt·L is then counts[c]·exp(−β(1 − s_c)), identical to expanding the class keys
                  to the NK cache entries (all K entries of a class share one text key)
    txt_beta      fixed β_t for the text affinity; None ties it to the β being searched
    gammas        γ values (grid) or a (M,) tensor of per-sample γ (one "grid point")
    group         K when the cache entries are class-sorted in groups of K (see ``class_groups``)

    Returns (gamma_index, beta_index, alpha_index, accuracy grid (G, B, A)). Ties: first in (γ, β, α) order.
    Fully vectorised over α and β (chunked over β to bound memory).
    """
    alphas_t = torch.tensor(list(alphas), dtype=zs.dtype, device=zs.device)
    betas_t = torch.tensor(list(betas), dtype=zs.dtype, device=zs.device)
    m, c = zs.shape
    if txt_class_sim is None:
        gamma_list: list = [1.0]
        per_sample = False
    elif isinstance(gammas, torch.Tensor) and gammas.ndim == 1 and gammas.shape[0] == m:
        gamma_list = [gammas.to(zs)[:, None]]
        per_sample = True
    else:
        gamma_list = [float(g) for g in (gammas if gammas is not None else [0.5])]
        per_sample = False
    acc = torch.empty(len(gamma_list), len(betas_t), len(alphas_t), device=zs.device)
    step = max(1, chunk_elems // max(1, m * max(img_sim.shape[1], c * len(alphas_t))))
    buf = None
    for lo in range(0, len(betas_t), step):
        b = betas_t[lo:lo + step]
        p_img = to_classes(torch.exp(-b[:, None, None] * (1 - img_sim[None])), values, group)  # (b, M, C)
        p_txt = None
        if txt_class_sim is not None:
            bt = b if txt_beta is None else torch.full_like(b, txt_beta)
            p_txt = torch.exp(-bt[:, None, None] * (1 - txt_class_sim[None])) * txt_counts  # (b, M, C)
        for gi, g in enumerate(gamma_list):
            if p_txt is None or (not per_sample and g == 1.0):
                p = p_img
            else:
                p = g * p_img + (1 - g) * p_txt
            acc[gi, lo:lo + step], buf = alpha_grid_accuracy(zs, alphas_t, p, labels, buf)  # logits (b, A, M, C)
    flat = first_best(acc)
    gi, rest = divmod(flat, len(betas_t) * len(alphas_t))
    bi, ai = divmod(rest, len(alphas_t))
    return gi, bi, ai, acc


# --------------------------------------------------------------------------------------------- seeding


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU RNG seeded, without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def cpu_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches (drawn on CPU so the order is the same on every device)."""
    perm = torch.randperm(n, generator=generator)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def adamw(params, lr: float, weight_decay: float, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with the fused kernel where PyTorch has one for the parameters' device (CPU and CUDA): one pass
    over each tensor per step instead of about ten. The same update up to float rounding (≈ 1 ulp per step),
    3–8× faster on the 4-million-entry caches of a 202-class, 16-shot problem (benchmarks/fewshot_speed.py)."""
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(t.device.type in ("cpu", "cuda") and t.dtype in (torch.float32, torch.float64)
                                  for t in tensors)
    return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=fused or None)


def cosine_lr(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps))


def jsonable(value):
    """Plain Python value for selected_ (tensors → numbers; non-finite floats → strings)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
