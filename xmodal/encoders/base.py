"""The one protocol every vision-language backbone implements.

Methods, caches and adapters only ever talk to this interface, so swapping CLIP for the offline
stand-in (or any open_clip / Hugging Face model) is one string away.
"""
from __future__ import annotations

import abc
from typing import Callable, Protocol

import torch
from PIL import Image


class TowerRunner(Protocol):
    """How the image towers run when not in eager PyTorch (``xmodal.engines`` provides one): called with the
    backbone, the tower name and pixels, it returns what ``backbone.torch_tower(tower)(pixels)`` would.
    Declared here so a backbone needs no knowledge of any engine, export or cache. The backbone is passed
    on every call (never stored), so a copy of a backbone runs its own modules."""

    requested: str

    def __call__(self, backbone: "VisionLanguageBackbone", tower: str, pixels: torch.Tensor) -> torch.Tensor: ...

    def active(self, backbone: "VisionLanguageBackbone", tower: str) -> str: ...

    def info(self, backbone: "VisionLanguageBackbone", tower: str) -> dict: ...


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

    prefers_onnx: bool = True  # engine "auto" runs this kind through ONNX Runtime on CPU (measured faster)

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.runner: TowerRunner | None = None  # installed by the engine layer; None runs the PyTorch towers

    # ----- image side -------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        """Deterministic eval transform: PIL image -> (3, H, W) float tensor."""

    @abc.abstractmethod
    def augment_preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        """Random train-time transform (random resized crop + flip) with this model's size/normalisation."""

    @abc.abstractmethod
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """PyTorch image tower: (N, 3, H, W) preprocessed pixels -> (N, embed_dim) L2-normalised embeddings."""

    @abc.abstractmethod
    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """PyTorch token tower: (N, 3, H, W) -> (N, T, token_dim) patch/spatial tokens."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed pixels -> (N, embed_dim) L2-normalised embeddings, on the chosen engine."""
        return self._run("image", pixels)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, T, token_dim) patch/spatial tokens (for the X-adapter V-expert)."""
        return self._run("tokens", pixels)

    # ----- the seam engines plug into -----------------------------------------------------
    def torch_tower(self, tower: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The PyTorch function of ``tower`` ("image" or "tokens"), for export and as the reference."""
        return {"image": self._encode_images, "tokens": self._image_tokens}[tower]

    def run_torch(self, tower: str, pixels: torch.Tensor) -> torch.Tensor:
        """``tower`` in eager PyTorch on this backbone's device (what runs when no engine takes over)."""
        pixels = pixels.to(self.device)
        if pixels.ndim == 4:  # channels-last is ~2x faster for conv towers on CPU and GPU
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.torch_tower(tower)(pixels)

    @property
    def engine(self) -> str:
        """The engine asked for (``auto``, ``torch``, ``onnx``); ``torch`` when none was installed."""
        return self.runner.requested if self.runner is not None else "torch"

    def active_engine(self, tower: str = "image") -> str:
        """``"onnx"`` or ``"torch"``: what ``tower`` runs on now (prepares the engine's export if needed)."""
        return self.runner.active(self, tower) if self.runner is not None else "torch"

    def engine_info(self, tower: str = "image") -> dict:
        """What ``tower`` runs on, with the export's probe fidelity when it is ONNX Runtime."""
        if self.runner is not None:
            return self.runner.info(self, tower)
        return {"engine": "torch", "requested": "torch", "device": str(self.device)}

    def _run(self, tower: str, pixels: torch.Tensor) -> torch.Tensor:
        if self.runner is not None:
            return self.runner(self, tower, pixels)
        return self.run_torch(tower, pixels)

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
