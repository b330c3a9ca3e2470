"""xmodal: cross-modal adapters between frozen vision and language models.

Few-shot CLIP adaptation (XMAdapter and its baselines) on cached features, and X-adapter modules that
bring CLIP's visual knowledge into text-only language models.
"""
from __future__ import annotations

from .version import __version__  # noqa: E402

from .backbones import load_backbone  # noqa: E402
from .data import fewshot_split, load_dataset  # noqa: E402
from .features import extract_features  # noqa: E402
from .featureset import FeatureSet  # noqa: E402
from .fewshot import available_methods, create_method  # noqa: E402
from .classifier import FewShotClassifier  # noqa: E402

__all__ = ["__version__", "load_backbone", "load_dataset", "fewshot_split", "extract_features", "FeatureSet",
           "available_methods", "create_method", "FewShotClassifier"]
