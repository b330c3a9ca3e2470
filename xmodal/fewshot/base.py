"""The protocol every few-shot method follows, and the registry that names them.

Methods work on cached features (`FeatureSet`), scikit-learn style: parameters in ``__init__`` (no work
there), ``fit`` on support + validation, ``predict`` / ``decision_scores`` on bare feature tensors. Test
labels never reach a method: ``predict`` takes features only.

Tower methods (``needs_backbone = True``: CoOp, CoCoOp, CLIP-LoRA) train inside a tower of the backbone.
They keep the same ``fit(support, val, text_classifier)`` contract and validation-only selection; the
harness hands them the backbone first (``bind_backbone``, also after loading a saved one). Methods that
adapt the image tower (``needs_images = True``) also get ``pixels``: a function from sample ids to
preprocessed image tensors, and score images with ``image_scores`` instead of ``decision_scores``.
"""
from __future__ import annotations

import abc
from typing import Any, Callable

import torch

from ..featureset import FeatureSet


class FewShotMethod(abc.ABC):
    """Base class. Subclasses set ``name`` and ``training_free``.

    After ``fit``, ``selected_`` holds every hyper-parameter chosen on validation (and fixed ones),
    as plain JSON-serialisable values; the harness stores it with each result row.
    """

    name: str = ""
    training_free: bool = True
    needs_backbone: bool = False  # tower method: bind_backbone(backbone) before fit and after load
    needs_images: bool = False    # image-tower method: scored on pixels (image_scores), not cached features
    # progress of a trained method: called with (epochs done, total) after each epoch; set by the caller
    on_epoch: Callable[[int, int], None] | None = None

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0) -> None:
        self.seed = seed
        self.device = device
        self.logit_scale = logit_scale
        self.selected_: dict[str, Any] = {}

    @abc.abstractmethod
    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "FewShotMethod":
        """Fit on the K-shot support set; choose hyper-parameters on ``val`` only.

        text_classifier: (C, D) L2-normalised class text embeddings (prompt ensemble).
        """

    @abc.abstractmethod
    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N, C) class scores (logits)."""

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.decision_scores(features).argmax(dim=1)

    def bind_backbone(self, backbone: Any, pixels: Callable[..., torch.Tensor] | None = None) -> "FewShotMethod":
        """Give a tower method the backbone it trains in (not saved with the method: only what it learns is).
        ``pixels(ids, augment=False)``: preprocessed images of the episode's samples, for image-tower methods."""
        self._backbone, self._pixels = backbone, pixels
        return self

    def image_scores(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed images -> (N, C) scores; feature methods score the backbone's features."""
        backbone = getattr(self, "_backbone", None)
        if backbone is None:
            raise RuntimeError(f"{type(self).__name__}.image_scores needs bind_backbone(backbone) first")
        return self.decision_scores(backbone.encode_images(pixels).float())

    # ----- save / load contract (see state.py): tensors for safetensors + a JSON-able dict, no pickle -----

    def get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta) of the fitted method: constructor parameters and every attribute ending in ``_``.
        Override (calling super) only if a method keeps fitted state elsewhere."""
        from .state import get_state

        return get_state(self)

    def set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "FewShotMethod":
        """Restore what ``get_state`` returned onto this (constructed, unfitted) method."""
        from .state import set_state

        set_state(self, tensors, meta)
        return self

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: str = "cpu") -> "FewShotMethod":
        """Rebuild a fitted method from ``get_state``'s output (the registered class named in ``meta``)."""
        from ..errors import InputError
        from .state import decode_params

        name = meta.get("method") if isinstance(meta, dict) else None
        available_methods()
        klass = _REGISTRY.get(name) if name else None
        if klass is None:
            raise InputError(f"saved few-shot method {name!r} is not registered in this xmodal",
                             hint=f"available: {', '.join(_REGISTRY)}; load it with the xmodal version that saved it")
        if cls is not FewShotMethod and not issubclass(klass, cls):
            raise InputError(f"saved state is of method {name!r}, not {cls.__name__}")
        try:
            method = klass(**decode_params(tensors, meta), device=device)
        except (TypeError, ValueError) as exc:
            raise InputError(f"saved parameters of method {name!r} are not accepted by this xmodal: {exc}",
                             hint="load it with the xmodal version that saved it, or fit and save it again") from None
        return method.set_state(tensors, meta)


_REGISTRY: dict[str, Callable[..., FewShotMethod]] = {}


def register(name: str) -> Callable[[type[FewShotMethod]], type[FewShotMethod]]:
    """Class decorator: make a method constructible by name (CLI, harness)."""

    def wrap(cls: type[FewShotMethod]) -> type[FewShotMethod]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    from . import _load_all  # noqa: F401  (imports every method module so they register)

    return list(_REGISTRY)


def create_method(name: str, **params: Any) -> FewShotMethod:
    available_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown few-shot method {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](**params)
