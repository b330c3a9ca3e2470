"""The images corpus rows are paired with, embedded once per run.

A caption–image corpus (COCO style: ``{"text": ..., "image": ...}``) gives the V-expert the picture the
text describes instead of (or besides) images retrieved for it. The images do not change during
training, so each is embedded once: taken from the retrieval bank when the bank holds that very file
(same backbone, already verified), otherwise run through the backbone's image tower here.

Controls, as for retrieval: ``shuffled`` feeds, for each image, an image of *another class* (its
parent folder; classes moved along one fixed random cycle), ``zero`` feeds all-zero features.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from ...errors import CorruptImageError, XmodalError
from .context import shuffle_map


def _bank_rows_by_path(bank) -> dict[str, int]:
    """Real path of each bank image -> its row, for banks built from an ``imagefolder:ROOT`` dataset."""
    if bank is None:
        return {}
    spec = str((getattr(bank, "meta", {}) or {}).get("dataset") or "")
    if not spec.startswith("imagefolder:"):
        return {}
    root = Path(spec.split(":", 1)[1])
    return {os.path.realpath(root / sid): r for r, sid in enumerate(bank.ids)}


def _open_rgb(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise CorruptImageError(f"paired image {path} cannot be decoded ({type(exc).__name__})",
                                hint="replace the file or remove its corpus row") from None


class PairedImages:
    """Embeddings of a corpus's paired images; ``features`` assembles a batch's visual context."""

    def __init__(self, paths: Sequence[str], features: torch.Tensor, shuffle_seed: int = 0) -> None:
        self.paths = list(paths)
        self.row = {p: i for i, p in enumerate(self.paths)}
        self.feats = features.float()
        self.shuffle_seed = shuffle_seed
        self._shuffle: torch.Tensor | None = None
        self.from_bank = 0

    @classmethod
    def embed(cls, paths: Sequence[str], backbone, bank=None, batch_size: int = 64,
              progress: Callable[[int, int], None] | None = None, shuffle_seed: int = 0) -> "PairedImages":
        unique = sorted(set(paths))
        by_path = _bank_rows_by_path(bank)
        feats = torch.zeros(len(unique), int(backbone.embed_dim))
        todo = []
        for i, p in enumerate(unique):
            r = by_path.get(os.path.realpath(p))
            if r is None:
                todo.append(i)
            else:
                feats[i] = bank.embeddings(torch.tensor([r]))[0].float()
        prep = backbone.preprocess
        with torch.inference_mode():
            for s in range(0, len(todo), batch_size):
                chunk = todo[s: s + batch_size]
                pixels = torch.stack([prep(_open_rgb(unique[i])) for i in chunk])
                feats[torch.tensor(chunk)] = backbone.encode_images(pixels).float().cpu()
                if progress is not None:
                    progress(min(s + batch_size, len(todo)), len(todo))
        out = cls(unique, feats.clone(), shuffle_seed)
        out.from_bank = len(unique) - len(todo)
        return out

    def classes(self) -> list[str]:
        return [Path(p).parent.name for p in self.paths]

    def _fed_rows(self, rows: torch.Tensor, visual: str) -> torch.Tensor:
        if visual != "shuffled":
            return rows
        if self._shuffle is None:
            classes = self.classes()
            if len(set(classes)) < 2:
                raise XmodalError("the shuffled control needs paired images from at least two classes "
                                  "(class = the image's folder)")
            self._shuffle = shuffle_map(classes, self.shuffle_seed)
        return self._shuffle[rows]

    def features(self, images: Sequence[Sequence[str]], visual: str = "real") -> tuple[torch.Tensor, torch.Tensor]:
        """Per example its paired images -> (B, m, D) features and (B, m) mask (m = most images of one example)."""
        width = max([len(x) for x in images] + [1])
        out = torch.zeros(len(images), width, self.feats.shape[1])
        mask = torch.zeros(len(images), width, dtype=torch.bool)
        for b, paths in enumerate(images):
            if not paths:
                continue
            rows = self._fed_rows(torch.tensor([self.row[p] for p in paths]), visual)
            if visual != "zero":
                out[b, : len(paths)] = self.feats[rows]
            mask[b, : len(paths)] = True
        return out, mask


__all__ = ["PairedImages"]
