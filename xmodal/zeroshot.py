"""Zero-shot text classifier: the prompt-ensemble class embeddings of a backbone."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbones.base import VisionLanguageBackbone


def text_classifier(backbone: VisionLanguageBackbone, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """(C, D): for each class, the L2-normalised mean of its normalised template embeddings (CLIP's recipe)."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every prompt template needs one '{{}}' placeholder, got {templates!r}")
    rows = []
    for name in classnames:
        emb = backbone.encode_texts([t.format(name.replace("_", " ")) for t in templates])
        rows.append(F.normalize(emb.float().mean(0), dim=-1))
    return torch.stack(rows).cpu()
