"""The one protocol every vision-language backbone implements.

Methods, caches and adapters only ever talk to this interface, so swapping CLIP for the offline
stand-in (or any open_clip / Hugging Face model) is one string away.
"""
from __future__ import annotations

import abc
from typing import Callable

import torch
from PIL import Image


class VisionLanguageBackbone(abc.ABC):
    """A frozen dual encoder: images and texts embedded, L2-normalised, in one space.

    Attributes set by every implementation:
      spec        the string it was built from (``"bridge:lite0-minilm"``)
      embed_dim   width of ``encode_images`` / ``encode_texts`` outputs
      token_dim   width of ``image_tokens`` / ``text_tokens`` outputs
      logit_scale temperature to turn cosine similarities into logits (CLIP: 100)
      is_stand_in True when this is not a real CLIP (printed next to every result)
      image_size, mean, std   input side and normalisation (used by the tensor/GPU decode path)
    """

    spec: str
    embed_dim: int
    token_dim: int
    logit_scale: float = 100.0
    is_stand_in: bool = False
    image_size: int = 224
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # ----- image side -------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        """Deterministic eval transform: PIL image -> (3, H, W) float tensor."""

    @abc.abstractmethod
    def augment_preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        """Random train-time transform (random resized crop + flip) with this model's size/normalisation."""

    @abc.abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed pixels -> (N, embed_dim) L2-normalised embeddings."""

    @abc.abstractmethod
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, T, token_dim) patch/spatial tokens (for the X-adapter V-expert)."""

    # ----- text side --------------------------------------------------------------------
    @abc.abstractmethod
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """List of strings -> (N, embed_dim) L2-normalised embeddings in the image space."""

    @abc.abstractmethod
    def text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token text states (N, T, token_dim) and a bool mask (N, T), True = real token."""

    # ----- identity ---------------------------------------------------------------------
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Stable hash of the weights and preprocessing; part of every feature-cache key."""

    @property
    def name(self) -> str:
        return self.spec + (" (offline stand-in, not CLIP)" if self.is_stand_in else "")

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "VisionLanguageBackbone":
        """Move the towers; ``dtype`` (bf16/fp16) applies to the image tower on GPU."""
        self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for module in self.modules():
            module.to(self.device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules owned by this backbone (moved by ``to``)."""
        return []
