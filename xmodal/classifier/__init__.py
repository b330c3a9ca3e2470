"""Saved few-shot classifiers: fit once on your images, then classify from Python, the shell or HTTP.

Names are imported on first use (PEP 562), so ``xmodal.classifier.plan`` — the dataset checks ``xmodal fit``
runs before anything heavy — does not pay for torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FewShotClassifier": ".model", "Prediction": ".model", "DEFAULT_BACKBONE": ".model",
    "FORMAT_VERSION": ".artefact", "CONFIG_FILE": ".artefact", "TENSORS_FILE": ".artefact",
}

__all__ = ["FewShotClassifier", "Prediction", "FORMAT_VERSION", "CONFIG_FILE", "TENSORS_FILE", "DEFAULT_BACKBONE"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'xmodal.classifier' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
