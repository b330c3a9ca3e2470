"""Optional dependencies, grouped into pip extras, and the one error raised when one is missing.

Why: ``pip install xmodal`` stays small for users who only fit and predict; a command that needs an extra
(``xmodal serve`` needs ``xmodal[serve]``) says which extra to install instead of ending in a traceback.
The extras themselves are declared in ``pyproject.toml``; ``tests/test_extras.py`` checks that every
module named here belongs to the extra it is mapped to there.
"""
from __future__ import annotations

import importlib
from typing import Sequence

from .errors import ResourceError

# extra -> the top-level modules it provides; a tuple lists alternative names of one distribution
# (python-multipart is imported as ``python_multipart``, older releases as ``multipart``)
EXTRA_MODULES: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "serve": ("fastapi", "starlette", "pydantic", "uvicorn", ("python_multipart", "multipart")),
    "xadapter": ("accelerate", "faiss"),
    "test": ("pytest", "httpx", "selenium"),
}


class MissingExtraError(ResourceError):
    """An optional dependency is not installed; the hint names the pip extra that brings it."""

    def __init__(self, module: str, extra: str, feature: str | None = None) -> None:
        what = feature or "this feature"
        super().__init__(f"{what} needs the optional dependency {module!r}, which is not installed",
                         hint=f"install xmodal[{extra}]: pip install 'xmodal[{extra}]'")
        self.module = module
        self.extra = extra


def extra_of(module: str) -> str | None:
    """The extra that provides ``module`` (a dotted name is looked up by its top-level package), else None."""
    top = module.split(".")[0]
    for extra, modules in EXTRA_MODULES.items():
        for entry in modules:
            if top == entry or (isinstance(entry, tuple) and top in entry):
                return extra
    return None


def from_import_error(exc: ImportError, feature: str | None = None) -> MissingExtraError | None:
    """The ``MissingExtraError`` for an ImportError of an optional module, or None for any other import error."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name:
        return None
    extra = extra_of(name)
    return MissingExtraError(name.split(".")[0], extra, feature) if extra else None


def require_extra(extra: str, feature: str, modules: Sequence[str | tuple[str, ...]] | None = None) -> None:
    """Import every module of ``extra`` (or just ``modules``); raise ``MissingExtraError`` naming the extra."""
    for entry in modules if modules is not None else EXTRA_MODULES[extra]:
        names = entry if isinstance(entry, tuple) else (entry,)
        for name in names:
            try:
                importlib.import_module(name)
                break
            except ImportError:
                continue
        else:
            raise MissingExtraError(names[0], extra, feature)
