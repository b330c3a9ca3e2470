"""The package version, in the lowest layer so any module can stamp it without importing the package root."""
from __future__ import annotations

__version__ = "0.1.0"
