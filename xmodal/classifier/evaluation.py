"""What ``xmodal predict --eval`` reports: per-class precision / recall / F1 / support, macro averages, top-1,
and — with a ``min_score`` — how much is abstained on and how accurate the rest is; ``--eval-unknown``
measures the abstention rate on images of none of the classes.

Plain counts from a confusion matrix (rows: true class, columns: predicted class), no scikit-learn needed.
"""
from __future__ import annotations

from typing import Any

import torch


def confusion_matrix(truth: list[int], preds: list[int], num_classes: int) -> torch.Tensor:
    """(C, C) counts: entry [t, p] is how many images of true class t were predicted as p."""
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    if truth:
        t, p = torch.tensor(truth), torch.tensor(preds)
        matrix.index_put_((t, p), torch.ones_like(t), accumulate=True)
    return matrix


def per_class_report(matrix: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Precision, recall, F1 and support of every class, their macro means, and top-1 (all in %).

    A class never predicted has precision 0 (and never present: recall 0) rather than an undefined value,
    so the macro means stay numbers; its ``support`` says how much the row rests on.
    """
    m = matrix.double()
    tp = m.diagonal()
    support = m.sum(1)
    predicted = m.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    rows = [{"class": name, "precision": 100 * float(precision[i]), "recall": 100 * float(recall[i]),
             "f1": 100 * float(f1[i]), "support": int(support[i])} for i, name in enumerate(classes)]
    present = support > 0  # macro over the classes the evaluated images contain
    n = int(m.sum())
    macro = {key: 100 * float(vals[present].mean()) if bool(present.any()) else 0.0
             for key, vals in (("precision", precision), ("recall", recall), ("f1", f1))}
    return {"top1": 100 * float(tp.sum()) / max(n, 1), "n": n, "n_correct": int(tp.sum()),
            "per_class": rows, "macro": {**macro, "classes": int(present.sum())}}


def abstention(scores: list[float], correct: list[bool] | None, min_score: float | None) -> dict[str, Any]:
    """How many images a threshold abstains on; with ``correct`` (in-set images) the accuracy on the rest."""
    n = len(scores)
    if min_score is None or n == 0:
        return {"min_score": min_score, "n": n, "abstained": 0, "abstention_rate": 0.0}
    kept = [i for i, s in enumerate(scores) if s >= min_score]
    out: dict[str, Any] = {"min_score": float(min_score), "n": n, "abstained": n - len(kept),
                           "abstention_rate": 100.0 * (n - len(kept)) / n}
    if correct is not None:
        out["coverage"] = 100.0 * len(kept) / n
        out["accuracy_on_accepted"] = 100.0 * sum(correct[i] for i in kept) / len(kept) if kept else None
    return out


def format_report(report: dict[str, Any], width: int = 20) -> list[str]:
    """The per-class table as text lines (class, precision, recall, F1, support; then the macro row)."""
    w = max(width, *(len(r["class"]) for r in report["per_class"])) if report["per_class"] else width
    lines = [f"{'class':{w}s}  {'precision':>9s}  {'recall':>7s}  {'F1':>6s}  {'support':>7s}"]
    for r in report["per_class"]:
        lines.append(f"{r['class']:{w}s}  {r['precision']:9.2f}  {r['recall']:7.2f}  {r['f1']:6.2f}  {r['support']:7d}")
    mac = report["macro"]
    label = f"macro ({mac['classes']} classes)"
    lines.append(f"{label:{w}s}  {mac['precision']:9.2f}  {mac['recall']:7.2f}  "
                 f"{mac['f1']:6.2f}  {report['n']:7d}")
    return lines


__all__ = ["confusion_matrix", "per_class_report", "abstention", "format_report"]
