"""Exceptions with messages that name the problem and the fix."""


class XmodalError(Exception):
    """Base class: every error xmodal raises on bad input is one of these."""


class BackboneUnavailableError(XmodalError):
    """Weights for a backbone spec are missing locally and cannot be downloaded."""


class DatasetError(XmodalError):
    """A dataset spec, folder or file is missing or malformed."""


class CorruptImageError(DatasetError):
    """An image file cannot be decoded."""


class CacheMismatchError(XmodalError):
    """A cached artefact was produced by a different backbone, dataset or configuration."""


class ShapeError(XmodalError):
    """Arrays passed to a method have inconsistent shapes."""
