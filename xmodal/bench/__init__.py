"""Experiment harness: few-shot episodes, resumable sweeps, result store, tables and plots.

Names are imported on first use, so the ``xmodal`` command can register ``fewshot``/``bench`` (and print
their ``--help``) without importing torch, matplotlib or tqdm.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "AUGMENT_SCOPES": ".run", "ROW_FIELDS": ".run", "FeatureBank": ".run", "ProtocolError": ".run",
    "UnknownMethodError": ".run", "resolve_methods": ".run", "run_episode": ".run",
    "ResultStore": ".store", "read_rows": ".store", "row_key": ".store",
    "markdown_table": ".table", "summarize": ".table",
    "run_sweep": ".sweep", "plot_accuracy_vs_shots": ".plot",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'xmodal.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
