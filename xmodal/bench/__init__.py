"""Experiment harness: few-shot episodes, resumable sweeps, result store, tables and plots."""
from .run import AUGMENT_SCOPES, ROW_FIELDS, FeatureBank, ProtocolError, UnknownMethodError, resolve_methods, run_episode
from .store import ResultStore, read_rows, row_key
from .table import markdown_table, summarize

__all__ = ["AUGMENT_SCOPES", "ROW_FIELDS", "FeatureBank", "ProtocolError", "ResultStore", "UnknownMethodError", "markdown_table",
           "read_rows", "resolve_methods", "row_key", "run_episode", "run_sweep", "summarize",
           "plot_accuracy_vs_shots"]


def __getattr__(name):  # sweep/plot import matplotlib & tqdm lazily
    if name == "run_sweep":
        from .sweep import run_sweep

        return run_sweep
    if name == "plot_accuracy_vs_shots":
        from .plot import plot_accuracy_vs_shots

        return plot_accuracy_vs_shots
    raise AttributeError(name)
