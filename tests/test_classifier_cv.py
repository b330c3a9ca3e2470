"""K photos per class and no validation set: hyper-parameters chosen by k-fold CV over the support images.

Conformance over the registry: every method is cross-fitted on a tiny synthetic task; a spy on ``fit`` proves
that no member trains on the fold it chooses its settings on, and the members survive save/load. The
classifier path uses all K images of a real (tiny) ImageFolder, and a dataset error arrives before any
backbone is built.
"""
from __future__ import annotations

import json

import pytest
import torch

from xmodal import FewShotClassifier, available_methods
from xmodal.classifier.crossfit import (CrossFitted, fit_crossfitted, method_from_state, n_folds,
                                        stratified_folds)
from xmodal.errors import DatasetError
from xmodal.fewshot import create_method
from xmodal.fewshot._synthetic import make_task

FAST = {"tip-adapter-f": {"epochs": 3}, "xmadapter": {"epochs": 3}, "clip-adapter": {"epochs": 3},
        "ape-t": {"epochs": 3}, "lp++": {"epochs": 20}, "coop": {"epochs": 2}, "cocoop": {"epochs": 1},
        "clip-lora": {"iterations": 3}}
FEATURE_METHODS = [m for m in available_methods() if not getattr(create_method(m), "needs_backbone", False)]


def _spy_on_fit(name: str, monkeypatch) -> list[tuple[set, set]]:
    """Record (training ids, validation ids) of every fit of method ``name``'s class."""
    seen: list[tuple[set, set]] = []
    klass = type(create_method(name))
    original = klass.fit

    def spy(self, train, val, text_classifier):
        seen.append((set(train.ids), set(val.ids)))
        assert val.views is None  # validation images are scored as they are, like a real val set
        return original(self, train, val, text_classifier)

    monkeypatch.setattr(klass, "fit", spy)
    return seen


def _assert_folds_never_train_their_selection(seen, folds, support_ids) -> None:
    assert len(seen) == len(folds)
    for (train_ids, val_ids), fold in zip(seen, folds):
        assert val_ids == set(fold) and not train_ids & val_ids
        assert train_ids | val_ids == set(support_ids)


@pytest.fixture(scope="module")
def task():
    return make_task(num_classes=3, dim=16, shots=4, val_per_class=2, test_per_class=10, views=2, seed=5)


def test_folds_are_stratified_disjoint_and_cover_every_image(task):
    support = task[0]
    k = n_folds(support)
    folds = stratified_folds(support, k, seed=0)
    assert k == 4 and len(folds) == 4
    flat = [i for f in folds for i in f]
    assert sorted(flat) == sorted(set(support.ids)) and len(flat) == len(set(flat))
    label = dict(zip(support.ids, support.labels.tolist()))
    for fold in folds:  # 4 images of each of 3 classes dealt into 4 folds: one of each class per fold
        assert sorted(label[i] for i in fold) == [0, 1, 2]
    assert stratified_folds(support, k, seed=0) == folds and stratified_folds(support, k, seed=1) != folds


def test_one_image_in_a_class_is_a_clear_error(task):
    support = task[0].subset([task[0].ids[0], *task[0].ids[4:]])  # class 0 keeps one image
    with pytest.raises(DatasetError, match="class 'class0' has 1 distinct training image") as err:
        n_folds(support)
    assert "add images" in err.value.hint


@pytest.mark.parametrize("name", FEATURE_METHODS)  # tower methods need a backbone: the classifier test below
def test_every_method_cross_fits_without_training_on_its_validation_fold(name, task, one_thread, monkeypatch):
    support, _, test, text = task
    seen = _spy_on_fit(name, monkeypatch)
    members, oof_probs, oof_labels = fit_crossfitted(lambda: create_method(name, seed=0, **FAST.get(name, {})),
                                                     support, text, seed=0)
    monkeypatch.undo()
    folds = members.folds
    assert len(members.members) == 4
    _assert_folds_never_train_their_selection(seen, folds, support.ids)
    assert oof_probs.shape == (len(set(support.ids)), 3) and torch.allclose(oof_probs.sum(1), torch.ones(12))
    assert members.selected_["selection"] == "k-fold CV over support, k=4"
    assert len(members.selected_["per_fold"]) == 4
    # the classifier is the members' mean probability; it survives save/load (JSON + tensors) exactly
    scores = members.decision_scores(test.features)
    mean = torch.stack([m.decision_scores(test.features).softmax(-1) for m in members.members]).mean(0)
    assert torch.allclose(scores.softmax(-1), mean, atol=1e-6)
    tensors, meta = members.get_state()
    loaded = method_from_state(dict(tensors), json.loads(json.dumps(meta, allow_nan=False)))
    assert isinstance(loaded, CrossFitted) and loaded.name == name
    assert float((loaded.decision_scores(test.features) - scores).abs().max()) <= 1e-6


@pytest.fixture(scope="module")
def k_folder(tmp_path_factory):
    from xmodal.bench.testing import make_tiny_imagefolder

    base = tmp_path_factory.mktemp("kfold")
    return make_tiny_imagefolder(base / "imgs", classes=3, train=4, test=2), base / "cache"


@pytest.mark.parametrize("name", available_methods())
def test_every_registered_method_fits_k_images_without_val_through_the_classifier(name, k_folder, tmp_path,
                                                                                    monkeypatch, one_thread):
    root, cache = k_folder
    seen = _spy_on_fit(name, monkeypatch)
    clf = FewShotClassifier(backbone="tiny:clip", method=name, shots=4, seed=0, cache_dir=cache, device="cpu",
                            augment_views=1, **FAST.get(name, {})).fit(root)
    monkeypatch.undo()
    assert clf.selection_ == "k-fold CV over support, k=4"
    ids = [i for fold in clf.method_.folds for i in fold]
    _assert_folds_never_train_their_selection(seen, clf.method_.folds, ids)
    loaded = FewShotClassifier.load(clf.save(tmp_path / name), device="cpu", cache_dir=cache)
    x = str(root / "test")
    assert float((loaded.predict_proba(x) - clf.predict_proba(x)).abs().max()) <= 1e-5
    assert loaded.card()["method"] == name and loaded.card()["selection"] == clf.selection_


def test_k_images_per_class_and_no_val_folder_uses_all_k(tmp_path, one_thread):
    from xmodal.bench.testing import make_tiny_imagefolder

    root = make_tiny_imagefolder(tmp_path / "imgs", classes=3, train=4, test=3)
    cache = tmp_path / "cache"
    clf = FewShotClassifier(backbone="tiny:clip", method="tip-adapter", shots=4, seed=0, cache_dir=cache,
                            device="cpu", augment_views=2).fit(root)
    assert clf.selection_ == "k-fold CV over support, k=4" == clf.card()["selection"]
    ds = clf.info_["dataset"]
    assert ds["n_support"] == 12 and ds["n_val"] == 12 and ds["selection"] == clf.selection_
    assert clf.info_["validation"]["n"] == 12 and 0.0 <= clf.val_accuracy_ <= 1.0
    loaded = FewShotClassifier.load(clf.save(tmp_path / "m"), device="cpu", cache_dir=cache)
    x = str(root / "test")
    assert float((loaded.predict_proba(x) - clf.predict_proba(x)).abs().max()) <= 1e-6
    assert loaded.selection_ == clf.selection_ and loaded.card()["selection"] == clf.selection_
    # with a val/ folder the validation set is used, as before
    root2 = make_tiny_imagefolder(tmp_path / "imgs2", classes=3, train=4, test=3, val=2)
    clf2 = FewShotClassifier(backbone="tiny:clip", method="tip-adapter", shots=4, seed=0, cache_dir=cache,
                             device="cpu", augment_views=0).fit(root2)
    assert clf2.selection_ == "validation set" and clf2.info_["dataset"]["n_val"] == 6


def test_dataset_errors_come_before_any_backbone_is_built(tmp_path, monkeypatch):
    import xmodal.backbones as backbones
    from xmodal.bench.testing import make_tiny_imagefolder

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone factory was called before the dataset was checked")

    monkeypatch.setattr(backbones, "load_backbone", refuse)
    with pytest.raises(DatasetError, match="does not exist"):
        FewShotClassifier(backbone="tiny:clip", method="tip-adapter", shots=4).fit(f"imagefolder:{tmp_path}/nope")
    root = make_tiny_imagefolder(tmp_path / "one", classes=2, train=1, test=1)
    with pytest.raises(DatasetError, match="1 distinct training image|1 training image"):
        FewShotClassifier(backbone="tiny:clip", method="tip-adapter", shots=1).fit(root)
    with pytest.raises(Exception, match="no class has 5 training images"):
        FewShotClassifier(backbone="tiny:clip", method="tip-adapter", shots=5).fit(root)


def test_cli_fit_with_k_images_per_class_and_shots_k(tmp_path, monkeypatch):
    """The README flow on K photos per class and no val/: `xmodal fit --shots K` works and says how it chose;
    a wrong folder is reported before any backbone is built."""
    from typer.testing import CliRunner

    import xmodal.backbones as backbones
    from xmodal.bench.testing import make_tiny_imagefolder
    from xmodal.cli import app

    root = make_tiny_imagefolder(tmp_path / "imgs", classes=3, train=4, test=2)
    args = ["fit", "--backbone", "tiny:clip", "--data", str(root), "--shots", "4", "--method", "tip-adapter",
            "--out", str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c"), "--device", "cpu", "--augment-views", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "selection: k-fold CV over support, k=4" in res.stdout and "out-of-fold top-1" in res.stdout
    doc = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)
    assert doc["selection"] == "k-fold CV over support, k=4" and doc["n_support"] == 12

    calls: list[str] = []
    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: calls.append("built") or 1 / 0)
    res = CliRunner().invoke(app, ["fit", "--backbone", "tiny:clip", "--data", str(tmp_path / "no-such-folder"),
                                   "--shots", "16", "--out", str(tmp_path / "m2"), "--json"])
    assert res.exit_code == 3 and "no-such-folder" in json.loads(res.stdout)["error"] and calls == []


def test_dataset_checks_import_no_torch(tmp_path):
    """`xmodal fit` checks the data with torch-free code before importing the classifier: a fresh interpreter
    reaches the dataset error without torch in sys.modules (so the error does not wait for it)."""
    import subprocess
    import sys

    from xmodal.bench.testing import make_tiny_imagefolder

    one = make_tiny_imagefolder(tmp_path / "one", classes=2, train=1, test=1)
    code = ("import sys\n"
            "from xmodal.classifier.plan import plan_split, resolve_dataset\n"
            "from xmodal.errors import XmodalError\n"
            "for data, shots in ((sys.argv[1], 16), (sys.argv[2], 1), (sys.argv[2], 5)):\n"
            "    try:\n"
            "        plan_split(resolve_dataset(data)[0], shots, 0)\n"
            "    except XmodalError as exc:\n"
            "        print(type(exc).__name__, exc)\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nope"), str(one)], capture_output=True,
                         text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0].startswith("DatasetError") and "nope" in lines[0]
    assert lines[1].startswith("DatasetError") and "1 distinct training image" in lines[1]
    assert lines[2].startswith("UsageError") and "no class has 5 training images" in lines[2]
    assert lines[3] == "no torch"
