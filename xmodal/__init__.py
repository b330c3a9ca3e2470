"""xmodal: cross-modal adapters between frozen vision and language models.

Few-shot CLIP adaptation (XMAdapter and its baselines) on cached features, and X-adapter modules that
bring CLIP's visual knowledge into text-only language models.

The public names below are imported on first use (PEP 562), so ``import xmodal`` — and every ``xmodal
--help`` — does not pay for torch; ``from xmodal import FewShotClassifier`` works as before.
"""
from __future__ import annotations

import importlib
from typing import Any

from .version import __version__  # noqa: E402

_LAZY = {
    "load_backbone": ".backbones",
    "load_dataset": ".data",
    "fewshot_split": ".data",
    "extract_features": ".features",
    "FeatureSet": ".featureset",
    "available_methods": ".fewshot",
    "create_method": ".fewshot",
    "FewShotClassifier": ".classifier",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'xmodal' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
