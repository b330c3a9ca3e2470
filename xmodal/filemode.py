"""Permissions of the files xmodal writes: the same as any file the user creates (the process umask).

``tempfile.mkstemp`` / ``mkdtemp`` and safetensors create owner-only files (0600, folders 0700); a file
renamed into place keeps that mode, so a classifier saved by one user could not be served by another.
Every atomic write therefore gives its temporary file the mode a plain ``open(path, "w")`` would have.
"""
from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no read-only call elsewhere: set and restore at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new regular file under the current umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new folder under the current umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def apply_umask(path: str | Path) -> None:
    """Give ``path`` the mode a newly created file or folder would have; recurses into folders."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, dir_mode())
        for child in path.iterdir():
            apply_umask(child)
    elif path.is_file() and not path.is_symlink():
        os.chmod(path, file_mode())
