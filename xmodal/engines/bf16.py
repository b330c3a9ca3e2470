"""Opt-in bf16 on CPU: autocast plus ``torch.compile`` (inductor), about 2x the eager fp32 tower.

It changes the numbers (cosine ~0.998 against fp32 for the offline default), so features extracted this
way carry their own cache key and the fidelity measured on the first batch is recorded with them.
Without a working compiler the tower runs eager under autocast (said once); ``XMODAL_COMPILE=0`` skips
compiling (first-call compile takes minutes on a small CPU machine).
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from ..encoders.base import VisionLanguageBackbone


class Bf16Tower:
    """``tower(pixels)`` in bf16 autocast on CPU, compiled on first call (eager if compiling fails)."""

    def __init__(self, backbone: "VisionLanguageBackbone", tower: str, compile: bool = True) -> None:
        self.backbone, self.tower, self.compile = backbone, tower, compile
        self._fn: Callable | None = None
        self.compiled = False

    def describe(self) -> str:
        return "torch-bf16-compiled" if self.compile else "torch-bf16"

    def _eager(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.backbone.torch_tower(self.tower)(pixels)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.backbone.device).contiguous(memory_format=torch.channels_last)
        if self._fn is None:
            self._fn = self._eager
            if self.compile:
                compiled = torch.compile(self._eager, dynamic=False)
                try:
                    with torch.no_grad():
                        out = compiled(pixels).float()
                    self._fn, self.compiled = compiled, True
                    return out
                except Exception as exc:  # no C++ compiler, unsupported op ...: eager autocast still works
                    warnings.warn(f"torch.compile failed for the bf16 {self.tower} tower of {self.backbone.spec} "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); running eager bf16",
                                  stacklevel=2)
        with torch.no_grad():
            return self._fn(pixels).float()


def bf16_tower(backbone: "VisionLanguageBackbone", tower: str, compile: bool | None = None) -> Bf16Tower:
    """``compile=None`` compiles unless ``$XMODAL_COMPILE`` is 0/false/no."""
    if compile is None:
        compile = os.environ.get("XMODAL_COMPILE", "1").strip().lower() not in {"0", "false", "no", "off"}
    return Bf16Tower(backbone, tower, compile)
