"""FewShotClassifier: fit / predict / top_k on a tiny ImageFolder, and the saved folder (round trip, refusals)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal import FewShotClassifier, available_methods
from xmodal.classifier import CONFIG_FILE, TENSORS_FILE
from xmodal.errors import CacheMismatchError, CorruptImageError, InputError, UsageError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from xmodal.bench.testing import make_tiny_imagefolder

    base = tmp_path_factory.mktemp("clf")
    root = make_tiny_imagefolder(base / "imgs", classes=3, train=8, test=4)
    return root, base / "cache"


@pytest.fixture(scope="module")
def fitted(data):
    root, cache = data
    return FewShotClassifier(backbone="tiny:clip", method="tip-adapter", shots=4, seed=1, cache_dir=cache,
                             device="cpu").fit(str(root))


def test_constructor_does_no_work_and_unfitted_refuses():
    clf = FewShotClassifier(backbone="no-such:backbone", method="no-such-method")
    assert clf.get_params()["method"] == "no-such-method"
    with pytest.raises(UsageError, match="not fitted"):
        clf.predict_proba(torch.zeros(3, 8, 8))


def test_fit_predict_top_k(fitted, data, one_thread):
    root, _ = data
    assert fitted.classes_ == ["class0", "class1", "class2"]
    assert 0.0 <= fitted.val_accuracy_ <= 1.0
    assert fitted.info_["dataset"]["n_support"] == 12 and fitted.info_["dataset"]["n_val"] == 12
    test_files = sorted((root / "test").rglob("*.png"))
    proba = fitted.predict_proba(str(root / "test"))          # a folder, walked recursively
    assert proba.shape == (len(test_files), 3)
    assert torch.allclose(proba.sum(1), torch.ones(len(test_files)), atol=1e-5)
    labels = fitted.predict([str(p) for p in test_files])
    truth = [p.parent.name for p in test_files]
    assert np.mean([a == b for a, b in zip(labels, truth)]) > 1 / 3   # colour-coded classes: above chance
    top = fitted.top_k(str(test_files[0]), k=2)
    assert len(top) == 1 and len(top[0]) == 2 and top[0][0][0] == labels[0] and top[0][0][1] >= top[0][1][1]


def test_pil_tensor_and_path_inputs_agree(fitted, data, one_thread):
    root, _ = data
    path = sorted((root / "test" / "class1").glob("*.png"))[0]
    pil = Image.open(path).convert("RGB")
    u8 = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
    by_path = fitted.predict_proba([str(path)])
    assert torch.allclose(fitted.predict_proba([pil]), by_path, atol=1e-6)
    assert torch.allclose(fitted.predict_proba(u8), by_path, atol=1e-6)
    assert torch.allclose(fitted.predict_proba(u8.float() / 255), by_path, atol=1e-5)
    assert fitted.predict_proba(torch.stack([u8, u8])).shape == (2, 3)
    with pytest.raises(InputError, match="no such file"):
        fitted.predict(str(root / "missing.png"))


def test_corrupt_image_is_an_error_row_not_the_end(fitted, data, tmp_path):
    root, _ = data
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    good = sorted((root / "test" / "class0").glob("*.png"))[0]
    rows = list(fitted.iter_predict([str(good), str(bad), str(good)], batch_size=2))
    assert [r.error is None for r in rows] == [True, False, True]
    assert str(bad) in rows[1].error and rows[1].source == str(bad)
    assert len(list(fitted.iter_predict([str(good), str(bad)], skip_corrupt=True))) == 1
    with pytest.raises(CorruptImageError, match="bad.jpg"):
        fitted.predict_proba([str(good), str(bad)])


def test_save_load_round_trip_and_artefact(fitted, data, tmp_path, one_thread):
    root, cache = data
    out = fitted.save(tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, TENSORS_FILE])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]       # no temp folder left behind
    doc = json.loads((out / CONFIG_FILE).read_text())
    for key in ("format_version", "method", "classes", "templates", "backbone", "preprocessing", "feature_dim",
                "dataset", "xmodal_version", "created", "validation"):
        assert key in doc, key
    assert doc["backbone"]["stand_in"] is True and doc["backbone"]["fingerprint"]
    assert doc["method"]["selected"]["alpha"] == fitted.selected_["alpha"]
    assert "pickle" not in (out / TENSORS_FILE).read_bytes()[:200].decode("latin-1")
    loaded = FewShotClassifier.load(out, device="cpu", cache_dir=cache)
    x = str(root / "test")
    assert float((loaded.predict_proba(x) - fitted.predict_proba(x)).abs().max()) <= 1e-6
    card = loaded.card()
    assert card["method"] == "tip-adapter" and card["stand_in"] is True and card["classes"] == fitted.classes_
    assert card["validation_accuracy"] == pytest.approx(fitted.val_accuracy_) and card["created"]
    fitted.save(out)                                          # an existing classifier folder is replaced
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing to overwrite"):
        fitted.save(tmp_path / "foreign")


def test_backbone_fingerprint_mismatch_is_refused(fitted, data, tmp_path):
    _, cache = data
    out = fitted.save(tmp_path / "model")
    with pytest.raises(CacheMismatchError) as info:
        FewShotClassifier.load(out, device="cpu", backbone="tiny:clip:1", cache_dir=cache)
    msg = str(info.value)
    assert "tiny:clip" in msg and "tiny:clip:1" in msg and "force=True" in info.value.hint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FewShotClassifier.load(out, device="cpu", backbone="tiny:clip:1", force=True, cache_dir=cache)
    assert any("backbone mismatch" in str(w.message) for w in caught)


def test_unknown_version_tampering_and_missing_files(fitted, data, tmp_path):
    _, cache = data
    out = fitted.save(tmp_path / "model")
    doc = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(InputError, match="format version 99") as info:
        FewShotClassifier.load(out, device="cpu", cache_dir=cache)
    assert "upgrade" in info.value.hint
    (out / CONFIG_FILE).write_text(json.dumps(doc))
    raw = bytearray((out / TENSORS_FILE).read_bytes())
    raw[-1] ^= 0x01                                          # flip one bit of one weight
    (out / TENSORS_FILE).write_bytes(bytes(raw))
    with pytest.raises(InputError, match="checksum"):
        FewShotClassifier.load(out, device="cpu", cache_dir=cache)
    (out / TENSORS_FILE).unlink()
    with pytest.raises(InputError, match="missing adapter.safetensors"):
        FewShotClassifier.load(out, device="cpu", cache_dir=cache)
    (out / CONFIG_FILE).write_text("{not json")
    with pytest.raises(InputError):
        FewShotClassifier.load(out, device="cpu", cache_dir=cache)
    with pytest.raises(InputError, match="not a folder"):
        FewShotClassifier.load(tmp_path / "nowhere", device="cpu")


@pytest.mark.parametrize("name", available_methods())
def test_every_method_round_trips_through_the_folder(name, data, tmp_path, one_thread):
    root, cache = data
    params = {"epochs": 3} if name in ("tip-adapter-f", "xmadapter", "clip-adapter") else {}
    params = {"coop": {"epochs": 3}, "cocoop": {"epochs": 1}, "clip-lora": {"iterations": 5}}.get(name, params)
    clf = FewShotClassifier(backbone="tiny:clip", method=name, shots=2, seed=0, cache_dir=cache, device="cpu",
                            augment_views=2, **params).fit(root)
    loaded = FewShotClassifier.load(clf.save(tmp_path / name), device="cpu", cache_dir=cache)
    x = str(root / "test")
    assert float((loaded.predict_proba(x) - clf.predict_proba(x)).abs().max()) <= 1e-6
    assert loaded.card()["method"] == name


def test_all_training_images_when_shots_is_none(data, one_thread):
    root, cache = data
    clf = FewShotClassifier(backbone="tiny:clip", method="gda", seed=0, cache_dir=cache, device="cpu",
                            augment_views=0).fit(root)
    ds = clf.info_["dataset"]
    assert ds["shots"] is None and ds["n_support"] + ds["n_val"] == 24 and ds["n_val"] == 12
    with pytest.raises(UsageError, match="unknown few-shot method"):
        FewShotClassifier(backbone="tiny:clip", method="nope", cache_dir=cache).fit(root)
    with pytest.raises(UsageError, match="bad parameter"):
        FewShotClassifier(backbone="tiny:clip", method="gda", cache_dir=cache, device="cpu", nonsense=1).fit(root)


def test_malformed_description_is_a_clear_error(fitted, data, tmp_path):
    _, cache = data
    out = fitted.save(tmp_path / "model")
    doc = json.loads((out / CONFIG_FILE).read_text())
    for broken in ({**doc, "classes": 3}, {k: v for k, v in doc.items() if k != "backbone"},
                   {**doc, "method": {**doc["method"], "state": {**doc["method"]["state"],
                                                                  "params": {"no_such_param": 1}}}}):
        (out / CONFIG_FILE).write_text(json.dumps(broken))
        with pytest.raises(InputError, match="digest"):  # any edit is caught by the digest first
            FewShotClassifier.load(out, device="cpu", cache_dir=cache)
        with pytest.raises(InputError, match="malformed|parameter"), pytest.warns(UserWarning, match="digest"):
            FewShotClassifier.load(out, device="cpu", cache_dir=cache, force=True)  # and the structure is checked


def test_failed_save_leaves_the_previous_folder_and_no_temp(fitted, tmp_path, monkeypatch):
    import xmodal.classifier.artefact as artefact

    out = fitted.save(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artefact, "file_digest", boom)       # fails after the tensors were written
    with pytest.raises(OSError):
        fitted.save(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
