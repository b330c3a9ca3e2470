"""Reading a fitted method's ``selected_``: what was chosen on validation, what was fixed, what it became.

``selected_`` mixes three kinds of entry: hyper-parameters chosen on validation (α, β, the epoch …), fixed
settings echoed for provenance (grid sizes, learning rate …) and curves or scores (per-epoch validation
losses, validation accuracy). Tables and cards show the first kind, list the second once, and leave curves
to the JSON rows. ``became`` says what a method with a fallback turned into (XMAdapter keeping its
Tip-Adapter-F stage, a trained cache left untrained), and why.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

# hyper-parameters a method chooses per fit (on validation); any other scalar is a fixed setting
CHOSEN = ("alpha", "beta", "gamma", "beta_text", "epoch", "stage2_epoch", "C", "ratio", "feat_num", "shrinkage",
          "kept")
# scores and bookkeeping: neither chosen nor a setting
_NOT_SETTINGS = ("val_", "stage2_val_", "sign_test_p", "n_fits", "n_train", "cache_size", "alpha_mean",
                 "init_alpha", "init_beta", "text_dim", "samples_per_image", "log10_C", "feat_frac")

_STAGE_NAMES = {"tip-adapter-f": "Tip-Adapter-F stage", "xmadapter": "stage 2 (text cache)",
                "training-free": "training-free cache", "trained": "trained cache"}


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def chosen_settings(selected: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters chosen on validation, in ``CHOSEN`` order (only those the method reports)."""
    return {k: selected[k] for k in CHOSEN if k in selected and _is_scalar(selected[k]) and selected[k] is not None}


def fixed_settings(selected: dict[str, Any]) -> dict[str, Any]:
    """Scalar settings that were given, not chosen (grid sizes, learning rates, the selection rule …)."""
    return {k: v for k, v in selected.items()
            if k not in CHOSEN and _is_scalar(v) and not any(k.startswith(p) for p in _NOT_SETTINGS)}


def became(method: str, selected: dict[str, Any]) -> str | None:
    """What the fitted method turned into when it can fall back, e.g. "kept Tip-Adapter-F stage (sign test
    p = 0.75)"; None for methods without such a choice. Cross-fitted members are counted."""
    folds = selected.get("per_fold")
    if isinstance(folds, list) and folds:
        parts = [became(method, f) for f in folds if isinstance(f, dict)]
        counts = Counter(p for p in parts if p)
        if not counts:
            return None
        return "; ".join(f"{text} in {n} of {len(folds)} folds" for text, n in counts.most_common())
    kept = selected.get("kept")
    if not isinstance(kept, str):
        return None
    text = f"kept {_STAGE_NAMES.get(kept, kept)}"
    if "sign_test_p" in selected and isinstance(selected["sign_test_p"], (int, float)):
        won_lost = selected.get("val_images_won_lost")
        detail = f"sign test p = {float(selected['sign_test_p']):.3g}"
        if isinstance(won_lost, list) and len(won_lost) == 2:
            detail += f", stage 2 won {won_lost[0]} / lost {won_lost[1]} validation images"
        return f"{text} ({detail})"
    if kept == "training-free" and "val_acc_training_free" in selected:
        return f"{text} (training did not lower the validation loss)"
    return text


def format_settings(values: dict[str, Any]) -> str:
    """``k=v, …`` with floats to 4 significant digits; "–" when empty."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "–"


def summary_line(method: str, selected: dict[str, Any]) -> str:
    """One line for a card or a CLI: the chosen settings (per fold under cross-validation) and what it became."""
    folds = selected.get("per_fold")
    if isinstance(folds, list) and folds:
        keys = [k for k in CHOSEN if k != "kept" and any(k in f for f in folds)]
        text = ", ".join(f"{k}=" + "/".join(f"{f[k]:.4g}" if isinstance(f.get(k), float) else str(f.get(k, "–"))
                                             for f in folds) for k in keys) or "–"
        text = f"per fold: {text}"
    else:
        text = format_settings({k: v for k, v in chosen_settings(selected).items() if k != "kept"})
    turned = became(method, selected)
    return f"{text}; {method} → {turned}" if turned else text


__all__ = ["CHOSEN", "chosen_settings", "fixed_settings", "became", "format_settings", "summary_line"]
