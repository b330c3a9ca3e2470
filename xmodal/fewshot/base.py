"""The protocol every few-shot method follows, and the registry that names them.

Methods work on cached features only (`FeatureSet`), scikit-learn style: parameters in
``__init__`` (no work there), ``fit`` on support + validation, ``predict`` / ``decision_scores`` on
bare feature tensors. Test labels never reach a method: ``predict`` takes features only.
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
