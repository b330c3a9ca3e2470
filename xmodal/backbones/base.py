"""The one protocol every vision-language backbone implements.

Methods, caches and adapters only ever talk to this interface, so swapping CLIP for the offline
stand-in (or any open_clip / Hugging Face model) is one string away.
"""
from __future__ import annotations

import abc
import warnings
from pathlib import Path
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

    prefers_onnx: bool = True  # engine "auto" runs this kind through ONNX Runtime on CPU (measured faster)

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.engine = "torch"  # set_engine (load_backbone calls it) picks the engine
        self.engine_cache_dir: Path | None = None
        self._onnx: dict = {}  # tower -> verified ONNX tower, or None once it has fallen back to PyTorch
        self._said: set[str] = set()

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

    # ----- engines ----------------------------------------------------------------------
    def set_engine(self, engine: str | None = None, cache_dir: str | Path | None = None) -> "VisionLanguageBackbone":
        """Choose how the image towers run: ``auto`` (ONNX Runtime on CPU where this kind prefers it, else
        PyTorch), ``torch`` or ``onnx``; ``None`` reads ``$XMODAL_ENGINE``. The ONNX export happens lazily,
        on first use, into ``cache_dir/onnx``."""
        from ..engines import resolve_engine

        self.engine = resolve_engine(engine)
        if cache_dir is not None:
            self.engine_cache_dir = Path(cache_dir)
        self._onnx = {}
        return self

    def torch_tower(self, tower: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The PyTorch function of ``tower`` ("image" or "tokens"), for export and as the reference."""
        return {"image": self._encode_images, "tokens": self._image_tokens}[tower]

    def active_engine(self, tower: str = "image") -> str:
        """``"onnx"`` or ``"torch"``: what ``tower`` runs on now (prepares the ONNX export if needed)."""
        return "onnx" if self._onnx_tower(tower) is not None else "torch"

    def engine_info(self, tower: str = "image") -> dict:
        """What ``tower`` runs on, with the export's probe fidelity when it is ONNX Runtime."""
        onnx = self._onnx_tower(tower)
        if onnx is None:
            return {"engine": "torch", "requested": self.engine, "device": str(self.device)}
        import onnxruntime

        return {"engine": "onnx", "requested": self.engine, "device": "cpu", "onnxruntime": onnxruntime.__version__,
                "export": onnx.path.name, "probe_max_abs_diff": onnx.max_abs_diff,
                "probe_cos_min": onnx.record["probe"]["cos_min"]}

    def _wants_onnx(self) -> bool:
        if self.device.type != "cpu" or self.engine == "torch":
            return False
        return self.engine == "onnx" or self.prefers_onnx

    def _onnx_tower(self, tower: str):
        if not self._wants_onnx():
            if self.engine == "onnx" and self.device.type != "cpu" and "device" not in self._said:
                self._said.add("device")
                warnings.warn(f"engine 'onnx' runs on CPU; {self.spec} is on {self.device}, using PyTorch", stacklevel=4)
            return None
        if tower not in self._onnx:
            from ..engines.onnx import EngineUnavailable, load_or_export

            try:
                self._onnx[tower] = load_or_export(self, tower, self._engine_dir())
            except EngineUnavailable as exc:  # said once per tower; PyTorch serves it from now on
                self._onnx[tower] = None
                warnings.warn(f"ONNX Runtime engine unavailable for the {tower} tower of {self.spec}: {exc}; "
                              "using PyTorch", stacklevel=4)
        return self._onnx[tower]

    def _engine_dir(self) -> Path:
        if self.engine_cache_dir is not None:
            return self.engine_cache_dir
        from ..features import DEFAULT_CACHE_DIR

        return Path(DEFAULT_CACHE_DIR)

    def _run(self, tower: str, pixels: torch.Tensor) -> torch.Tensor:
        onnx = self._onnx_tower(tower)
        if onnx is not None:
            return onnx(pixels)
        pixels = pixels.to(self.device)
        if pixels.ndim == 4:  # channels-last is ~2x faster for conv towers on CPU and GPU
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.torch_tower(tower)(pixels)

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
