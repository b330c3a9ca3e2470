"""HTTP service over a saved few-shot classifier: FastAPI app, micro-batcher, upload limits, web page.

``create_app(classifier, ServeSettings(...))`` builds the app; ``xmodal serve DIR`` runs it on uvicorn.
FastAPI is imported only when the app is built, so registering the command costs nothing.
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_app", "ServeSettings"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ..extras import require_extra

        require_extra("serve", f"xmodal.serve.{name}")
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
