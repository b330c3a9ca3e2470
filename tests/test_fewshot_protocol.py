"""Protocol guards for every few-shot method: val-only selection, no test labels, determinism, bad input."""
import inspect
import json

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import ShapeError
from xmodal.featureset import FeatureSet
from xmodal.fewshot import FewShotMethod, available_methods, create_method
from xmodal.fewshot._synthetic import make_task

# small, fast settings for the trained methods; defaults elsewhere
FAST = {"tip-adapter-f": {"epochs": 5}, "xmadapter": {"epochs": 5}, "clip-adapter": {"epochs": 5},
        "ape-t": {"epochs": 5}, "lp++": {"epochs": 30}}
EXPECTED = {"zeroshot", "linear-probe", "tip-adapter", "tip-adapter-f", "clip-adapter", "gda", "xmadapter",
            "xmadapter-tf", "ape", "ape-t", "lp++"}


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name, seed=0, **extra):
    return create_method(name, seed=seed, **{**FAST.get(name, {}), **extra})


@pytest.fixture(scope="module")
def separable():
    return make_task(num_classes=4, dim=32, shots=8, views=4, spread=1.5, text_noise=0.3, seed=11)


@pytest.fixture(scope="module")
def noisy_text():
    return make_task(num_classes=5, dim=32, shots=8, views=4, spread=1.5, text_noise=3.0, seed=12)


def test_all_methods_registered():
    assert EXPECTED <= set(available_methods())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_harness_loop_never_hands_test_labels_to_a_method(name, separable):
    support, val, test, text = separable
    method = make(name)
    # the protocol: fit sees only support, val and the text classifier; nothing else can be passed in
    params = list(inspect.signature(type(method).fit).parameters)
    assert params == ["self", "support", "val", "text_classifier"]
    assert isinstance(method, FewShotMethod)
    method.fit(support, val, text)
    selected = json.loads(json.dumps(method.selected_))           # JSON-serialisable
    if name != "zeroshot":
        assert selected, f"{name} chose hyper-parameters but recorded none"
    test_features = test.features.clone()                         # a bare tensor: no labels, no ids
    scores = method.decision_scores(test_features)
    assert scores.shape == (len(test), test.num_classes) and scores.dtype == torch.float32
    # no transductive use of the test batch: a row's score does not depend on the other test rows
    assert torch.allclose(method.decision_scores(test_features[:7]), scores[:7], atol=1e-4)
    assert torch.equal(method.predict(test_features), scores.argmax(1))
    assert method.selected_ == selected                           # scoring does not change the selection
    acc = (method.predict(test_features) == test.labels).float().mean().item()
    assert acc > 0.6, f"{name}: {acc:.3f} on separable data (chance 0.25)"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_same_seed_same_scores(name, separable):
    support, val, test, text = separable
    a = make(name, seed=4).fit(support, val, text).decision_scores(test.features)
    torch.manual_seed(123)                                         # global RNG state must not matter
    b = make(name, seed=4).fit(support, val, text).decision_scores(test.features)
    assert torch.equal(a, b)


def test_adapters_beat_zero_shot_with_a_noisy_text_classifier(noisy_text):
    support, val, test, text = noisy_text
    acc = {}
    for name in sorted(EXPECTED):
        m = make(name).fit(support, val, text)
        acc[name] = (m.predict(test.features) == test.labels).float().mean().item()
    assert acc["zeroshot"] < 0.8
    for name in EXPECTED - {"zeroshot"}:
        assert acc[name] > acc["zeroshot"] + 0.05, acc


def _swapped_val_task():
    """Zero-shot classifier confuses classes 0 and 1 (rows swapped); the cache knows better.
    val_true has correct labels, val_swapped has 0 ↔ 1 swapped (it agrees with the zero-shot classifier)."""
    support, val, test, text = make_task(num_classes=4, dim=32, shots=8, views=4, spread=1.5, text_noise=0.2,
                                         val_per_class=6, seed=21)
    text = text[[1, 0, 2, 3]]
    swap = torch.tensor([1, 0, 2, 3])
    val_swapped = FeatureSet(features=val.features, labels=swap[val.labels], ids=val.ids,
                             classnames=val.classnames, views=val.views)
    return support, val, val_swapped, test, text


@pytest.mark.parametrize("name", ["tip-adapter", "tip-adapter-f", "gda", "xmadapter", "xmadapter-tf"])
def test_alpha_follows_validation_not_test(name):
    support, val_true, val_swapped, test, text = _swapped_val_task()
    extra = {} if name == "gda" else {"alpha_scale": 100.0}      # room to overrule a confident zero-shot error
    a = make(name, **extra).fit(support, val_true, text)
    b = make(name, **extra).fit(support, val_swapped, text)
    # val_true rewards trusting the cache (large α); val_swapped rewards the zero-shot classifier (small α)
    assert a.selected_["alpha"] > b.selected_["alpha"], (a.selected_, b.selected_)
    acc_a = (a.predict(test.features) == test.labels).float().mean().item()
    acc_b = (b.predict(test.features) == test.labels).float().mean().item()
    assert acc_a > acc_b
    # the reported val accuracy is measured on the val set it was given
    for m, v in ((a, val_true), (b, val_swapped)):
        assert m.selected_["val_acc"] == pytest.approx((m.predict(v.features) == v.labels).float().mean().item())


def test_linear_probe_and_clip_adapter_select_on_val():
    support, val_true, val_swapped, test, text = _swapped_val_task()
    for name in ("linear-probe", "clip-adapter"):
        m = make(name).fit(support, val_swapped, text)
        assert m.selected_["val_acc"] == pytest.approx(
            (m.predict(val_swapped.features) == val_swapped.labels).float().mean().item())


@pytest.mark.parametrize("name", sorted(EXPECTED - {"zeroshot"}))
def test_mismatched_text_classifier_raises_shape_error(name, separable):
    support, val, test, text = separable
    bad = F.normalize(torch.randn(4, 20), dim=-1)
    with pytest.raises(ShapeError) as err:
        make(name).fit(support, val, bad)
    assert "(32, 32)" in str(err.value) and "(4, 20)" in str(err.value)
    with pytest.raises(ShapeError, match="classes"):
        make(name).fit(support, val, text[:3])
    m = make(name).fit(support, val, text)
    with pytest.raises(ShapeError, match=r"\(5, 31\)"):
        m.decision_scores(torch.randn(5, 31))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_one_shot_without_views(name):
    support, val, test, text = make_task(num_classes=3, dim=16, shots=1, val_per_class=1, views=0, seed=5)
    m = make(name).fit(support, val, text)
    scores = m.decision_scores(test.features)
    assert torch.isfinite(scores).all()
    json.dumps(m.selected_)


def test_unfitted_method_says_so():
    with pytest.raises(RuntimeError, match="not fitted"):
        create_method("tip-adapter").decision_scores(torch.randn(2, 4))
