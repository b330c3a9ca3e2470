"""Backbones: an encoder (``xmodal.encoders``: towers, preprocessing, fingerprint) put on an engine
(``xmodal.engines``: how its towers run). ``load_backbone`` is what every caller uses.

Specs:
  openclip:<arch>/<pretrained-tag-or-local-file>   open_clip models (RN50, ViT-B-16, ...)
  hf:<model-id-or-local-folder>                    Hugging Face CLIPModel
  bridge:lite0-minilm                              offline default stand-in (EfficientNet-Lite0 + MiniLM)
  tiny:clip[:seed]                                 seeded random tiny model for tests
"""
from __future__ import annotations

from ..encoders import KNOWN_SPECS, build_backbone
from ..encoders.base import VisionLanguageBackbone
from ..engines import attach_engine, resolve_engine


def load_backbone(spec: str, device: str = "cpu", cache_dir: str | None = None,
                  engine: str | None = None) -> VisionLanguageBackbone:
    """Build the backbone named by ``spec`` and move it to ``device``.

    ``engine``: ``"auto"`` (default; ``$XMODAL_ENGINE`` when set) runs the image towers through an exact
    ONNX Runtime export on CPU where that is faster, PyTorch elsewhere; ``"torch"`` or ``"onnx"`` force one.
    Exports are cached under ``cache_dir/onnx`` (default ``$XMODAL_CACHE`` or ``.xmodal-cache``).
    """
    engine = resolve_engine(engine)  # a bad value fails before any weights load
    return attach_engine(build_backbone(spec, cache_dir), engine, cache_dir).to(device)


__all__ = ["VisionLanguageBackbone", "load_backbone", "KNOWN_SPECS"]
