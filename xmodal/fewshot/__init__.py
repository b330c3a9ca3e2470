"""Few-shot adaptation methods on cached CLIP-space features (one file per method)."""
from .base import FewShotMethod, available_methods, create_method, register

__all__ = ["FewShotMethod", "available_methods", "create_method", "register"]
