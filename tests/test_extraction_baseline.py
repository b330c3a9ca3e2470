"""Extraction is pinned: the cache keys (file names under the cache folder) and the features of the seeded
``tiny:clip`` backbone, on the PyTorch and ONNX Runtime engines, equal those recorded in
``tests/data/extraction_baseline.json`` before the extraction path was split into layers — so existing caches
stay valid and restructuring cannot change a number. Regenerate only for a deliberate change:
``python tests/test_extraction_baseline.py > tests/data/extraction_baseline.json``."""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

BASELINE = Path(__file__).parent / "data" / "extraction_baseline.json"


def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode() + t.numpy().tobytes()).hexdigest()


def _dataset():
    from xmodal.data.arrays import ArrayDataset

    rng = np.random.default_rng(0)
    arrays = {split: (rng.integers(0, 256, size=(n, 40, 40, 3), dtype=np.uint8), np.arange(n) % 2)
              for split, n in (("train", 6), ("test", 4))}
    return ArrayDataset("probe", ["a", "b"], ["a photo of a {}."], arrays)


def probe() -> dict:
    """Keys and feature digests of one extraction per engine (eval, one augmented view, tokens)."""
    from xmodal.backbones import load_backbone
    from xmodal.features import extract_features, extract_tokens

    out: dict = {}
    ds = _dataset()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for engine in ("torch", "onnx"):
            cache = Path(tmp) / engine
            bb = load_backbone("tiny:clip", cache_dir=str(cache), engine=engine)
            fs = extract_features(bb, ds, "test", cache_dir=cache, augment_views=1, progress=False)
            ids, tokens = extract_tokens(bb, ds, "test", cache_dir=cache, progress=False)
            out[engine] = {
                "features": _digest(fs.features), "views": _digest(fs.views), "tokens": _digest(tokens),
                "ids": ids, "engine": fs.meta["engine"],
                "cache_files": sorted(p.name for p in (cache / "features").glob("*.json")),
                "exports": sorted(p.name for p in (cache / "onnx").glob("*.json")),
            }
    return out


def test_keys_and_features_match_the_recorded_baseline(one_thread):
    want = json.loads(BASELINE.read_text())
    got = probe()
    for engine in want:
        assert got[engine]["cache_files"] == want[engine]["cache_files"], f"{engine}: cache keys changed"
        assert got[engine]["exports"] == want[engine]["exports"], f"{engine}: ONNX export keys changed"
        assert got[engine] == want[engine], f"{engine}: features changed"


if __name__ == "__main__":
    torch.set_num_threads(1)
    json.dump(probe(), sys.stdout, indent=1)
    print()
