"""Save/load contract of every registered few-shot method: fit → (tensors, JSON) → files → rebuild → same scores.

The method list is read from the registry at collection time, so a method added later is tested too
(and fails here if its fitted state cannot travel through safetensors + JSON).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from xmodal.errors import InputError, UsageError
from xmodal.fewshot import available_methods, create_method
from xmodal.fewshot._synthetic import make_task
from xmodal.fewshot.base import FewShotMethod
from xmodal.fewshot.state import constructor_params

METHODS = available_methods()


@pytest.fixture(scope="module")
def task():
    return make_task(num_classes=4, dim=32, shots=4, val_per_class=3, test_per_class=10, views=2, seed=3)


def _round_trip(method: FewShotMethod, tmp_path) -> FewShotMethod:
    tensors, meta = method.get_state()
    text = json.dumps(meta, allow_nan=False)          # strict JSON: no NaN/inf, no objects
    save_file(tensors, str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(text)
    return FewShotMethod.from_state(load_file(str(tmp_path / "state.safetensors")),
                                    json.loads((tmp_path / "state.json").read_text()), device="cpu")


def test_registry_is_not_empty():
    assert {"zeroshot", "tip-adapter", "xmadapter"} <= set(METHODS)


# tower methods on the tiny backbone (whose width, 32, is the synthetic task's), with short schedules
TOWER_PARAMS = {"coop": {"epochs": 2}, "cocoop": {"epochs": 1}, "clip-lora": {"iterations": 4, "batch_size": 4}}


@pytest.fixture(scope="module")
def image_task(tmp_path_factory):
    """(support, val, test, text, backbone, pixels) of a tiny generated image folder, for image-tower methods."""
    from xmodal.backbones import load_backbone
    from xmodal.bench.testing import make_tiny_imagefolder
    from xmodal.data import fewshot_split, load_dataset
    from xmodal.feature_bank import FeatureBank
    from xmodal.fewshot.pixels import PixelSource

    root = tmp_path_factory.mktemp("state-images")
    ds = load_dataset(f"imagefolder:{make_tiny_imagefolder(root / 'imgs', classes=3, train=6, test=3)}")
    bb = load_backbone("tiny:clip", engine="torch")
    support, val, test = FeatureBank(bb, ds, augment_views=0, cache_dir=str(root / "c"), device="cpu").episode(
        fewshot_split(ds, 2, 0))
    text = FeatureBank(bb, ds, augment_views=0, cache_dir=str(root / "c"), device="cpu").text_classifier()
    return support, val, test, text, bb, PixelSource(ds, bb)


@pytest.mark.parametrize("name", METHODS)
def test_round_trip_gives_identical_scores(name, task, image_task, tmp_path, one_thread):
    support, val, test, text = task
    method = create_method(name, seed=0, device="cpu", **TOWER_PARAMS.get(name, {}))
    bind = None
    if method.needs_backbone:
        from xmodal.backbones import load_backbone

        bind = (load_backbone("tiny:clip", engine="torch"), None)
    if method.needs_images:
        support, val, test, text, bb, pixels = image_task
        bind = (bb, pixels)
    if bind:
        method.bind_backbone(*bind)

    def scores(m):
        return m.image_scores(bind[1](test.ids)) if m.needs_images else m.decision_scores(test.features.clone())

    torch.manual_seed(0)
    method.fit(support, val, text.clone())
    before = scores(method)
    loaded = _round_trip(method, tmp_path)
    assert type(loaded) is type(method) and loaded.name == name
    if bind:
        loaded.bind_backbone(*bind)
    after = scores(loaded)
    assert after.shape == before.shape
    assert float((after - before).abs().max()) <= 1e-6
    assert torch.equal(after.argmax(1), before.argmax(1))
    assert loaded.selected_ == json.loads(json.dumps(method.selected_))
    # constructor parameters come back as given (the device is chosen at load time)
    assert set(constructor_params(loaded)) == set(constructor_params(method))


def test_state_of_a_tensor_parameter_round_trips(task, tmp_path, one_thread):
    support, val, test, text = task
    ext = torch.randn(text.shape[0], 16, generator=torch.Generator().manual_seed(1))
    method = create_method("xmadapter", seed=0, class_text_features=ext, text_source="ext", epochs=2).fit(
        support, val, text)
    loaded = _round_trip(method, tmp_path)
    assert torch.equal(loaded.class_text_features, ext)
    assert float((loaded.decision_scores(test.features) - method.decision_scores(test.features)).abs().max()) <= 1e-6


def test_unfitted_method_refuses_to_save():
    with pytest.raises(UsageError, match="not fitted"):
        create_method("tip-adapter").get_state()


class _Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))


class _NoCodec(FewShotMethod):
    name = "no-codec"

    def fit(self, support, val, text_classifier):
        self.net_ = _Opaque()
        return self

    def decision_scores(self, features):
        return features


def test_module_without_codec_fails_at_save_time_naming_the_fix(task):
    support, val, _, text = task
    with pytest.raises(UsageError, match="_Opaque") as info:
        _NoCodec().fit(support, val, text).get_state()
    assert "register_module_codec" in info.value.hint


def test_unknown_method_and_missing_tensor_are_clear_errors(task, tmp_path):
    support, val, _, text = task
    tensors, meta = create_method("gda").fit(support, val, text).get_state()
    with pytest.raises(InputError, match="not registered"):
        FewShotMethod.from_state(tensors, {**meta, "method": "no-such-method"})
    missing = dict(tensors)
    missing.pop(next(iter(missing)))
    with pytest.raises(InputError, match="lacks tensor"):
        FewShotMethod.from_state(missing, meta)
    with pytest.raises(InputError, match="version"):
        FewShotMethod.from_state(tensors, {**meta, "state_version": 99})


@pytest.mark.parametrize("params", [
    {"gamma_mode": "learned"}, {"gamma_mode": "per-sample"}, {"gamma_mode": "fixed", "gamma": 0.3},
    {"net_arch": "linear", "train_keys": False},
], ids=["learned", "per-sample", "fixed", "linear-frozen-keys"])
def test_xmadapter_variants_round_trip(params, task, tmp_path, one_thread):
    """Every γ module and network layout of the cache model travels through the codec."""
    support, val, test, text = task
    method = create_method("xmadapter", seed=0, epochs=2, **params).fit(support, val, text)
    loaded = _round_trip(method, tmp_path)
    assert float((loaded.decision_scores(test.features) - method.decision_scores(test.features)).abs().max()) <= 1e-6


class _TorchNet(FewShotMethod):
    """A method whose fitted module has no codec: stored by structure (torch.nn classes only)."""

    name = "torch-net"

    def fit(self, support, val, text_classifier):
        torch.manual_seed(0)
        self.net_ = nn.Sequential(nn.Linear(support.dim, 8), nn.ReLU(), nn.Linear(8, text_classifier.shape[0]))
        self.net_[0].register_buffer("scale", torch.tensor(2.0), persistent=False)
        self.net_.eval()
        return self

    def decision_scores(self, features):
        with torch.no_grad():
            return self.net_(features) * self.net_[0].scale


def test_module_without_codec_is_stored_by_structure(task, tmp_path):
    from xmodal.bench.testing import registered

    support, val, test, text = task
    with registered("torch-net", _TorchNet):
        method = _TorchNet().fit(support, val, text)
        loaded = _round_trip(method, tmp_path)
    assert torch.equal(loaded.decision_scores(test.features), method.decision_scores(test.features))
    assert not loaded.net_.training and "scale" in loaded.net_[0]._non_persistent_buffers_set


def test_saved_module_class_outside_xmodal_and_torch_is_refused(task):
    from xmodal.bench.testing import registered

    support, val, _, text = task
    with registered("torch-net", _TorchNet):
        tensors, meta = _TorchNet().fit(support, val, text).get_state()
        evil = json.loads(json.dumps(meta).replace("torch.nn.modules.container:Sequential", "os:system"))
        with pytest.raises(InputError, match="cannot be rebuilt"):
            FewShotMethod.from_state(tensors, evil)
