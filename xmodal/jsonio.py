"""One way to write JSON: strictly valid documents, never ``NaN`` or ``Infinity``.

Python's ``json`` writes ``NaN``/``Infinity`` by default, which no other JSON parser accepts (a single-seed
standard deviation used to come out as ``"std": NaN``). Every JSON xmodal writes — command output, result
rows, sidecar records — goes through ``dumps``: non-finite numbers become ``null``, tensors and numpy values
become plain numbers and lists, and ``allow_nan=False`` guards the rest.
"""
from __future__ import annotations

import json
import math
from pathlib import PurePath
from typing import Any


def plain(value: Any) -> Any:
    """``value`` as plain JSON data: non-finite floats -> None, tensors/numpy -> lists/numbers, tuples/sets -> lists."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [plain(v) for v in sorted(value, key=str)]
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return plain(value.tolist())
    if hasattr(value, "item"):
        return plain(value.item())
    return str(value)


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``plain(value)``; raises rather than ever writing NaN or Infinity."""
    return json.dumps(plain(value), allow_nan=False, **kwargs)
