"""Cached feature extraction: cache hits and keys, atomic writes, damaged caches, augmented views,
corrupt images, patch tokens and FeatureSet validation (all with the seeded ``tiny:clip`` backbone)."""
from __future__ import annotations

import gzip
import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import xmodal.features as features_mod
from xmodal.backbones import load_backbone
from xmodal.backbones.transforms import eval_transform
from xmodal.data import load_dataset
from xmodal.errors import CorruptImageError, DatasetError, ShapeError, UsageError
from xmodal.features import extract_features, extract_tokens
from xmodal.featureset import FeatureSet


@pytest.fixture
def bb():
    return load_backbone("tiny:clip")


@pytest.fixture
def ds(tiny_folder):
    return load_dataset(f"imagefolder:{tiny_folder}")


def _count_calls(monkeypatch, backbone, name: str = "encode_images") -> list[int]:
    calls: list[int] = []
    original = getattr(backbone, name)

    def spy(pixels):
        calls.append(pixels.shape[0])
        return original(pixels)

    monkeypatch.setattr(backbone, name, spy)
    return calls


def _cache_files(cache: Path) -> set[str]:
    return {p.name for p in (cache / "features").glob("*")} if (cache / "features").is_dir() else set()


def _extract(bb, ds, cache, split="test", **kw):
    kw.setdefault("progress", False)
    return extract_features(bb, ds, split, cache_dir=cache, **kw)


# ---------------------------------------------------------------------------------------------- cache hits
def test_second_call_hits_cache_and_is_identical(bb, ds, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch, bb)
    first = _extract(bb, ds, tmp_path, batch_size=5)
    assert sum(calls) == 12 and len(calls) == 3  # 3 classes x 4 test images, batches of 5
    files = _cache_files(tmp_path)
    assert any(f.endswith(".safetensors") for f in files)
    calls.clear()
    second = _extract(bb, ds, tmp_path)
    assert calls == []
    assert _cache_files(tmp_path) == files
    assert torch.equal(first.features, second.features)
    assert torch.equal(first.labels, second.labels)
    assert first.ids == second.ids == [s.id for s in ds.samples("test")]
    assert first.classnames == ["class0", "class1", "class2"]
    assert first.features.shape == (12, 32) and first.features.dtype == torch.float32
    assert torch.allclose(first.features.norm(dim=-1), torch.ones(12), atol=1e-5)
    assert first.meta["backbone"] == "tiny:clip" and first.meta["split"] == "test"
    assert first.meta["stand_in"] is True and first.views is None
    # a fresh dataset object and a fresh backbone object with the same spec share the cache
    calls2 = _count_calls(monkeypatch, bb2 := load_backbone("tiny:clip"))
    third = _extract(bb2, load_dataset(f"imagefolder:{ds.root}"), tmp_path)
    assert calls2 == [] and torch.equal(third.features, first.features)


def test_cache_key_changes_recompute(bb, ds, tmp_path, monkeypatch):
    base = _extract(bb, ds, tmp_path)
    n_files = len(_cache_files(tmp_path))

    # another backbone (different fingerprint)
    other = load_backbone("tiny:clip:1")
    calls = _count_calls(monkeypatch, other)
    fs = _extract(other, ds, tmp_path)
    assert sum(calls) == 12 and not torch.allclose(fs.features, base.features)

    # another preprocessing pipeline
    calls = _count_calls(monkeypatch, bb)
    monkeypatch.setattr(bb, "_eval", eval_transform(32, (0.4, 0.4, 0.4), (0.3, 0.3, 0.3)))
    fs = _extract(bb, ds, tmp_path)
    assert sum(calls) == 12 and not torch.allclose(fs.features, base.features)
    monkeypatch.undo()

    # another sample set (a subset of the split)
    calls = _count_calls(monkeypatch, bb)
    subset = ds.samples("test")[:5]
    fs = _extract(bb, ds, tmp_path, samples=subset)
    assert sum(calls) == 5 and fs.ids == [s.id for s in subset]
    assert torch.allclose(fs.features, base.features[:5], atol=1e-5)
    calls.clear()
    _extract(bb, ds, tmp_path, samples=list(subset))
    assert calls == []  # the same subset again is a hit
    assert len(_cache_files(tmp_path)) > n_files


def test_edited_image_recomputes(bb, tiny_folder, tmp_path, monkeypatch):
    ds = load_dataset(f"imagefolder:{tiny_folder}")
    base = _extract(bb, ds, tmp_path)
    target = Path(ds.samples("test")[0].path)

    # new contents, new size
    Image.new("RGB", (48, 48), (255, 0, 0)).save(target, compress_level=0)
    calls = _count_calls(monkeypatch, bb)
    changed = _extract(bb, load_dataset(f"imagefolder:{tiny_folder}"), tmp_path)
    assert sum(calls) == 12
    assert not torch.allclose(changed.features[0], base.features[0])
    assert torch.allclose(changed.features[1:], base.features[1:], atol=1e-5)

    # same size, new contents, new mtime
    img = np.asarray(Image.open(target)).copy()
    img[:] = (0, 0, 255)
    size_before = target.stat().st_size
    Image.fromarray(img).save(target, compress_level=0)  # uncompressed: same size
    assert target.stat().st_size == size_before
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    calls.clear()
    again = _extract(bb, load_dataset(f"imagefolder:{tiny_folder}"), tmp_path)
    assert sum(calls) == 12 and not torch.allclose(again.features[0], changed.features[0])


def test_array_datasets_with_same_labels_do_not_share_cache(bb, tmp_path):
    """Two Fashion-MNIST folders whose labels agree but whose pixels differ must not share features."""

    def idx(path, arr):
        header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
        with gzip.open(path, "wb") as fh:
            fh.write(header + arr.astype(np.uint8).tobytes())

    roots = []
    for k, value in enumerate((30, 220)):
        root = tmp_path / f"fm{k}"
        root.mkdir()
        rng = np.random.default_rng(k)
        for prefix in ("train", "t10k"):
            idx(root / f"{prefix}-images-idx3-ubyte.gz", np.clip(value + rng.integers(-20, 20, (4, 28, 28)), 0, 255))
            idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(4))
        roots.append(root)
    cache = tmp_path / "cache"
    a = _extract(bb, load_dataset(f"fashion-mnist:{roots[0]}"), cache)
    b = _extract(bb, load_dataset(f"fashion-mnist:{roots[1]}"), cache)
    assert a.ids == b.ids
    assert not torch.allclose(a.features, b.features)


# ---------------------------------------------------------------------------------------------- atomic writes
def test_failed_save_leaves_nothing_and_next_call_works(bb, ds, tmp_path, monkeypatch):
    def boom(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(features_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _extract(bb, ds, tmp_path)
    assert _cache_files(tmp_path) == set()  # no entry, no orphan side file, no temp file
    monkeypatch.undo()
    calls = _count_calls(monkeypatch, bb)
    fs = _extract(bb, ds, tmp_path)
    assert sum(calls) == 12 and len(fs) == 12
    calls.clear()
    assert torch.equal(_extract(bb, ds, tmp_path).features, fs.features) and calls == []


@pytest.mark.parametrize("damage", ["truncate", "sidecar"])
def test_damaged_cache_is_recomputed_with_warning(bb, ds, tmp_path, monkeypatch, damage):
    ref = _extract(bb, ds, tmp_path)
    (entry,) = (tmp_path / "features").glob("*.safetensors")
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    else:
        entry.with_suffix(".json").write_text('{"ids": ["x"]}')  # ids that do not match the rows
    calls = _count_calls(monkeypatch, bb)
    with pytest.warns(UserWarning, match="feature cache"):
        fs = _extract(bb, ds, tmp_path)
    assert sum(calls) == 12
    assert torch.allclose(fs.features, ref.features, atol=1e-6) and fs.ids == ref.ids
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _extract(bb, ds, tmp_path)  # repaired: a clean hit
    assert calls == []


@pytest.mark.parametrize("tamper", ["tensors", "key", "ids", "old-format"])
def test_tampered_cache_entry_is_recomputed(bb, ds, tmp_path, monkeypatch, tamper):
    """An entry is only reused when it matches its record: the key it was written for, ids, shapes, dtypes and
    a digest of the tensors' contents; anything else is recomputed with a warning naming the mismatch."""
    from safetensors.torch import save_file

    ref = _extract(bb, ds, tmp_path)
    (entry,) = (tmp_path / "features").glob("*.safetensors")
    side = entry.with_suffix(".json")
    record = json.loads(side.read_text())
    if tamper == "tensors":  # a well-formed file with other numbers of the same shape and dtype
        save_file({"x": torch.flip(ref.features, [0]).contiguous()}, str(entry))
        match = "contents replaced"
    elif tamper == "key":  # a record written for another backbone
        record["meta"]["fingerprint"] = "someone-else"
        side.write_text(json.dumps(record))
        match = "another key"
    elif tamper == "ids":  # rows relabelled: the ids no longer are the samples the key names
        record["ids"] = record["ids"][::-1]
        side.write_text(json.dumps(record))
        match = "id list"
    else:  # written before tensor digests were recorded
        del record["tensors"]
        side.write_text(json.dumps(record))
        match = "no tensor digests"
    calls = _count_calls(monkeypatch, bb)
    with pytest.warns(UserWarning, match=match):
        fs = _extract(bb, ds, tmp_path)
    assert sum(calls) == 12
    assert torch.equal(fs.features, ref.features) and fs.ids == ref.ids


# ---------------------------------------------------------------------------------------------- augmented views
def test_augmented_views_deterministic_and_batch_independent(bb, ds, tmp_path):
    some = ds.samples("train")[::3]  # 8 images
    a = _extract(bb, ds, tmp_path / "a", split="train", samples=some, augment_views=2, augment_seed=0, batch_size=64)
    b = _extract(bb, ds, tmp_path / "b", split="train", samples=some, augment_views=2, augment_seed=0, batch_size=1)
    c = _extract(bb, ds, tmp_path / "c", split="train", samples=some, augment_views=2, augment_seed=1, batch_size=3)
    assert a.views.shape == (2, 8, 32)
    assert torch.allclose(a.views, b.views, atol=1e-5)  # same seed, different batching
    assert not torch.allclose(a.views[0], a.views[1])  # views differ from each other
    assert not torch.allclose(a.views, c.views)  # another seed, other views
    assert not torch.allclose(a.views[0], a.features)  # views are augmented, not the eval features
    assert torch.allclose(a.features, c.features, atol=1e-5)  # eval features do not depend on the seed
    assert a.meta["augment_views"] == 2 and c.meta["augment_seed"] == 1


def test_augment_settings_are_part_of_the_key(bb, ds, tmp_path, monkeypatch):
    two = _extract(bb, ds, tmp_path, split="train", augment_views=2)
    calls = _count_calls(monkeypatch, bb)
    three = _extract(bb, ds, tmp_path, split="train", augment_views=3)
    assert sum(calls) == 24  # only the new third view is computed
    assert torch.equal(three.views[:2], two.views)
    calls.clear()
    _extract(bb, ds, tmp_path, split="train", augment_views=2, augment_seed=5)
    assert sum(calls) == 48  # a new seed: both views again
    calls.clear()
    again = _extract(bb, ds, tmp_path, split="train", augment_views=2)
    assert calls == [] and torch.equal(again.views, two.views)


def test_extraction_does_not_touch_global_rng(bb, ds, tmp_path):
    """Whether the cache hits or not, code after extraction sees the same random stream."""
    draws = []
    for _ in range(2):  # first call computes, second call hits the cache
        torch.manual_seed(123)
        _extract(bb, ds, tmp_path, split="train", augment_views=1)
        draws.append(torch.rand(3))
    torch.manual_seed(123)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], torch.rand(3))


# ---------------------------------------------------------------------------------------------- corrupt images
@pytest.fixture
def corrupt(tiny_folder) -> Path:
    bad = tiny_folder / "test" / "class1" / "broken.jpg"
    bad.write_bytes(b"\x00garbage, not a jpeg" * 10)
    return bad


def test_corrupt_image_raises_naming_the_file(bb, tiny_folder, corrupt, tmp_path):
    ds = load_dataset(f"imagefolder:{tiny_folder}")
    with pytest.raises(CorruptImageError, match="broken.jpg") as err:
        _extract(bb, ds, tmp_path)
    assert "--skip-corrupt" in err.value.hint  # the message names the file; the hint says how to skip it
    assert not list((tmp_path / "features").glob("*.safetensors"))


def test_corrupt_image_skipped_with_warning(bb, tiny_folder, corrupt, tmp_path):
    ds = load_dataset(f"imagefolder:{tiny_folder}")
    assert len(ds.samples("test")) == 13
    with pytest.warns(UserWarning, match="broken.jpg"):
        fs = _extract(bb, ds, tmp_path, skip_corrupt=True, batch_size=4)
    assert len(fs) == 12 and "test/class1/broken.jpg" not in fs.ids
    assert fs.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    fs.subset(fs.ids[:3])
    with pytest.raises(KeyError, match="broken.jpg"):
        fs.subset(["test/class1/broken.jpg"])
    # skipped rows stay skipped on a cache hit ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extract(bb, ds, tmp_path, skip_corrupt=True).ids == fs.ids
    # ... but a strict run never silently reuses a cache entry that is missing images
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        _extract(bb, ds, tmp_path)


def test_all_images_corrupt(bb, tmp_path):
    for i in range(2):
        p = tmp_path / "d" / "test" / "c" / f"{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"nope")
    ds = load_dataset(f"imagefolder:{tmp_path / 'd'}")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no readable images"):
        _extract(bb, ds, tmp_path / "cache", skip_corrupt=True)


def test_no_samples_and_bad_dtype(bb, ds, tmp_path):
    with pytest.raises(DatasetError, match="no samples"):
        _extract(bb, ds, tmp_path, samples=[])
    with pytest.raises(UsageError, match="unknown dtype") as err:
        _extract(bb, ds, tmp_path, dtype="fp8")
    assert "--dtype fp32" in err.value.hint
    with pytest.warns(UserWarning, match="CPU"):
        half = _extract(bb, ds, tmp_path, dtype="fp16")  # fp16 is a GPU mode: CPU runs fp32, same key
    assert half.features.dtype == torch.float32
    assert torch.equal(half.features, _extract(bb, ds, tmp_path).features)


def test_array_dataset_features(bb, tmp_path):
    ds = load_dataset("digits")
    subset = ds.samples("test")[:6]
    fs = _extract(bb, ds, tmp_path, samples=subset)
    assert fs.ids == [s.id for s in subset] and fs.features.shape == (6, 32)


# ---------------------------------------------------------------------------------------------- tokens
def test_extract_tokens_shape_and_cache(bb, ds, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch, bb, "image_tokens")
    ids, tokens = extract_tokens(bb, ds, "test", cache_dir=tmp_path, batch_size=5, progress=False)
    assert ids == [s.id for s in ds.samples("test")]
    assert tokens.shape == (12, 16, 32) and tokens.dtype == torch.float16
    assert sum(calls) == 12
    calls.clear()
    ids2, tokens2 = extract_tokens(bb, ds, "test", cache_dir=tmp_path, progress=False)
    assert calls == [] and ids2 == ids and torch.equal(tokens2, tokens)
    ids3, tokens3 = extract_tokens(bb, ds, "test", cache_dir=tmp_path, progress=False, token_dtype=torch.float32)
    assert sum(calls) == 12 and tokens3.dtype == torch.float32
    assert torch.allclose(tokens3.half().float(), tokens.float())
    # tokens and features live side by side without clobbering each other
    fs = _extract(bb, ds, tmp_path)
    pooled = torch.nn.functional.normalize(tokens3.mean(1), dim=-1)
    assert torch.allclose(fs.features, pooled, atol=1e-5)


# ---------------------------------------------------------------------------------------------- FeatureSet
def _fs(n=4, d=3, classes=2, **kw):
    args = dict(features=torch.randn(n, d), labels=torch.arange(n) % classes, ids=[f"s{i}" for i in range(n)],
                classnames=[f"c{i}" for i in range(classes)])
    args.update(kw)
    return FeatureSet(**args)


def test_featureset_validation():
    fs = _fs()
    assert len(fs) == 4 and fs.dim == 3 and fs.num_classes == 2
    with pytest.raises(ShapeError, match=r"labels must lie in \[0, 2\)"):
        _fs(labels=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ShapeError, match=r"labels must lie"):
        _fs(labels=torch.tensor([0, -1, 1, 0]))
    with pytest.raises(ShapeError, match="labels must be"):
        _fs(labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ShapeError, match="3 ids for 4"):
        _fs(ids=["a", "b", "c"])
    with pytest.raises(ShapeError, match=r"features must be \(N, D\)"):
        _fs(features=torch.randn(4))
    with pytest.raises(ShapeError, match="views must be"):
        _fs(views=torch.randn(2, 4, 5))
    assert _fs(views=torch.randn(2, 4, 3)).views.shape == (2, 4, 3)
    empty = FeatureSet(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), [], ["a"])
    assert len(empty) == 0


def test_featureset_subset():
    fs = _fs(n=5, views=torch.randn(2, 5, 3), meta={"k": 1})
    sub = fs.subset(["s3", "s0"])
    assert sub.ids == ["s3", "s0"]
    assert torch.equal(sub.features, fs.features[[3, 0]]) and torch.equal(sub.labels, fs.labels[[3, 0]])
    assert torch.equal(sub.views, fs.views[:, [3, 0]]) and sub.meta == {"k": 1}
    with pytest.raises(KeyError) as err:
        fs.subset(["s1", "nope", "also-missing"])
    assert "nope" in str(err.value) and "also-missing" in str(err.value) and "2 ids" in str(err.value)
