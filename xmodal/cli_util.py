"""Small pieces every command module shares: the default backbone, device resolution, JSON output."""
from __future__ import annotations

import json
import sys
from typing import Any

import typer

DEFAULT_BACKBONE = "bridge:lite0-minilm"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is passed through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def emit_json(payload: Any, sort_keys: bool = False) -> None:
    """Exactly one JSON document on stdout (progress and notes go to stderr)."""
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=sort_keys, default=str) + "\n")
    sys.stdout.flush()


def fail(exc: Exception, as_json: bool) -> None:
    """Report an input error (as ``{"error", "type"}`` with --json) and exit with status 1."""
    if as_json:
        emit_json({"error": str(exc), "type": type(exc).__name__})
    else:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)
