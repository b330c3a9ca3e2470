"""Saved few-shot classifiers: fit once on your images, then classify from Python, the shell or HTTP."""
from .artefact import CONFIG_FILE, FORMAT_VERSION, TENSORS_FILE
from .model import DEFAULT_BACKBONE, FewShotClassifier, Prediction

__all__ = ["FewShotClassifier", "Prediction", "FORMAT_VERSION", "CONFIG_FILE", "TENSORS_FILE", "DEFAULT_BACKBONE"]
