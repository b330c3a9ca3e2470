"""Import path kept for callers written before encoders and engines were separate layers."""
from __future__ import annotations

from ..encoders.transforms import augment_transform, describe, eval_transform

__all__ = ["augment_transform", "describe", "eval_transform"]
