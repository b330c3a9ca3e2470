"""The engine a backbone's image towers run on: choice, lazy ONNX export, verification and fallback.

A backbone only knows that something may run its towers (``TowerRunner``); this is that something. The
exact engines give the same fp32 features, so which one serves a tower is never part of a cache key.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..cache import DEFAULT_CACHE_DIR

if TYPE_CHECKING:
    from ..encoders.base import VisionLanguageBackbone
    from .onnx import OnnxTower


class EngineRunner:
    """Runs a backbone's towers on the ``requested`` engine (``auto``, ``torch`` or ``onnx``, already
    validated). ONNX towers are exported on first use into ``cache_dir/onnx``; a tower whose export is
    unavailable falls back to PyTorch, said once. The backbone comes with every call, as the seam says."""

    def __init__(self, requested: str, cache_dir: str | Path | None = None) -> None:
        self.requested = requested
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._onnx: dict[str, "OnnxTower | None"] = {}  # tower -> verified ONNX tower, None once fallen back
        self._said: set[str] = set()

    def __call__(self, backbone: "VisionLanguageBackbone", tower: str, pixels: torch.Tensor) -> torch.Tensor:
        onnx = self._onnx_tower(backbone, tower)
        if onnx is not None:
            return onnx(pixels)
        return backbone.run_torch(tower, pixels)

    def active(self, backbone: "VisionLanguageBackbone", tower: str) -> str:
        return "onnx" if self._onnx_tower(backbone, tower) is not None else "torch"

    def info(self, backbone: "VisionLanguageBackbone", tower: str) -> dict:
        onnx = self._onnx_tower(backbone, tower)
        if onnx is None:
            return {"engine": "torch", "requested": self.requested, "device": str(backbone.device)}
        import onnxruntime

        return {"engine": "onnx", "requested": self.requested, "device": "cpu",
                "onnxruntime": onnxruntime.__version__, "export": onnx.path.name,
                "probe_max_abs_diff": onnx.max_abs_diff, "probe_cos_min": onnx.record["probe"]["cos_min"]}

    def folder(self) -> Path:
        """Where exports live: the folder given, else ``$XMODAL_CACHE`` or ``.xmodal-cache``."""
        return self.cache_dir if self.cache_dir is not None else Path(DEFAULT_CACHE_DIR)

    def _wants_onnx(self, backbone: "VisionLanguageBackbone") -> bool:
        if backbone.device.type != "cpu" or self.requested == "torch":
            return False
        return self.requested == "onnx" or backbone.prefers_onnx

    def _onnx_tower(self, bb: "VisionLanguageBackbone", tower: str) -> "OnnxTower | None":
        if not self._wants_onnx(bb):
            if self.requested == "onnx" and bb.device.type != "cpu" and "device" not in self._said:
                self._said.add("device")
                warnings.warn(f"engine 'onnx' runs on CPU; {bb.spec} is on {bb.device}, using PyTorch", stacklevel=5)
            return None
        if tower not in self._onnx:
            from .onnx import EngineUnavailable, load_or_export

            try:
                self._onnx[tower] = load_or_export(bb, tower, self.folder())
            except EngineUnavailable as exc:  # said once per tower; PyTorch serves it from now on
                self._onnx[tower] = None
                warnings.warn(f"ONNX Runtime engine unavailable for the {tower} tower of {bb.spec}: {exc}; "
                              "using PyTorch", stacklevel=5)
        return self._onnx[tower]
