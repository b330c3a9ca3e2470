"""Every dataset kind through ``load_dataset`` on small generated fixtures, plus the few-shot sampler."""
from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmodal.bench.testing import make_tiny_imagefolder
from xmodal.data import DATASET_SPECS, fewshot_split, load_dataset
from xmodal.data.arrays import CIFAR10_CLASSES, FASHION_CLASSES
from xmodal.data.base import Sample
from xmodal.data.coop import CoopDataset
from xmodal.data.imagefolder import ImageFolderDataset
from xmodal.data.templates import CIFAR, IMAGENET_7
from xmodal.errors import DatasetError, UsageError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _png(path: Path, color=(10, 20, 30), size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


# ---------------------------------------------------------------------------------------------- ImageFolder
def test_imagefolder_splits_class_order_and_ids(tmp_path):
    root = make_tiny_imagefolder(tmp_path / "d", classes=3, train=4, test=2, val=2)
    # an unsorted extra class folder and a non-image file must not change the order / sample list
    (root / "train" / "class0" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"imagefolder:{root}")
    assert isinstance(ds, ImageFolderDataset)
    assert ds.name == f"imagefolder:{root}"
    assert ds.splits() == ["train", "val", "test"]
    assert ds.classnames == ["class0", "class1", "class2"]
    assert ds.templates == ["a photo of a {}."]
    train = ds.samples("train")
    assert len(train) == 12 and len(ds.samples("val")) == 6 and len(ds.samples("test")) == 6
    assert [s.label for s in train] == [0] * 4 + [1] * 4 + [2] * 4
    assert train[0].id == "train/class0/img000.png" and Path(train[0].path).is_file()
    assert all(not s.id.endswith(".txt") for s in train)
    assert ds.load_image(train[0]).mode == "RGB"
    assert "3 classes" in ds.describe() and "train=12" in ds.describe()
    with pytest.raises(DatasetError, match="no split 'nope'"):
        ds.samples("nope")


def test_imagefolder_classes_sorted_not_listing_order(tmp_path):
    for name in ["zebra", "apple", "Mango"]:
        _png(tmp_path / "train" / name / "a.png")
        _png(tmp_path / "test" / name / "a.png")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classnames == sorted(["zebra", "apple", "Mango"])
    assert ds.splits() == ["train", "test"]


def test_imagefolder_mismatched_classes_names_the_difference(tmp_path):
    for name in ["cat", "dog"]:
        _png(tmp_path / "train" / name / "a.png")
    _png(tmp_path / "test" / "cat" / "a.png")
    _png(tmp_path / "test" / "wolf" / "a.png")
    with pytest.raises(DatasetError) as err:
        load_dataset(f"imagefolder:{tmp_path}")
    msg = str(err.value)
    assert "test" in msg and "dog" in msg and "wolf" in msg and "cat" not in msg.split("test")[-1]


def test_imagefolder_missing_root_and_empty_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no train/val/test folders"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset("imagefolder:")


# ---------------------------------------------------------------------------------------------- CoOp split json
def _make_dtd(root: Path) -> Path:
    rows = {"train": [], "val": [], "test": []}
    classes = ["banded", "blotchy", "braided"]
    for label, cls in enumerate(classes):
        for split, n in (("train", 3), ("val", 1), ("test", 2)):
            for i in range(n):
                rel = f"{cls}/{cls}_{split}_{i}.jpg"
                _png(root / "dtd" / "images" / rel, color=(label * 80, i * 30, 5))
                rows[split].append([rel, label, cls])
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(rows))
    return root


def test_coop_dtd_samples_classnames_templates(tmp_path):
    root = _make_dtd(tmp_path)
    ds = load_dataset(f"coop:DTD@{root}")
    assert isinstance(ds, CoopDataset) and ds.name == "coop:DTD"
    assert ds.classnames == ["banded", "blotchy", "braided"]
    assert ds.templates == ["{} texture."]
    assert ds.splits() == ["train", "val", "test"]
    assert [len(ds.samples(s)) for s in ds.splits()] == [9, 3, 6]
    first = ds.samples("train")[0]
    assert first.id == "banded/banded_train_0.jpg" and first.label == 0
    assert Path(first.path) == root / "dtd" / "images" / "banded" / "banded_train_0.jpg"
    assert ds.load_image(first).size == (8, 8)
    # the folder name works as well as the registry name, case-insensitively
    assert load_dataset(f"coop:dtd@{root}").classnames == ds.classnames


def test_coop_split_file_errors(tmp_path):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="split_zhou_DescribableTextures.json"):
        load_dataset(f"coop:DTD@{tmp_path}")
    split = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split.write_text('{"train": [["a.jpg", 0, "x"]')  # cut off
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(f"coop:DTD@{tmp_path}")
    split.write_text(json.dumps({"train": [["a.jpg", 0]]}))
    with pytest.raises(DatasetError, match="relpath, label, classname"):
        load_dataset(f"coop:DTD@{tmp_path}")
    split.write_text(json.dumps({"train": [["a.jpg", 0, "x"], ["b.jpg", 2, "z"]]}))
    with pytest.raises(DatasetError, match=r"labels \[1\] never appear"):
        load_dataset(f"coop:DTD@{tmp_path}")
    split.write_text(json.dumps({"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]]}))
    with pytest.raises(DatasetError, match="label 0 is called both 'x' and 'y'"):
        load_dataset(f"coop:DTD@{tmp_path}")
    split.write_text(json.dumps({"train": []}))
    with pytest.raises(DatasetError, match="no samples"):
        load_dataset(f"coop:DTD@{tmp_path}")
    split.write_text(json.dumps([["a.jpg", 0, "x"]]))  # valid JSON, wrong shape
    with pytest.raises(DatasetError, match="split_zhou_DescribableTextures.json"):
        load_dataset(f"coop:DTD@{tmp_path}")


def test_coop_spec_errors(tmp_path):
    with pytest.raises(DatasetError, match="coop:NAME@ROOT"):
        load_dataset("coop:DTD")
    with pytest.raises(DatasetError, match="unknown CoOp dataset 'Nope'.*DTD"):
        load_dataset(f"coop:Nope@{tmp_path}")
    with pytest.raises(DatasetError, match="folder .*dtd not found"):
        load_dataset(f"coop:DTD@{tmp_path}")


# ---------------------------------------------------------------------------------------------- FGVCAircraft
def _make_fgvc(root: Path) -> Path:
    d = root / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (d).mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    counter = 1000
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        lines = []
        for v in variants:
            for _ in range(n):
                counter += 1
                _png(d / "images" / f"{counter:07d}.jpg")
                lines.append(f"{counter:07d} {v}")
        (d / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_fgvc_aircraft_txt_layout(tmp_path):
    root = _make_fgvc(tmp_path)
    ds = load_dataset(f"coop:FGVCAircraft@{root}")
    assert ds.classnames == ["707-320", "A300B4", "Cessna 172"]  # a variant with a space stays whole
    assert ds.templates == ["a photo of a {}, a type of aircraft."]
    assert [len(ds.samples(s)) for s in ("train", "val", "test")] == [6, 3, 3]
    assert [s.label for s in ds.samples("train")] == [0, 0, 1, 1, 2, 2]
    s = ds.samples("test")[-1]
    assert s.label == 2 and s.id.endswith(".jpg") and Path(s.path).is_file()


def test_fgvc_aircraft_errors(tmp_path):
    root = _make_fgvc(tmp_path)
    d = root / "fgvc_aircraft"
    (d / "images_variant_val.txt").unlink()
    with pytest.raises(DatasetError, match="images_variant_val.txt"):
        load_dataset(f"coop:FGVCAircraft@{root}")
    (d / "images_variant_val.txt").write_text("0000001 UnknownJet\n")
    with pytest.raises(DatasetError, match="UnknownJet"):
        load_dataset(f"coop:FGVCAircraft@{root}")
    (d / "variants.txt").unlink()
    with pytest.raises(DatasetError, match="variants.txt"):
        load_dataset(f"coop:FGVCAircraft@{root}")


# ---------------------------------------------------------------------------------------------- ImageNet family
WNIDS = ["n01440764", "n01443537", "n01484850"]
NAMES = ["tench", "goldfish", "great white shark"]


def _classnames_txt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES)))


def test_imagenet_layout_with_classnames(tmp_path):
    d = tmp_path / "imagenet"
    _classnames_txt(d / "classnames.txt")
    for w in WNIDS:
        for i in range(2):
            _png(d / "images" / "train" / w / f"{w}_{i}.JPEG")
        _png(d / "images" / "val" / w / f"val_{w}.JPEG")
    ds = load_dataset(f"coop:ImageNet@{tmp_path}")
    assert ds.classnames == NAMES  # multi-word names kept, label order = classnames.txt order
    assert ds.templates == IMAGENET_7
    assert ds.splits() == ["train", "test"]
    assert len(ds.samples("train")) == 6 and len(ds.samples("test")) == 3
    assert [s.label for s in ds.samples("test")] == [0, 1, 2]
    assert ds.samples("test")[2].id == f"val/{WNIDS[2]}/val_{WNIDS[2]}.JPEG"


def test_imagenet_missing_classnames(tmp_path):
    (tmp_path / "imagenet" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="classnames.txt"):
        load_dataset(f"coop:ImageNet@{tmp_path}")


def test_imagenet_shift_sets(tmp_path):
    _classnames_txt(tmp_path / "imagenet" / "classnames.txt")  # shared with ImageNet
    a = tmp_path / "imagenet-adversarial" / "imagenet-a"
    _png(a / WNIDS[0] / "x.jpg")
    _png(a / WNIDS[2] / "y.jpg")
    _png(a / WNIDS[2] / "z.jpg")
    ds = load_dataset(f"coop:ImageNetA@{tmp_path}")
    assert ds.splits() == ["test"] and ds.classnames == NAMES
    assert [s.label for s in ds.samples("test")] == [0, 2, 2]  # a missing class folder is fine
    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for label in range(3):
        _png(v2 / str(label) / f"{label}.jpeg")
    ds2 = load_dataset(f"coop:ImageNetV2@{tmp_path}")
    assert [s.label for s in ds2.samples("test")] == [0, 1, 2]
    assert ds2.samples("test")[1].id == "test/1/1.jpeg"
    with pytest.raises(DatasetError, match="no split 'train'"):
        ds2.samples("train")


# ---------------------------------------------------------------------------------------------- CIFAR-10 batches
def _cifar_batches(root: Path, n_train: int = 2, n_test: int = 3) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n)]
        with open(root / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, fh)
    return root


def test_cifar10_python_batches(tmp_path):
    root = _cifar_batches(tmp_path / "cifar-10-batches-py")
    ds = load_dataset(f"cifar10:{root}")
    assert ds.classnames == CIFAR10_CLASSES and ds.templates == CIFAR
    assert len(ds.samples("train")) == 10 and len(ds.samples("test")) == 3
    # the parent folder of cifar-10-batches-py works too
    assert len(load_dataset(f"cifar10:{tmp_path}").samples("test")) == 3
    # channel-major rows decode to the right pixels
    with open(root / "test_batch", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    img = np.asarray(ds.load_image(ds.samples("test")[1]))
    assert img.shape == (32, 32, 3)
    assert np.array_equal(img, raw[b"data"][1].reshape(3, 32, 32).transpose(1, 2, 0))
    assert ds.samples("test")[1].label == raw[b"labels"][1]


def test_cifar10_missing_batch(tmp_path):
    root = _cifar_batches(tmp_path / "c")
    (root / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset(f"cifar10:{root}")
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset("cifar10:")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}")


def test_cifar10_malformed_batch(tmp_path):
    root = _cifar_batches(tmp_path / "c")
    (root / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset(f"cifar10:{root}")


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
def _idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def _fashion(root: Path, n_train: int = 6, n_test: int = 4) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_fashion_mnist_idx(tmp_path):
    root = _fashion(tmp_path / "fm")
    ds = load_dataset(f"fashion-mnist:{root}")
    assert ds.classnames == FASHION_CLASSES
    assert ds.splits() == ["train", "test"]
    assert len(ds.samples("train")) == 6 and len(ds.samples("test")) == 4
    assert [s.label for s in ds.samples("test")] == [0, 1, 2, 3]
    img = ds.load_image(ds.samples("train")[0])
    assert img.mode == "RGB" and img.size == (28, 28)


@pytest.mark.parametrize("damage", ["truncated-gzip", "truncated-payload", "short-header", "garbage"])
def test_fashion_mnist_damaged_file(tmp_path, damage):
    root = _fashion(tmp_path / "fm")
    f = root / "t10k-images-idx3-ubyte.gz"
    if damage == "truncated-gzip":
        f.write_bytes(f.read_bytes()[:60])
    elif damage == "truncated-payload":
        _idx(f, np.zeros((4, 28, 28)))
        raw = gzip.decompress(f.read_bytes())[:-100]
        f.write_bytes(gzip.compress(raw))
    elif damage == "short-header":
        f.write_bytes(gzip.compress(b"\x00\x00"))
    else:
        data = bytearray(f.read_bytes())
        data[20:60] = b"\xff" * 40  # corrupt the deflate stream, keep the gzip header
        f.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        load_dataset(f"fashion-mnist:{root}")


def test_fashion_mnist_image_label_count_mismatch(tmp_path):
    root = _fashion(tmp_path / "fm")
    _idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(DatasetError, match="t10k"):
        load_dataset(f"fashion-mnist:{root}")


def test_fashion_mnist_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(f"fashion-mnist:{tmp_path}")


def test_fashion_mnist_installed():
    if not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    ds = load_dataset("fashion-mnist")
    assert len(ds.samples("train")) == 60000 and len(ds.samples("test")) == 10000
    assert ds.load_image(ds.samples("test")[0]).size == (28, 28)


# ---------------------------------------------------------------------------------------------- digits, unknown
def test_digits():
    ds = load_dataset("digits")
    n_train, n_test = len(ds.samples("train")), len(ds.samples("test"))
    assert n_train + n_test == 1797 and abs(n_test - 1797 / 3) < 2
    assert ds.classnames == [str(i) for i in range(10)]
    assert {s.label for s in ds.samples("test")} == set(range(10))
    img = np.asarray(ds.load_image(ds.samples("train")[0]))
    assert img.shape == (8, 8, 3) and img.max() <= 255
    assert [s.id for s in load_dataset("digits").samples("test")] == [s.id for s in ds.samples("test")]


def test_unknown_spec_lists_forms():
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist:/data")
    for form in DATASET_SPECS:
        assert form in str(err.value)


# ---------------------------------------------------------------------------------------------- real shared data
def test_shared_cifar10_folder(shared_data):
    root = shared_data / "cifar10"
    if not root.is_dir():
        pytest.skip("shared cifar10 missing")
    for spec in (f"cifar10:{root}", f"imagefolder:{root}"):
        ds = load_dataset(spec)
        assert isinstance(ds, ImageFolderDataset)
        assert len(ds.classnames) == 10 and ds.classnames == sorted(CIFAR10_CLASSES)
        assert len(ds.samples("train")) == 2000 and len(ds.samples("test")) == 5000
    assert load_dataset(f"cifar10:{root}").templates == CIFAR
    assert load_dataset(f"imagefolder:{root}").templates == ["a photo of a {}."]
    assert load_dataset(f"cifar10:{root}").load_image(ds.samples("test")[0]).size == (32, 32)


# ---------------------------------------------------------------------------------------------- sampler
def _ids(samples):
    return [s.id for s in samples]


@pytest.fixture
def sampler_folder(tmp_path) -> Path:
    return make_tiny_imagefolder(tmp_path / "s", classes=3, train=10, test=3, size=4)


def test_sampler_same_seed_same_ids_across_objects(sampler_folder):
    a = fewshot_split(load_dataset(f"imagefolder:{sampler_folder}"), shots=4, seed=3)
    b = fewshot_split(load_dataset(f"imagefolder:{sampler_folder}"), shots=4, seed=3)
    assert _ids(a.support) == _ids(b.support) and _ids(a.val) == _ids(b.val)
    c = fewshot_split(load_dataset(f"imagefolder:{sampler_folder}"), shots=4, seed=4)
    assert _ids(c.support) != _ids(a.support)


def test_sampler_independent_of_listing_order(sampler_folder, monkeypatch):
    ds = load_dataset(f"imagefolder:{sampler_folder}")
    ref = fewshot_split(ds, shots=2, seed=0)
    shuffled = ImageFolderDataset(sampler_folder)
    orig = shuffled.samples("train")
    perm = np.random.default_rng(5).permutation(len(orig))
    monkeypatch.setattr(shuffled, "_cache", {**shuffled._cache, "train": [orig[i] for i in perm]})
    assert _ids(shuffled.samples("train")) != _ids(orig)
    got = fewshot_split(shuffled, shots=2, seed=0)
    assert _ids(got.support) == _ids(ref.support) and _ids(got.val) == _ids(ref.val)


def test_sampler_no_val_split_draws_val_from_train_rest(sampler_folder):
    ds = load_dataset(f"imagefolder:{sampler_folder}")
    for shots, n_val in ((1, 1), (2, 2), (8, 4)):
        sp = fewshot_split(ds, shots=shots, seed=1)
        assert sp.shots == shots and sp.seed == 1
        for c in range(3):
            sup = [s for s in sp.support if s.label == c]
            val = [s for s in sp.val if s.label == c]
            assert len(sup) == shots and len(set(_ids(sup))) == shots  # no replacement: 10 >= K
            assert len(val) == min(n_val, 10 - shots) and len(set(_ids(val))) == len(val)
        assert not set(_ids(sp.support)) & set(_ids(sp.val))
        assert all(s.id.startswith("train/") for s in sp.support + sp.val)
        assert "not in the support set" in sp.val_rule and "no val split" in sp.val_rule
        assert _ids(sp.test) == _ids(ds.samples("test"))  # test untouched


def test_sampler_with_val_split(tmp_path):
    root = make_tiny_imagefolder(tmp_path / "v", classes=2, train=9, test=2, val=5, size=4)
    ds = load_dataset(f"imagefolder:{root}")
    sp = fewshot_split(ds, shots=8, seed=0)
    assert all(s.id.startswith("train/") for s in sp.support)
    assert all(s.id.startswith("val/") for s in sp.val)
    for c in range(2):
        assert len([s for s in sp.val if s.label == c]) == 4  # min(K, 4)
    assert "from the val split" in sp.val_rule
    assert _ids(sp.test) == _ids(ds.samples("test"))
    sp2 = fewshot_split(ds, shots=2, seed=0)
    assert len(sp2.val) == 2 * 2


def test_sampler_replacement_only_when_class_too_small(tmp_path):
    for i in range(6):
        _png(tmp_path / "train" / "big" / f"{i}.png")
    for i in range(2):
        _png(tmp_path / "train" / "small" / f"{i}.png")
    _png(tmp_path / "val" / "big" / "v.png")
    _png(tmp_path / "val" / "small" / "v.png")
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(UserWarning, match=r"\{'small': 2\}.*replacement"):
        sp = fewshot_split(ds, shots=4, seed=0)
    big = _ids([s for s in sp.support if s.label == 0])
    small = _ids([s for s in sp.support if s.label == 1])
    assert len(big) == 4 and len(set(big)) == 4
    assert len(small) == 4 and set(small) <= {"train/small/0.png", "train/small/1.png"}
    assert len(set(small)) < 4  # drawn with replacement
    assert sp.test == []  # no test split: nothing to evaluate, nothing invented


def test_sampler_errors(tmp_path):
    _png(tmp_path / "train" / "a" / "0.png")
    (tmp_path / "train" / "b").mkdir()
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(DatasetError, match="no training image.*'b'"):
        fewshot_split(ds, shots=1, seed=0)
    with pytest.raises(UsageError, match="shots"):
        fewshot_split(ds, shots=0, seed=0)
    test_only = tmp_path / "t2"
    _png(test_only / "test" / "a" / "0.png")
    with pytest.raises(DatasetError, match="no train split"):
        fewshot_split(ImageFolderDataset(test_only), shots=1, seed=0)


def test_sampler_array_dataset_deterministic():
    ds = load_dataset("digits")
    a, b = fewshot_split(ds, 2, seed=7), fewshot_split(load_dataset("digits"), 2, seed=7)
    assert _ids(a.support) == _ids(b.support)
    assert len(a.support) == 20 and isinstance(a.support[0], Sample)


def test_sampler_degenerate_datasets(tmp_path):
    one = tmp_path / "one"
    for i in range(3):
        _png(one / "train" / "only" / f"{i}.png")
    _png(one / "test" / "only" / "t.png")
    with pytest.raises(DatasetError, match="1 class.*at least 2"):
        fewshot_split(ImageFolderDataset(one), shots=1, seed=0)
    # a class with exactly K images and no val split: nothing left for validation -> clear error with a fix
    exact = tmp_path / "exact"
    for cls, n in (("a", 5), ("b", 2)):
        for i in range(n):
            _png(exact / "train" / cls / f"{i}.png")
    with pytest.raises(DatasetError, match=r"no validation image for class 'b'.*2 training image") as err:
        fewshot_split(ImageFolderDataset(exact), shots=2, seed=0)
    assert "--shots" in err.value.hint
    # fewer images than K: CoOp's draw with replacement, announced by a warning
    with pytest.warns(UserWarning, match="fewer than 4 training images.*replacement"):
        sp = fewshot_split(_with_val(tmp_path / "small"), shots=4, seed=0)
    assert len(sp.support) == 8
    with pytest.raises(UsageError):
        fewshot_split(ImageFolderDataset(exact), shots=True, seed=0)


def _with_val(root: Path) -> ImageFolderDataset:
    for cls, n in (("a", 6), ("b", 2)):
        for i in range(n):
            _png(root / "train" / cls / f"{i}.png")
        _png(root / "val" / cls / "v.png")
    return ImageFolderDataset(root)


def test_sampler_duplicate_train_entries(tmp_path):
    root = _make_dtd(tmp_path)
    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    rows = json.loads(split.read_text())
    rows["train"].append(rows["train"][0])
    split.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match="more than once"):
        fewshot_split(load_dataset(f"coop:DTD@{root}"), shots=1, seed=0)


def test_imagefolder_split_without_class_folders_and_root_is_file(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class folders"):
        load_dataset(f"imagefolder:{tmp_path / 'd'}")
    (tmp_path / "f").write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        load_dataset(f"imagefolder:{tmp_path / 'f'}")


# ---------------------------------------------------------------------------------------------- paths stay inside
@pytest.mark.parametrize("entry, why", [
    ("../../outside.png", r"'\.\.'"),
    ("banded/../../../outside.png", r"'\.\.'"),
    ("/etc/hostname", "absolute"),
    ("C:\\Windows\\x.png", "absolute"),
    ("", "not a relative file path"),
])
def test_coop_split_entries_cannot_leave_the_image_folder(tmp_path, entry, why):
    root = _make_dtd(tmp_path)
    _png(tmp_path / "outside.png")
    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    rows = json.loads(split.read_text())
    rows["test"].append([entry, 0, "banded"])
    split.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match=why) as err:
        load_dataset(f"coop:DTD@{root}")
    assert "split_zhou_DescribableTextures.json" in str(err.value)


def test_coop_symlinks_leading_out_are_refused_inside_ones_allowed(tmp_path):
    root = _make_dtd(tmp_path / "r")
    secret = _png(tmp_path / "secret" / "s.png")
    images = root / "dtd" / "images"
    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    rows = json.loads(split.read_text())
    (images / "banded" / "inside_link.jpg").symlink_to(images / "banded" / "banded_train_0.jpg")
    rows["test"].append(["banded/inside_link.jpg", 0, "banded"])
    split.write_text(json.dumps(rows))
    assert len(load_dataset(f"coop:DTD@{root}").samples("test")) == 7  # a link that stays inside is fine
    (images / "banded" / "leak.jpg").symlink_to(secret)
    rows["test"].append(["banded/leak.jpg", 0, "banded"])
    split.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match="symlink.*outside"):
        load_dataset(f"coop:DTD@{root}")
    rows["test"].pop()
    (images / "linkdir").symlink_to(secret.parent, target_is_directory=True)
    rows["test"].append(["linkdir/s.png", 0, "banded"])
    split.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match="resolves outside"):
        load_dataset(f"coop:DTD@{root}")


def test_coop_split_file_not_utf8(tmp_path):
    root = _make_dtd(tmp_path)
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset(f"coop:DTD@{root}")


def test_fgvc_and_imagenet_names_cannot_leave_the_folder(tmp_path):
    root = _make_fgvc(tmp_path / "f")
    d = root / "fgvc_aircraft"
    (d / "images_variant_test.txt").write_text("../../../etc/passwd 707-320\n")
    with pytest.raises(DatasetError, match="images_variant_test.txt.*'\\.\\.'"):
        load_dataset(f"coop:FGVCAircraft@{root}")
    inet = tmp_path / "i" / "imagenet"
    inet.mkdir(parents=True)
    (inet / "classnames.txt").write_text("../../x tench\n")
    (inet / "images" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="single folder name"):
        load_dataset(f"coop:ImageNet@{tmp_path / 'i'}")


# ---------------------------------------------------------------------------------------------- CIFAR-10: no code runs
class _Touch:
    """Unpickling this calls ``pathlib.Path.touch`` on ``target``: it would create a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("where", ["value", "top", "label"])
def test_cifar10_batch_with_code_is_refused_and_runs_nothing(tmp_path, where):
    root = _cifar_batches(tmp_path / "c")
    marker = tmp_path / "pwned"
    data = np.zeros((2, 3072), dtype=np.uint8)
    payload = {"value": {b"data": data, b"labels": [0, 1], b"batch_label": _Touch(marker)},
               "top": _Touch(marker),
               "label": {b"data": data, b"labels": [0, _Touch(marker)]}}[where]
    (root / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    # control: the same bytes through plain pickle do create the file
    pickle.loads((root / "test_batch").read_bytes())
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DatasetError, match="refusing to load"):
        load_dataset(f"cifar10:{root}")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_batch_every_pickle_protocol_of_plain_arrays_loads(tmp_path, protocol):
    root = _cifar_batches(tmp_path / "c")
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 1, 4, 1], b"data": data,
             b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}
    (root / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    ds = load_dataset(f"cifar10:{root}")
    assert [s.label for s in ds.samples("test")] == [3, 1, 4, 1]
    assert np.array_equal(np.asarray(ds.load_image(ds.samples("test")[2])),
                          data[2].reshape(3, 32, 32).transpose(1, 2, 0))


@pytest.mark.parametrize("payload, match", [
    ([1, 2, 3], "holds a list"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "no 'data' or 'labels'"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"extra": 1}, "unexpected keys"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"\(N, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, "0..9"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
    ({b"data": np.zeros((2, 3072), object), b"labels": [0, 1]}, "non-plain|refusing"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "non-plain"),
])
def test_cifar10_batch_structure_is_checked(tmp_path, payload, match):
    root = _cifar_batches(tmp_path / "c")
    (root / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DatasetError, match=match):
        load_dataset(f"cifar10:{root}")


def test_shots_no_class_can_supply_are_refused(tmp_path):
    from xmodal.data import check_shots

    for cls, n in (("a", 5), ("b", 3)):
        for i in range(n):
            _png(tmp_path / "train" / cls / f"{i}.png")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(UsageError, match="no class has 6 training images.*largest has 5") as err:
        fewshot_split(ds, shots=6, seed=0)
    # validation comes from the train images here: the hint's value leaves class b one, so it then works
    assert "--shots 2" in err.value.hint and "'b'" in err.value.hint
    assert fewshot_split(ds, shots=2, seed=0).val  # the suggested value works
    with pytest.raises(UsageError, match="no class has 6") as err:  # fit: validation by k-fold CV instead
        fewshot_split(ds, shots=6, seed=0, if_no_val="empty")
    assert "--shots 5" in err.value.hint
    with pytest.raises(UsageError, match="no class has 8"):
        check_shots(ds, [1, 2, 8, 16])
    assert set(check_shots(ds, [1, 5])) == {0, 1}
    with pytest.raises(UsageError):
        check_shots(ds, [1, -2])
