"""Encoders: what a vision-language model is — its towers, preprocessing and fingerprint — built from a
string spec. Nothing here knows how a tower is run fast (``xmodal.engines``) or where features are cached
(``xmodal.features``); ``xmodal.backbones.load_backbone`` puts an encoder on an engine.

Specs:
  openclip:<arch>/<pretrained-tag-or-local-file>   open_clip models (RN50, ViT-B-16, ...)
  hf:<model-id-or-local-folder>                    Hugging Face CLIPModel
  bridge:lite0-minilm                              offline default stand-in (EfficientNet-Lite0 + MiniLM)
  tiny:clip[:seed]                                 seeded random tiny model for tests
"""
from __future__ import annotations

from .base import TowerRunner, VisionLanguageBackbone

KNOWN_SPECS = {
    "bridge:lite0-minilm": "offline default: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, ridge-bridged (stand-in, not CLIP)",
    "tiny:clip": "seeded random tiny dual encoder, for tests",
    "openclip:<arch>/<tag-or-file>": "open_clip model, e.g. openclip:RN50/openai or openclip:ViT-B-16/path/to/weights.bin",
    "hf:<model-id-or-folder>": "Hugging Face CLIPModel, e.g. hf:openai/clip-vit-base-patch16 or hf:/path/to/folder",
}


def build_backbone(spec: str, cache_dir: str | None = None) -> VisionLanguageBackbone:
    """The backbone named by ``spec``, on CPU, running its towers in eager PyTorch (no engine installed).
    ``cache_dir`` is where the offline bridge keeps its fitted map (default ``$XMODAL_CACHE`` or
    ``.xmodal-cache``)."""
    kind, _, rest = spec.partition(":")
    if kind == "tiny":
        from .tiny import TinyClip

        seed = int(rest.split(":")[1]) if rest.count(":") else 0
        return TinyClip(spec=spec, seed=seed)
    if kind == "bridge":
        from .bridge import BridgeBackbone

        return BridgeBackbone(spec=spec, variant=rest, cache_dir=cache_dir)
    if kind == "openclip":
        from .openclip import OpenClipBackbone

        return OpenClipBackbone(spec=spec, target=rest)
    if kind == "hf":
        from .hf import HFClipBackbone

        return HFClipBackbone(spec=spec, target=rest)
    from ..errors import UnknownBackboneError

    raise UnknownBackboneError(f"unknown backbone spec {spec!r}. Known forms: " + "; ".join(KNOWN_SPECS))


__all__ = ["VisionLanguageBackbone", "TowerRunner", "build_backbone", "KNOWN_SPECS"]
