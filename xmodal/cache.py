"""Atomic, key-addressed files: what makes caches and result files safe to kill at any moment."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .filemode import apply_umask

# where feature caches, engine exports and the offline bridge's fitted map live unless a caller says otherwise
DEFAULT_CACHE_DIR = os.environ.get("XMODAL_CACHE", ".xmodal-cache")


def stable_hash(obj: Any, length: int = 20) -> str:
    """SHA-256 of a canonical JSON encoding (sorted keys), truncated."""
    data = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:length]


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed over ``target`` in one step.

    A crash or exception leaves ``target`` as it was (never half-written) and removes the temp file. The file
    gets the user's umask mode (mkstemp and safetensors create it owner-only).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
