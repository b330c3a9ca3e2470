"""The exact ONNX Runtime engine: same features as PyTorch fp32 (max abs diff reported), export cached
and verified on load, one warning and PyTorch when it cannot serve, the engine choice via API, env and
CLI; and the opt-in bf16 / int8 modes with their own cache keys and recorded fidelity."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

import xmodal.engines.onnx as onnx_mod
from xmodal.backbones import load_backbone
from xmodal.data import load_dataset
from xmodal.engines.onnx import compare
from xmodal.errors import UsageError
from xmodal.features import extract_features


@pytest.fixture
def ds(tiny_folder):
    return load_dataset(f"imagefolder:{tiny_folder}")


def _count_exports(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = onnx_mod._export

    def spy(backbone, tower, target):
        calls.append(tower)
        return original(backbone, tower, target)

    monkeypatch.setattr(onnx_mod, "_export", spy)
    return calls


def _exact(bb, tower, x):
    with torch.inference_mode():
        return bb.torch_tower(tower)(x)


def test_onnx_matches_torch_and_export_is_reused(tmp_path, monkeypatch, one_thread):
    exports = _count_exports(monkeypatch)
    bb = load_backbone("tiny:clip", cache_dir=str(tmp_path), engine="onnx")
    x = torch.randn(7, 3, 32, 32)  # another batch size than the export's example
    for tower in ("image", "tokens"):
        got = bb._run(tower, x)
        fid = compare(got, _exact(bb, tower, x))
        print(f"tiny:clip {tower}: max abs diff onnx vs torch {fid['max_abs_diff']:.2e}, cos min {fid['cos_min']:.7f}")
        assert fid["cos_min"] >= 0.99999 and fid["max_abs_diff"] < 1e-4
    assert bb.engine_info()["engine"] == "onnx" and exports == ["image", "tokens"]
    again = load_backbone("tiny:clip", cache_dir=str(tmp_path), engine="onnx")
    assert again.active_engine("image") == "onnx" and exports == ["image", "tokens"]  # loaded, not re-exported
    side = json.loads(next((tmp_path / "onnx").glob("*.json")).read_text())
    assert side["fingerprint"] == bb.fingerprint() and len(side["sha256"]) == 64


def test_tampered_export_is_redone(tmp_path, monkeypatch):
    load_backbone("tiny:clip", cache_dir=str(tmp_path), engine="onnx").active_engine()
    (graph,) = (tmp_path / "onnx").glob("*.onnx")
    graph.write_bytes(graph.read_bytes()[:-16] + b"\0" * 16)
    exports = _count_exports(monkeypatch)
    bb = load_backbone("tiny:clip", cache_dir=str(tmp_path), engine="onnx")
    with pytest.warns(UserWarning, match="SHA-256"):
        assert bb.active_engine() == "onnx"
    assert exports == ["image"]


def test_failed_export_falls_back_to_torch_once(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("operator not supported")

    monkeypatch.setattr(onnx_mod, "_export", broken)
    bb = load_backbone("tiny:clip", cache_dir=str(tmp_path), engine="onnx")
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"unavailable.*operator not supported.*using PyTorch"):
        out = bb.encode_images(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert torch.equal(bb.encode_images(x), out)
    assert bb.active_engine() == "torch" and not list((tmp_path / "onnx").glob("*.onnx*"))


def test_engine_choice_api_and_env(tmp_path, monkeypatch):
    assert load_backbone("tiny:clip").engine == "auto"
    assert load_backbone("tiny:clip").active_engine() == "torch"  # auto: tiny prefers PyTorch
    monkeypatch.setenv("XMODAL_ENGINE", "onnx")
    assert load_backbone("tiny:clip", cache_dir=str(tmp_path)).engine == "onnx"
    assert load_backbone("tiny:clip", engine="torch").engine == "torch"  # the argument wins
    monkeypatch.setenv("XMODAL_ENGINE", "tensorrt")
    with pytest.raises(UsageError, match="XMODAL_ENGINE"):
        load_backbone("tiny:clip")
    with pytest.raises(UsageError, match="unknown engine") as err:
        load_backbone("tiny:clip", engine="fast")
    assert "--engine" in err.value.hint


def test_engines_share_the_feature_cache(ds, tmp_path, monkeypatch, one_thread):
    ref = extract_features(load_backbone("tiny:clip", engine="torch"), ds, "test", cache_dir=tmp_path, progress=False)
    onnx_bb = load_backbone("tiny:clip", cache_dir=str(tmp_path), engine="onnx")
    fresh = extract_features(onnx_bb, ds, "test", cache_dir=tmp_path / "other", progress=False)
    assert fresh.meta["engine"] == "onnx" and ref.meta["engine"] == "torch"
    fid = compare(fresh.features, ref.features)
    print(f"tiny:clip features: max abs diff onnx vs torch {fid['max_abs_diff']:.2e}")
    assert fid["cos_min"] >= 0.99999
    calls = []
    monkeypatch.setattr(onnx_bb, "encode_images", lambda x: calls.append(x) or ref.features[: len(x)])
    hit = extract_features(onnx_bb, ds, "test", cache_dir=tmp_path, progress=False)  # same key: a hit
    assert calls == [] and torch.equal(hit.features, ref.features)


def test_openclip_vit_through_onnx(tmp_path, tiny_openclip_vit):
    _, _, spec = tiny_openclip_vit
    bb = load_backbone(spec, cache_dir=str(tmp_path))  # auto: ONNX on CPU
    x = torch.randn(3, 3, 32, 32)
    for tower in ("image", "tokens"):
        fid = compare(bb._run(tower, x), _exact(bb, tower, x))
        print(f"open_clip ViT {tower}: max abs diff onnx vs torch {fid['max_abs_diff']:.2e}")
        assert fid["cos_min"] >= 0.99999
    assert bb.active_engine("image") == "onnx" and bb.active_engine("tokens") == "onnx"


def test_bf16_cpu_mode_has_its_own_key_and_fidelity(ds, tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_COMPILE", "0")  # compiling takes minutes on a small CPU; the numerics are bf16 either way
    bb = load_backbone("tiny:clip")
    fp32 = extract_features(bb, ds, "test", cache_dir=tmp_path, progress=False)
    bf16 = extract_features(bb, ds, "test", cache_dir=tmp_path, progress=False, dtype="bf16")
    assert bf16.meta["dtype"] == "torch.bfloat16" and bf16.meta["engine"] == "torch-bf16"
    fid = bf16.meta["fidelity"]
    assert 0.99 < fid["cos_min"] < 1.0 and fid["n"] == 12
    assert not torch.equal(bf16.features, fp32.features)
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2
    again = extract_features(bb, ds, "test", cache_dir=tmp_path, progress=False, dtype="bf16")
    assert torch.equal(again.features, bf16.features) and again.meta["fidelity"] == fid  # recorded with the entry


def test_int8_mode_has_its_own_key_and_fidelity(ds, tmp_path, capsys):
    bb = load_backbone("tiny:clip", cache_dir=str(tmp_path))
    fp32 = extract_features(bb, ds, "test", cache_dir=tmp_path, progress=False)
    int8 = extract_features(bb, ds, "test", cache_dir=tmp_path, progress=True, dtype="int8")
    assert "onnx-int8 vs exact fp32" in capsys.readouterr().err  # the fidelity is printed
    fid = int8.meta["fidelity"]
    assert int8.meta["dtype"] == "int8" and 0.9 < fid["cos_mean"] < 1.0
    assert not torch.equal(int8.features, fp32.features)
    assert list((tmp_path / "onnx").glob("*.int8.onnx")) and list((tmp_path / "onnx").glob("*.int8.json"))
    with pytest.raises(UsageError, match="int8 runs on CPU"):
        from xmodal.features import _resolve_dtype

        _resolve_dtype("int8", torch.device("cuda"))


def test_cli_engine_and_dtype_options(tiny_folder, tmp_path):
    from xmodal.cli import app

    runner = CliRunner()
    base = ["features", "--backbone", "tiny:clip", "--data", f"imagefolder:{tiny_folder}", "--cache-dir",
            str(tmp_path), "--device", "cpu", "--json"]
    res = runner.invoke(app, base + ["--engine", "onnx"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["engine"] == "onnx" and out["n"] == 12
    res = runner.invoke(app, base + ["--engine", "fast"])
    assert res.exit_code == 2 and "unknown engine" in res.stdout
    res = runner.invoke(app, ["zeroshot", "--backbone", "tiny:clip", "--data", f"imagefolder:{tiny_folder}",
                              "--cache-dir", str(tmp_path), "--device", "cpu", "--engine", "torch", "--json"])
    assert res.exit_code == 0, res.output
