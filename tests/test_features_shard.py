"""Sharded extraction with 2 CPU processes (gloo): the merged entry is the one a single process writes,
byte for byte; a killed rank leaves no entry and no partial file, and the rerun reuses finished shards."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xmodal.backbones import load_backbone
from xmodal.data import load_dataset
from xmodal.features import extract_features, extract_tokens
from xmodal.shards import Shard

WORKER = r'''
import json, os, sys
import torch
torch.set_num_threads(1)
from xmodal.backbones import load_backbone
from xmodal.data import load_dataset
from xmodal.features import extract_features, extract_tokens

root, cache, mode = sys.argv[1:4]
rank = int(os.environ["RANK"])
bb = load_backbone("tiny:clip", cache_dir=cache)
calls = []
original = bb.encode_images

def spy(pixels):
    calls.append(int(pixels.shape[0]))
    if mode == "die" and rank == 1:
        os._exit(3)  # killed mid-extraction, before its shard is written
    return original(pixels)

bb.encode_images = spy
ds = load_dataset(f"imagefolder:{root}")
fs = extract_features(bb, ds, "test", cache_dir=cache, batch_size=5, progress=False, num_workers=0,
                      augment_views=1 if mode == "views" else 0)
out = {"rank": rank, "calls": calls, "ids": fs.ids}
if mode == "views":
    ids, tokens = extract_tokens(bb, ds, "test", cache_dir=cache, batch_size=5, progress=False, num_workers=0)
    out["tokens"] = list(tokens.shape)
print("RESULT " + json.dumps(out))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, root: Path, cache: Path, mode: str, engine: str = "auto") -> list[tuple[int, dict | None, str]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "XMODAL_ENGINE": engine, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(root), str(cache), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).resolve().parents[1]))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        results.append((p.returncode, json.loads(lines[0][7:]) if lines else None, err))
    return results


def _entries(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (cache / "features").glob("*") if p.is_file()}


def test_batch_ranges_cover_every_batch_once():
    for n, bs, world in [(12, 5, 2), (1, 64, 3), (130, 64, 2), (640, 64, 4), (5, 1, 7)]:
        ranges = [Shard(r, world).batch_range(n, bs) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % bs == 0 for lo, _ in ranges)  # every rank starts on a batch boundary


@pytest.fixture
def single(tiny_folder, tmp_path, one_thread):
    """What one process writes (same batch size, one thread like each rank)."""
    cache = tmp_path / "single"
    bb, ds = load_backbone("tiny:clip"), load_dataset(f"imagefolder:{tiny_folder}")
    extract_features(bb, ds, "test", cache_dir=cache, batch_size=5, progress=False, augment_views=1, shard=False)
    extract_tokens(bb, ds, "test", cache_dir=cache, batch_size=5, progress=False, shard=False)
    return _entries(cache)


def test_killed_rank_then_rerun_writes_what_one_process_writes(tiny_folder, tmp_path, single):
    """Rank 1 dies mid-extraction: no entry, no partial file, rank 0's finished shard kept. The rerun reuses
    that shard and the merged entries (eval features, an augmented view, tokens) equal one process's bytes."""
    cache = tmp_path / "sharded"
    (c0, r0, err0), (c1, r1, _) = _launch(tmp_path, tiny_folder, cache, "die")
    assert c1 == 3 and c0 != 0 and r0 is None
    assert "ResourceError" in err0 and "another rank of this 2-process extraction failed" in err0
    assert _entries(cache) == {}  # no merged entry, no temp file
    shards = sorted(p.name for p in (cache / "features" / "shards").rglob("*"))
    assert [s for s in shards if s.endswith(".safetensors")] == ["rank0-of2-b5.safetensors"]
    assert not [s for s in shards if s.endswith(".tmp")]

    results = _launch(tmp_path, tiny_folder, cache, "views")
    for code, res, err in results:
        assert code == 0, err[-2000:]
    (_, r0, _), (_, r1, _) = results
    # rank 0: its eval shard is reused, only its view batch runs; rank 1: 2 of 3 batches for eval and view
    assert r0["calls"] == [5] and r1["calls"] == [5, 2, 5, 2]
    assert r0["ids"] == r1["ids"] and len(r0["ids"]) == 12 and r0["tokens"] == [12, 16, 32]
    merged = _entries(cache)
    assert set(merged) == set(single) and len(merged) == 6  # eval, view, tokens: tensors + record each
    for name, data in single.items():
        assert merged[name] == data, f"{name} differs from the single-process entry"
    assert not any(p.is_file() for p in (cache / "features" / "shards").rglob("*"))  # merged shards removed
