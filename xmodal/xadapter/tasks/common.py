"""What the two training stages (the text-only head and the adaptation) share: the deterministic batch
order, the corpus digest a resume is checked against, and the safe checkpoint reader."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ...errors import InputError


class EpochPerm:
    """Caches the per-epoch permutations used by ``batch_indices``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._cache = n, seed, {}

    def rows(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
        start = (step * world + rank) * batch_size
        out = []
        for pos in range(start, start + batch_size):
            epoch, offset = divmod(pos, self.n)
            if epoch not in self._cache:
                self._cache = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    self.seed * 1_000_003 + epoch))}
            out.append(int(self._cache[epoch][offset]))
        return out


def corpus_digest(files: list[str | Path]) -> str:
    """SHA-256 over the corpus files' bytes (in order): a resume refuses a corpus whose content changed."""
    h = hashlib.sha256()
    for f in files:
        path = Path(f)
        if path.is_file():
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def load_checkpoint_file(path: Path, keys: set[str]) -> dict:
    """Read a checkpoint without unpickling code: ``torch.load(weights_only=True)`` accepts only
    tensors and plain containers, so a crafted file cannot run anything."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError (truncated)
        raise InputError(f"{path} is not a readable X-adapter training checkpoint ({type(exc).__name__}); "
                         "it was refused without running any code in it",
                         hint=f"delete {path} to start the run afresh, or pass another --out") from None
    if not isinstance(ckpt, dict) or not keys <= set(ckpt):
        raise InputError(f"{path} is not an X-adapter training checkpoint (missing "
                         f"{sorted(keys - set(ckpt) if isinstance(ckpt, dict) else keys)})",
                         hint=f"delete {path} to start the run afresh, or pass another --out")
    return ckpt



__all__ = ["EpochPerm", "corpus_digest", "load_checkpoint_file"]
