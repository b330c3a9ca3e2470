"""``benchmarks/features.py --json`` prints one JSON document with every row (tiny model, tiny data)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "features.py"


def test_features_benchmark_json(tmp_path, tiny_folder):
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", "--backbone", "tiny:clip",
                          "--data", f"imagefolder:{tiny_folder}", "--cache-dir", str(tmp_path / "cache"),
                          "--n", "12", "--large-n", "6", "--fid-n", "8", "--repeat", "1", "--no-vit", "--no-compile"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)  # the whole of stdout is one document
    assert set(doc["tower_img_s"]) == {"torch", "onnx", "bf16", "int8"}
    assert set(doc["cos_min"]) == {"onnx", "bf16", "int8"} and doc["cos_min"]["onnx"] > 0.9999
    want = {"torch_no_workers", "no_workers", "default", "one_worker_process", "no_workers_large_jpeg",
            "default_large_jpeg", "one_worker_process_large_jpeg", "cached_rerun"}
    assert set(doc["e2e_img_s"]) == want
    rates = [*doc["tower_img_s"].values(), *doc["e2e_img_s"].values()]
    assert all(isinstance(r, float) and r > 0 for r in rates)
    for key, ratio in doc["e2e_x_tower"].items():
        engine = "torch" if key.startswith("torch") else doc["engine"]
        assert ratio == pytest.approx(doc["e2e_img_s"][key] / doc["tower_img_s"][engine])
    assert isinstance(doc["load_avg"], float) and "gpu" in doc
