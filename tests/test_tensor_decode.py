"""The torchvision decode path (batched nvJPEG on GPU) agrees with the PIL path and has its own cache key."""
from __future__ import annotations

import pytest
from xmodal.backbones import load_backbone
from xmodal.data import load_dataset
from xmodal.errors import CorruptImageError, UsageError
from xmodal.features import extract_features


def test_tensor_decode_matches_pil_and_is_cached_separately(shared_data, tmp_path):
    bb = load_backbone("tiny:clip")
    ds = load_dataset(f"imagefolder:{shared_data / 'cifar10'}")
    samples = ds.samples("test")[:24]
    pil = extract_features(bb, ds, "test", samples=samples, cache_dir=tmp_path, progress=False)
    tensor = extract_features(bb, ds, "test", samples=samples, cache_dir=tmp_path, progress=False, decode="tensor",
                              batch_size=7, num_workers=1)  # files read in a loader worker, decoded in the main process
    assert pil.ids == tensor.ids
    cosine = (pil.features * tensor.features).sum(1)
    assert cosine.min() > 0.999  # bicubic resize on tensors vs PIL: close, not bit-identical
    assert pil.meta["pipeline"] != tensor.meta["pipeline"]  # a different pipeline, never a cache hit
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2


def test_tensor_decode_names_a_corrupt_jpeg(tmp_path):
    from xmodal.bench.testing import make_tiny_imagefolder

    root = make_tiny_imagefolder(tmp_path / "imgs", classes=2, train=2, test=2)
    bad = root / "test" / "class0" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = load_dataset(f"imagefolder:{root}")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        extract_features(load_backbone("tiny:clip"), ds, "test", cache_dir=tmp_path / "c", progress=False,
                         decode="tensor")


def test_tensor_decode_rejects_augmented_views_and_unknown_modes(tiny_folder, tmp_path):
    ds = load_dataset(f"imagefolder:{tiny_folder}")
    bb = load_backbone("tiny:clip")
    with pytest.raises(UsageError, match="decode must be"):
        extract_features(bb, ds, "test", cache_dir=tmp_path, progress=False, decode="magic")
    # views are always made on PIL images, even when eval features use the tensor path
    fs = extract_features(bb, ds, "test", cache_dir=tmp_path, progress=False, decode="tensor", augment_views=2)
    assert fs.views.shape[0] == 2
