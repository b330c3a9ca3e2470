"""Backbones: one factory from a string spec to a `VisionLanguageBackbone`.

Specs:
  openclip:<arch>/<pretrained-tag-or-local-file>   open_clip models (RN50, ViT-B-16, ...)
  hf:<model-id-or-local-folder>                    Hugging Face CLIPModel
  bridge:lite0-minilm                              offline default stand-in (EfficientNet-Lite0 + MiniLM)
  tiny:clip[:seed]                                 seeded random tiny model for tests
"""
from __future__ import annotations

from .base import VisionLanguageBackbone

KNOWN_SPECS = {
    "bridge:lite0-minilm": "offline default: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, ridge-bridged (stand-in, not CLIP)",
    "tiny:clip": "seeded random tiny dual encoder, for tests",
    "openclip:<arch>/<tag-or-file>": "open_clip model, e.g. openclip:RN50/openai or openclip:ViT-B-16/path/to/weights.bin",
    "hf:<model-id-or-folder>": "Hugging Face CLIPModel, e.g. hf:openai/clip-vit-base-patch16 or hf:/path/to/folder",
}


def load_backbone(spec: str, device: str = "cpu", cache_dir: str | None = None,
                  engine: str | None = None) -> VisionLanguageBackbone:
    """Build the backbone named by ``spec`` and move it to ``device``.

    ``engine``: ``"auto"`` (default; ``$XMODAL_ENGINE`` when set) runs the image towers through an exact
    ONNX Runtime export on CPU where that is faster, PyTorch elsewhere; ``"torch"`` or ``"onnx"`` force one.
    Exports are cached under ``cache_dir/onnx`` (default ``$XMODAL_CACHE`` or ``.xmodal-cache``).
    """
    from ..engines import resolve_engine

    engine = resolve_engine(engine)  # a bad value fails before any weights load
    kind, _, rest = spec.partition(":")
    if kind == "tiny":
        from .tiny import TinyClip

        seed = int(rest.split(":")[1]) if rest.count(":") else 0
        backbone: VisionLanguageBackbone = TinyClip(spec=spec, seed=seed)
    elif kind == "bridge":
        from .bridge import BridgeBackbone

        backbone = BridgeBackbone(spec=spec, variant=rest, cache_dir=cache_dir)
    elif kind == "openclip":
        from .openclip import OpenClipBackbone

        backbone = OpenClipBackbone(spec=spec, target=rest)
    elif kind == "hf":
        from .hf import HFClipBackbone

        backbone = HFClipBackbone(spec=spec, target=rest)
    else:
        from ..errors import UnknownBackboneError

        raise UnknownBackboneError(f"unknown backbone spec {spec!r}. Known forms: " + "; ".join(KNOWN_SPECS))
    return backbone.set_engine(engine, cache_dir).to(device)


__all__ = ["VisionLanguageBackbone", "load_backbone", "KNOWN_SPECS"]
