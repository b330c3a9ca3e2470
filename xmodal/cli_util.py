"""Small pieces every command module shares: the default backbone, device resolution, JSON output."""
from __future__ import annotations

import sys
from typing import Any

from .errors import ResourceError, UsageError
from .jsonio import dumps

DEFAULT_BACKBONE = "bridge:lite0-minilm"
DEFAULT_CACHE_DIR = ".xmodal-cache"
CACHE_ENV = "XMODAL_CACHE"  # the same variable the API (xmodal.features) reads


def cache_dir_option():
    """``--cache-dir``, defaulting to ``$XMODAL_CACHE`` when set, as in the Python API."""
    import typer

    return typer.Option(DEFAULT_CACHE_DIR, "--cache-dir", envvar=CACHE_ENV,
                        help=f"Feature cache folder (env {CACHE_ENV}).")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a named device is checked before any work."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r}", hint="use --device auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ResourceError(f"--device {device}: no CUDA GPU is visible on this machine",
                                hint="use --device cpu (or --device auto)")
        if dev.index is not None and dev.index >= count:
            raise ResourceError(f"--device {device}: only {count} CUDA GPU(s) are visible",
                                hint=f"use --device cuda:0 … cuda:{count - 1}")
    elif dev.type not in {"cpu", "cuda"}:
        raise UsageError(f"device type {dev.type!r} is not supported", hint="use --device auto, cpu or cuda[:N]")
    return device


def emit_json(payload: Any, sort_keys: bool = False) -> None:
    """Exactly one JSON document on stdout (progress and notes go to stderr); NaN/Infinity become null."""
    sys.stdout.write(dumps(payload, indent=2, sort_keys=sort_keys) + "\n")
    sys.stdout.flush()

