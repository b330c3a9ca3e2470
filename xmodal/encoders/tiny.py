"""``tiny:clip`` — a seeded random tiny dual encoder for tests (no weights, no downloads)."""
from __future__ import annotations

import hashlib
import re

import torch
import torch.nn.functional as F
from torch import nn

from .base import VisionLanguageBackbone
from .transforms import augment_transform, eval_transform

_MEAN, _STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _word_id(word: str, vocab: int) -> int:
    return int(hashlib.md5(word.encode()).hexdigest()[:8], 16) % vocab


class TinyClip(VisionLanguageBackbone):
    """Conv image tower (32 px, 4x4 spatial tokens) and hashed bag-of-words text tower, dim 32."""

    is_stand_in = True
    prefers_onnx = False  # too small for ONNX Runtime to pay for its export; engine="onnx" still works
    mean, std = _MEAN, _STD

    def __init__(self, spec: str = "tiny:clip", seed: int = 0, dim: int = 32, image_size: int = 32,
                 vocab: int = 4096) -> None:
        super().__init__()
        self.spec, self.embed_dim, self.token_dim = spec, dim, dim
        self.image_size, self.vocab, self.seed = image_size, vocab, seed
        gen = torch.Generator().manual_seed(seed)
        self.image_net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        ).eval()
        self.word_emb = nn.Embedding(vocab, dim).eval()
        with torch.no_grad():
            for p in list(self.image_net.parameters()) + list(self.word_emb.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self._eval = eval_transform(image_size, _MEAN, _STD)

    @property
    def preprocess(self):
        return self._eval

    def augment_preprocess(self):
        return augment_transform(self.image_size, _MEAN, _STD)

    def modules(self) -> list[nn.Module]:
        return [self.image_net, self.word_emb]

    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.image_net(pixels.to(self.device))  # (N, dim, 4, 4)
        return fmap.flatten(2).transpose(1, 2).float()

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._image_tokens(pixels).mean(1), dim=-1)

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [[_word_id(w, self.vocab) for w in re.findall(r"\w+", t.lower())] or [0] for t in texts]
        width = max(len(i) for i in ids)
        tok = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.bool)
        for row, i in enumerate(ids):
            tok[row, : len(i)] = torch.tensor(i)
            mask[row, : len(i)] = True
        return tok.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok, mask = self._tokenize(texts)
        return self.word_emb(tok).float(), mask

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        states, mask = self.text_tokens(texts)
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(pooled, dim=-1)

    def fingerprint(self) -> str:
        return f"tiny-clip-seed{self.seed}-d{self.embed_dim}-s{self.image_size}"
