"""Abstaining: answer "unknown" when the top class probability is below a threshold (``min_score``).

A threshold is only useful if it is chosen on images the model was not fitted on. ``suggest_min_score``
picks it on the validation images (or the out-of-fold support images under cross-validation): the lowest
threshold whose accepted images reach a target accuracy, i.e. the one that abstains least while meeting it.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import UsageError

UNKNOWN = "unknown"
DEFAULT_TARGET_ACCURACY = 0.95


def check_min_score(min_score: Any) -> float | None:
    """None (never abstain) or a float in [0, 1]; anything else is a usage error."""
    if min_score is None:
        return None
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not math.isfinite(min_score) \
            or not 0.0 <= float(min_score) <= 1.0:
        raise UsageError(f"min_score must be a probability between 0 and 1, got {min_score!r}",
                         hint="use e.g. --min-score 0.5, or --min-score auto for the threshold saved at fit time")
    return float(min_score)


def suggest_min_score(probs: torch.Tensor, labels: torch.Tensor,
                      target_accuracy: float = DEFAULT_TARGET_ACCURACY) -> dict[str, Any]:
    """The smallest top-probability threshold at which the accepted images are ``target_accuracy`` correct.

    probs (N, C) class probabilities of held-out images, labels (N,). Returns the threshold (None when no
    threshold reaches the target), the coverage (fraction accepted) and the accuracy on accepted images.
    """
    if not 0.0 < target_accuracy <= 1.0:
        raise UsageError(f"target accuracy must lie in (0, 1], got {target_accuracy!r}")
    top, pred = probs.float().max(dim=1)
    correct = (pred == labels).float()
    n = int(len(top))
    out: dict[str, Any] = {"target_accuracy": float(target_accuracy), "n": n}
    if n == 0:
        return {**out, "min_score": None, "coverage": 0.0, "accuracy": None}
    order = torch.argsort(top, descending=True, stable=True)
    top_sorted, correct_sorted = top[order], correct[order]
    acc_at = correct_sorted.cumsum(0) / torch.arange(1, n + 1)
    best = None  # the largest prefix (lowest threshold) meeting the target, cut only between distinct scores
    for i in range(n - 1, -1, -1):
        if i + 1 < n and float(top_sorted[i + 1]) == float(top_sorted[i]):
            continue  # a threshold cannot separate equal scores
        if float(acc_at[i]) >= target_accuracy:
            best = i
            break
    if best is None:
        return {**out, "min_score": None, "coverage": 0.0, "accuracy": None}
    threshold = 0.0 if best == n - 1 else float(top_sorted[best])
    return {**out, "min_score": threshold, "coverage": (best + 1) / n, "accuracy": float(acc_at[best])}


__all__ = ["UNKNOWN", "DEFAULT_TARGET_ACCURACY", "check_min_score", "suggest_min_score"]
