"""In-process loading with decode threads: same pixels and features as decoding between tower calls (and as
the per-image transform), in order, with decode errors raised or skipped as before."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from xmodal.backbones import load_backbone
from xmodal.data import load_dataset
from xmodal.errors import CorruptImageError
from xmodal.features import auto_workers, extract_features
from xmodal.prefetch import auto_decode_threads, prefetched_batches, split_transform


@pytest.fixture
def mixed_folder(tmp_path):
    """JPEGs and PNGs of several sizes and modes (RGB, grey, palette), 2 classes."""
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (64, 48), (33, 90), (375, 500), (40, 40), (120, 80), (31, 32)]
    for i, (w, h) in enumerate(sizes * 2):
        folder = tmp_path / "imgs" / "test" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        if i % 5 == 3:
            img = img.convert("L")
        if i % 7 == 4:
            img = img.convert("P")
        img.save(folder / f"{i:02d}.{'jpg' if i % 2 and img.mode != 'P' else 'png'}")
    return tmp_path / "imgs"


def _extract(bb, ds, cache, **kw):
    return extract_features(bb, ds, "test", cache_dir=cache, progress=False, batch_size=3, num_workers=0, **kw)


def test_threads_give_the_pixels_and_features_of_the_per_image_transform(tmp_path, mixed_folder, one_thread):
    bb, ds = load_backbone("tiny:clip"), load_dataset(f"imagefolder:{mixed_folder}")
    samples = ds.samples("test")
    ref = bb.encode_images(torch.stack([bb.preprocess(ds.load_image(s)) for s in samples]))
    plain = _extract(bb, ds, tmp_path / "a", decode_threads=0)
    threaded = _extract(bb, ds, tmp_path / "b", decode_threads=2)
    assert plain.ids == threaded.ids == [s.id for s in samples]
    assert torch.equal(plain.features, threaded.features)
    # the per-image transform, batched differently, gives the same numbers up to the tower's batch order
    torch.testing.assert_close(threaded.features, ref, rtol=0, atol=1e-6)

    per_image, finish = split_transform(bb.preprocess)
    images = [ds.load_image(s) for s in samples]
    assert torch.equal(finish([per_image(im) for im in images]), torch.stack([bb.preprocess(im) for im in images]))


def test_threaded_augmented_views_match_unthreaded(tmp_path, mixed_folder, one_thread):
    bb, ds = load_backbone("tiny:clip"), load_dataset(f"imagefolder:{mixed_folder}")
    state = torch.random.get_rng_state()
    a = _extract(bb, ds, tmp_path / "a", decode_threads=0, augment_views=2, augment_seed=3)
    b = _extract(bb, ds, tmp_path / "b", decode_threads=2, augment_views=2, augment_seed=3)
    assert torch.equal(a.views, b.views) and not torch.equal(a.views[0], a.views[1])
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random state is left as it was


def test_other_transforms_run_whole_per_image():
    transform = T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()])  # no Normalize: not split
    per_image, finish = split_transform(transform)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8))
    assert per_image is transform and torch.equal(finish([per_image(img)]), transform(img)[None])


def test_decode_errors_raise_or_are_skipped_through_the_threads(tmp_path, mixed_folder):
    (mixed_folder / "test" / "c0" / "05broken.jpg").write_bytes(b"not a jpeg")
    bb, ds = load_backbone("tiny:clip"), load_dataset(f"imagefolder:{mixed_folder}")
    with pytest.raises(CorruptImageError, match="05broken"):
        _extract(bb, ds, tmp_path / "a", decode_threads=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fs = _extract(bb, ds, tmp_path / "b", decode_threads=2, skip_corrupt=True)
    assert len(fs.ids) == len(ds.samples("test")) - 1 and not any("05broken" in i for i in fs.ids)
    assert any("05broken" in str(w.message) for w in caught)


def test_batches_come_in_order_with_errors_in_their_batch():
    def row(i):
        return (i, None, f"bad {i}") if i % 4 == 1 else (i, np.full((2, 2, 3), i, dtype=np.uint8), None)

    for threads in (0, 1, 3):
        got = list(prefetched_batches(row, 10, 3, threads, lambda xs: torch.from_numpy(np.stack(xs))))
        assert [b[0].tolist() for b in got] == [[0, 2], [3, 4], [6, 7, 8], []]
        assert [b[2] for b in got] == [["bad 1"], ["bad 5"], [], ["bad 9"]]
        assert got[3][1] is None and got[2][1][:, 0, 0, 0].tolist() == [6, 7, 8]


def test_a_failing_row_stops_the_batches():
    def row(i):
        if i == 4:
            raise CorruptImageError("row 4 is broken")
        return i, np.zeros((1, 1, 3), dtype=np.uint8), None

    with pytest.raises(CorruptImageError, match="row 4"):
        list(prefetched_batches(row, 9, 2, 2, lambda xs: torch.from_numpy(np.stack(xs))))


def test_cpu_loads_in_process_and_threads_only_where_they_overlap():
    assert auto_workers(10_000, 64, torch.device("cpu")) == 0
    assert auto_decode_threads(64, 64) == 0  # one batch: nothing to overlap with
    assert auto_decode_threads(65, 64) == (0 if len(__import__("os").sched_getaffinity(0)) < 2 else
                                           max(1, len(__import__("os").sched_getaffinity(0)) // 8))
