"""How a backbone's towers run: PyTorch, or an exact ONNX Runtime export on CPU, plus the opt-in
reduced-precision modes (bf16 compiled, int8 QDQ) that carry their own feature-cache keys.

The exact engines (``torch``, ``onnx``) give the same fp32 features (cosine >= 0.99999), so the choice
is not part of any cache key; ``bf16`` and ``int8`` change the numbers and are keyed separately.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from ..encoders.base import VisionLanguageBackbone

ENGINES = ("auto", "torch", "onnx")
ENGINE_ENV = "XMODAL_ENGINE"


def resolve_engine(engine: str | None) -> str:
    """``None`` -> ``$XMODAL_ENGINE`` or ``auto``; anything outside ``ENGINES`` is a usage error."""
    value = engine if engine is not None else (os.environ.get(ENGINE_ENV) or "auto")
    value = value.strip().lower()
    if value not in ENGINES:
        source = f"${ENGINE_ENV}" if engine is None else "engine"
        raise UsageError(f"unknown {source} {value!r}", hint=f"use one of {', '.join(ENGINES)} (--engine auto|torch|onnx)")
    return value


def attach_engine(backbone: "VisionLanguageBackbone", engine: str | None = None,
                  cache_dir: str | Path | None = None) -> "VisionLanguageBackbone":
    """Run ``backbone``'s image towers on ``engine``: ``auto`` (ONNX Runtime on CPU where the backbone's kind
    prefers it, else PyTorch), ``torch`` or ``onnx``; ``None`` reads ``$XMODAL_ENGINE``. The ONNX export
    happens lazily, on first use, into ``cache_dir/onnx``. Returns the backbone."""
    from .runner import EngineRunner

    backbone.runner = EngineRunner(resolve_engine(engine), cache_dir)
    return backbone


__all__ = ["ENGINES", "ENGINE_ENV", "resolve_engine", "attach_engine"]
