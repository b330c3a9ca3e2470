"""One episode end to end on tiny:clip + a generated ImageFolder; the test-label guard; provenance."""
import math

import pytest
import torch

from xmodal.backbones import load_backbone
from xmodal.bench.run import ROW_FIELDS, FeatureBank, ProtocolError, UnknownMethodError, resolve_methods, run_episode
from xmodal.bench.testing import SpyMethod, make_tiny_imagefolder, registered
from xmodal.data import fewshot_split, load_dataset
from xmodal.featureset import FeatureSet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench_run")
    root = make_tiny_imagefolder(base / "data", classes=3, train=6, test=4)
    return {"spec": f"imagefolder:{root}", "cache": str(base / "cache"),
            "backbone": load_backbone("tiny:clip"), "dataset": load_dataset(f"imagefolder:{root}")}


def _bank(tiny, **kw):
    return FeatureBank(tiny["backbone"], tiny["dataset"], cache_dir=tiny["cache"], progress=False,
                       **{"augment_views": 2, **kw})


@pytest.mark.parametrize("scope", ["split", "support"])
def test_methods_never_see_test_labels(tiny, scope):
    class Spy(SpyMethod):
        calls = []

    with registered("spy-guard", Spy):
        rows = run_episode(_bank(tiny, augment_scope=scope), 2, 7, ["spy-guard"], dataset_spec=tiny["spec"])
    split = fewshot_split(tiny["dataset"], 2, 7)
    test_ids = {s.id for s in split.test}
    fits = [c for c in Spy.calls if c["event"] == "fit"]
    scores = [c for c in Spy.calls if c["event"] == "scores"]
    assert len(fits) == 1 and len(scores) == 1
    support, val = fits[0]["support"], fits[0]["val"]
    assert isinstance(support, FeatureSet) and isinstance(val, FeatureSet)
    assert not (set(support.ids) | set(val.ids)) & test_ids
    assert not set(support.ids) & set(val.ids)  # val drawn from train images outside the support set
    assert support.ids == [s.id for s in split.support] and val.ids == [s.id for s in split.val]
    assert support.views is not None and support.views.shape[:2] == (2, len(support))
    assert val.views is None
    assert fits[0]["text_classifier"].shape == (3, 32)
    arg = scores[0]["arg"]  # predict gets a bare tensor: no ids, no labels
    assert type(arg) is torch.Tensor and arg.shape == (len(test_ids), 32)
    assert rows[0]["n_test"] == len(test_ids) == 12


def test_support_views_do_not_depend_on_scope(tiny):
    captured = {}
    for scope in ("split", "support"):
        class Spy(SpyMethod):
            calls = []

        with registered("spy-scope", Spy):
            run_episode(_bank(tiny, augment_scope=scope), 2, 3, ["spy-scope"])
        captured[scope] = Spy.calls[0]["support"]
    assert torch.allclose(captured["split"].views, captured["support"].views)
    assert torch.allclose(captured["split"].features, captured["support"].features)


def test_row_provenance(tiny):
    rows = run_episode(_bank(tiny), 1, 1, "zeroshot", dataset_spec=tiny["spec"])
    (row,) = rows
    missing = [f for f in ROW_FIELDS if f not in row]
    assert not missing, missing
    assert row["method"] == "zeroshot" and row["backbone"] == "tiny:clip" and row["stand_in"] is True
    assert row["backbone_fingerprint"] == tiny["backbone"].fingerprint()
    assert row["dataset"] == tiny["spec"] and row["shots"] == 1 and row["seed"] == 1
    assert row["templates"] == list(tiny["dataset"].templates) and row["templates"]
    assert "val" in row["val_rule"] or "train" in row["val_rule"]
    assert isinstance(row["hparams"], dict)
    assert row["top1"] == pytest.approx(100.0 * row["n_correct"] / row["n_test"])
    assert 0.0 <= row["top1"] <= 100.0 and row["n_support"] == 3 and row["n_val"] == 3
    assert row["xmodal_version"] and row["xmodal_version"] != "unknown"
    assert len(row["git_commit"]) == 40 or row["git_commit"] == "unknown"
    assert row["fit_time_s"] >= 0 and row["wall_time_s"] >= row["fit_time_s"] and not math.isnan(row["top1"])
    assert row["timestamp"].endswith("+00:00")


def test_zeroshot_matches_a_direct_computation(tiny):
    from xmodal.features import extract_features
    from xmodal.zeroshot import text_classifier

    (row,) = run_episode(_bank(tiny), 1, 1, "zeroshot")
    test = extract_features(tiny["backbone"], tiny["dataset"], "test", cache_dir=tiny["cache"], progress=False)
    w = text_classifier(tiny["backbone"], tiny["dataset"].classnames, tiny["dataset"].templates)
    assert row["n_correct"] == int(((test.features @ w.T).argmax(1) == test.labels).sum())


def test_skip_touches_no_feature(tiny):
    def boom(*a, **k):
        raise AssertionError("features extracted for a skipped episode")

    bank = FeatureBank(tiny["backbone"], tiny["dataset"], extract_fn=boom, progress=False)
    assert run_episode(bank, 1, 1, "zeroshot", skip=lambda m: True) == []


def test_unknown_method_lists_available():
    with pytest.raises(UnknownMethodError, match="available: .*zeroshot"):
        resolve_methods("zeroshot,nope")
    assert resolve_methods("zeroshot") == ["zeroshot"]
    assert "zeroshot" in resolve_methods("all")


def test_overlapping_splits_are_refused(tiny):
    def leaky_split(dataset, shots, seed):
        split = fewshot_split(dataset, shots, seed)
        split.val = split.val + split.test[:1]
        return split

    with pytest.raises(ProtocolError, match="test image"):
        run_episode(_bank(tiny), 1, 1, "zeroshot", split_fn=leaky_split)


def test_tower_methods_run_in_an_episode_with_their_settings_digest(tiny, monkeypatch):
    """CoOp/CoCoOp train on the cached features with the backbone's text tower; CLIP-LoRA trains on, and is
    scored on, the episode's images through its adapted towers (short CPU schedules for the test)."""
    from xmodal.fewshot import clip_lora, cocoop, coop

    monkeypatch.setitem(coop.PRESETS, "cpu", {**coop.PRESETS["cpu"], "epochs": 2})
    monkeypatch.setitem(cocoop.PRESETS, "cpu", {**cocoop.PRESETS["cpu"], "epochs": 1})
    monkeypatch.setitem(clip_lora.PRESETS, "cpu", {**clip_lora.PRESETS["cpu"], "iterations": 3, "views": 1})
    rows = run_episode(_bank(tiny), 2, 0, ["coop", "cocoop", "clip-lora"], dataset_spec=tiny["spec"])
    assert [r["method"] for r in rows] == ["coop", "cocoop", "clip-lora"]
    for row in rows:
        assert row["method_config"] and row["training_free"] is False and row["n_test"] == 12
        assert "cached" in row["hparams"]
    assert rows[2]["hparams"]["kind"] == "tiny" and rows[2]["hparams"]["lora_rank"] == 2
    assert rows[0]["method_config"] != rows[1]["method_config"]
