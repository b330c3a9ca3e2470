"""What a result row must hold before it is reused or shown: types and ranges, not only a parsable line.

A row whose ``top1`` is an absurd number, a string or NaN would otherwise be averaged into the table and
skip a recomputation. ``row_problem`` names the first field that is wrong; the store leaves such a row in
the file, warns with the file and line, and the sweep computes that cell again.
"""
from __future__ import annotations

import math
from typing import Any

_TEXT = ("method", "backbone", "dataset")
_COUNTS = ("shots", "n_correct", "n_test", "n_support", "n_val", "num_classes")
_SECONDS = ("fit_time_s", "predict_time_s", "wall_time_s", "features_time_s")
_PERCENT = ("top1",)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def row_problem(row: Any) -> str | None:
    """None for a well-formed row, else what is wrong with it (one short phrase)."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, found {type(row).__name__}"
    for name in _TEXT:
        if not isinstance(row.get(name), str) or not row[name]:
            return f"{name!r} must be a non-empty string, found {row.get(name)!r}"
    for name in _COUNTS:
        if name in row and row[name] is not None and not (_is_int(row[name]) and row[name] >= 0):
            return f"{name!r} must be a whole number >= 0, found {row[name]!r}"
    for name in ("shots", "seed"):
        if not _is_int(row.get(name)):
            return f"{name!r} must be a whole number, found {row.get(name)!r}"
    for name in _PERCENT:
        if name not in row:
            return f"{name!r} is missing"
        v = row[name]
        if not _is_number(v) or not 0.0 <= v <= 100.0:
            return f"{name!r} must be a finite percentage in [0, 100], found {v!r}"
    for name in _SECONDS:
        if name in row and row[name] is not None and not (_is_number(row[name]) and row[name] >= 0):
            return f"{name!r} must be a finite number of seconds >= 0, found {row[name]!r}"
    n_correct, n_test = row.get("n_correct"), row.get("n_test")
    if _is_int(n_correct) and _is_int(n_test) and n_test > 0:
        if n_correct > n_test:
            return f"'n_correct' {n_correct} exceeds 'n_test' {n_test}"
        if abs(100.0 * n_correct / n_test - row["top1"]) > 1e-6:
            return f"'top1' {row['top1']!r} is not 100 * n_correct / n_test = {100.0 * n_correct / n_test:.6g}"
    return None
