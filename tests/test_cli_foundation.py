"""The foundation commands of the ``xmodal`` CLI: backbones, datasets, features, zeroshot (tiny:clip only)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xmodal.cli import app
from xmodal.data import COOP_DATASETS, DATASET_SPECS

runner = CliRunner()


def _json(result) -> dict:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)  # exactly one JSON document on stdout


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_backbones_json():
    doc = _json(runner.invoke(app, ["backbones", "--json"]))
    assert "tiny:clip" in doc and all(isinstance(v, str) for v in doc.values())
    text = runner.invoke(app, ["backbones"])
    assert text.exit_code == 0 and "tiny:clip" in text.stdout


def test_datasets_json():
    doc = _json(runner.invoke(app, ["datasets", "--json"]))
    assert set(doc["specs"]) == set(DATASET_SPECS)
    assert set(doc["coop"]) == set(COOP_DATASETS)
    assert doc["coop"]["DTD"]["templates"] == ["{} texture."]
    assert doc["coop"]["DTD"]["split_file"] == "split_zhou_DescribableTextures.json"
    text = runner.invoke(app, ["datasets"])
    assert text.exit_code == 0 and "coop:NAME@ROOT" in text.stdout and "DTD" in text.stdout


def test_features_twice_second_run_reads_cache(tiny_folder, tmp_path):
    cache = tmp_path / "cache"
    args = ["features", "--backbone", "tiny:clip", "--data", f"imagefolder:{tiny_folder}", "--split", "test",
            "--cache-dir", str(cache), "--device", "cpu", "--json"]
    first = _json(runner.invoke(app, args))
    assert first["n"] == 12 and first["dim"] == 32 and first["split"] == "test"
    assert first["backbone"] and first["fingerprint"] and first["dataset"] == f"imagefolder:{tiny_folder}"
    assert first["cache_dir"] == str(cache)
    files = _files(cache)
    assert any(name.endswith(".safetensors") for name in files)
    second = _json(runner.invoke(app, args))
    assert _files(cache) == files  # nothing new written, nothing rewritten: a cache hit
    drop = {"load_seconds", "extract_seconds"}
    assert {k: v for k, v in first.items() if k not in drop} == {k: v for k, v in second.items() if k not in drop}


def test_features_augment_views_and_plain_output(tiny_folder, tmp_path):
    res = runner.invoke(app, ["features", "--backbone", "tiny:clip", "--data", f"imagefolder:{tiny_folder}",
                              "--split", "train", "--augment-views", "1", "--cache-dir", str(tmp_path),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    assert "24 x 32 features" in res.stdout


def test_zeroshot_json(tiny_folder, tmp_path):
    res = runner.invoke(app, ["zeroshot", "--backbone", "tiny:clip", "--data", f"imagefolder:{tiny_folder}",
                              "--cache-dir", str(tmp_path), "--device", "cpu", "--json"])
    doc = _json(res)
    assert 0.0 <= doc["top1"] <= 1.0 and doc["n"] == 12
    assert doc["backbone"] and doc["dataset"] == f"imagefolder:{tiny_folder}"
    assert doc["templates"] == ["a photo of a {}."]
    custom = _json(runner.invoke(app, ["zeroshot", "--backbone", "tiny:clip", "--data", f"imagefolder:{tiny_folder}",
                                       "--cache-dir", str(tmp_path), "--device", "cpu", "--json",
                                       "--templates", "a {}.|art of a {}."]))
    assert custom["templates"] == ["a {}.", "art of a {}."] and custom["n"] == 12


@pytest.mark.parametrize("command", ["features", "zeroshot"])
def test_bad_dataset_path_json_error(command, tmp_path):
    missing = tmp_path / "nowhere"
    res = runner.invoke(app, [command, "--backbone", "tiny:clip", "--data", f"imagefolder:{missing}",
                              "--cache-dir", str(tmp_path), "--device", "cpu", "--json"])
    assert res.exit_code == 3
    doc = json.loads(res.stdout)
    assert str(missing) in doc["error"] and doc["type"] == "DatasetError"
    plain = runner.invoke(app, [command, "--backbone", "tiny:clip", "--data", "bogus:spec",
                                "--cache-dir", str(tmp_path), "--device", "cpu"])
    assert plain.exit_code == 3 and "error:" in plain.stderr and "known forms" in plain.stderr
    assert plain.stdout == ""


def test_missing_split_and_corrupt_image_are_clean_errors(tiny_folder, tmp_path):
    base = ["features", "--backbone", "tiny:clip", "--data", f"imagefolder:{tiny_folder}",
            "--cache-dir", str(tmp_path), "--device", "cpu", "--json"]
    res = runner.invoke(app, base + ["--split", "val"])
    assert res.exit_code == 3 and "no split 'val'" in json.loads(res.stdout)["error"]
    (tiny_folder / "test" / "class0" / "zz_broken.jpg").write_bytes(b"garbage")
    res = runner.invoke(app, base)
    assert res.exit_code == 3
    doc = json.loads(res.stdout)
    assert doc["type"] == "CorruptImageError" and "zz_broken.jpg" in doc["error"]
    ok = _json(runner.invoke(app, base + ["--skip-corrupt"]))
    assert ok["n"] == 12
