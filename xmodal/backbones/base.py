"""Import path kept for callers written before encoders and engines were separate layers."""
from __future__ import annotations

from ..encoders.base import TowerRunner, VisionLanguageBackbone

__all__ = ["TowerRunner", "VisionLanguageBackbone"]
