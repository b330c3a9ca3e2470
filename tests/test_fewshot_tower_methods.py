"""Tower methods (CoOp, CoCoOp, CLIP-LoRA) on tiny random models: the contract, the published structure,
validation-only selection, adapter-only saved state."""
from __future__ import annotations

import json

import pytest
import torch

from xmodal.backbones import load_backbone
from xmodal.errors import UsageError
from xmodal.fewshot import create_method
from xmodal.fewshot._synthetic import make_task
from xmodal.fewshot.base import FewShotMethod
from xmodal.fewshot.coop import published_epochs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny:clip", engine="torch")


@pytest.fixture(scope="module")
def task():
    return make_task(num_classes=4, dim=32, shots=4, val_per_class=3, test_per_class=10, views=2, seed=3)


@pytest.fixture(scope="module")
def image_episode(tmp_path_factory, tiny):
    from xmodal.bench.testing import make_tiny_imagefolder
    from xmodal.data import fewshot_split, load_dataset
    from xmodal.feature_bank import FeatureBank
    from xmodal.fewshot.pixels import PixelSource

    root = tmp_path_factory.mktemp("lora")
    ds = load_dataset(f"imagefolder:{make_tiny_imagefolder(root / 'imgs', classes=3, train=8, test=4)}")
    bank = FeatureBank(tiny, ds, augment_views=0, cache_dir=str(root / "cache"), device="cpu")
    support, val, test = bank.episode(fewshot_split(ds, 2, 0))
    return support, val, test, bank.text_classifier(), PixelSource(ds, tiny, seed=0)


def _round_trip(method: FewShotMethod) -> FewShotMethod:
    tensors, meta = method.get_state()
    return FewShotMethod.from_state({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))


# ------------------------------------------------------------------------------------------------ CoOp


def test_coop_scores_are_the_learned_class_embeddings_and_selection_is_on_val(task, tiny):
    support, val, test, text = task
    m = create_method("coop", epochs=6, seed=1).bind_backbone(tiny).fit(support, val, text)
    sel = m.selected_
    assert m.ctx_.shape == (16, 32) and sel["context"] == "unified" and sel["class_token"] == "end"
    assert 0 <= sel["epoch"] <= 6
    assert (m.predict(val.features) == val.labels).float().mean().item() == pytest.approx(sel["val_acc"])
    assert torch.allclose(m.decision_scores(test.features), 100 * test.features @ m.text_.T, atol=1e-5)
    # the stored class embeddings are what the text tower makes of the learned context
    from xmodal.fewshot._prompts import PromptTemplate
    from xmodal.fewshot.towers import text_tower

    tower = text_tower(tiny)
    template = PromptTemplate.build(tower, support.classnames, 16)
    assert torch.allclose(tower.encode(template.splice(m.ctx_), template.ids, template.mask), m.text_, atol=1e-5)
    again = create_method("coop", epochs=6, seed=1).bind_backbone(tiny).fit(support, val, text)
    assert torch.equal(again.ctx_, m.ctx_)


def test_coop_training_moves_the_context_and_class_specific_has_one_per_class(task, tiny):
    support, val, test, text = task
    m = create_method("coop", epochs=4, class_specific=True, seed=0).bind_backbone(tiny).fit(support, support, text)
    assert m.ctx_.shape == (4, 16, 32) and m.selected_["context"] == "class-specific"
    start = create_method("coop", epochs=0, class_specific=True, seed=0).bind_backbone(tiny).fit(support, support, text)
    assert m.selected_["epoch"] > 0 and not torch.allclose(m.ctx_, start.ctx_)


def test_coop_presets_and_errors(task, tiny):
    support, val, _, text = task
    assert [published_epochs(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    with pytest.raises(RuntimeError, match="bind_backbone"):
        create_method("coop", epochs=1).fit(support, val, text)
    with pytest.raises(ValueError, match="preset"):
        create_method("coop", preset="gpu").bind_backbone(tiny).fit(support, val, text)
    with pytest.raises(ValueError, match="ctx_init"):
        create_method("coop", n_ctx=16, ctx_init="a photo of a").bind_backbone(tiny).fit(support, val, text)


# ------------------------------------------------------------------------------------------------ CoCoOp


def test_cocoop_conditions_prompts_on_the_image_and_round_trips(task, tiny):
    support, val, test, text = task
    m = create_method("cocoop", epochs=2, seed=0).bind_backbone(tiny).fit(support, val, text)
    assert m.ctx_.shape == (4, 32) and m.selected_["meta_net"] == "32-2-32"
    scores = m.decision_scores(test.features)
    assert scores.shape == (len(test), 4)
    # with the meta-net's last layer zeroed the prompts no longer depend on the image: f·t_c for a fixed t_c
    with torch.no_grad():
        m.meta_net_[2].weight.zero_()
        m.meta_net_[2].bias.zero_()
    flat = m.decision_scores(test.features)
    assert not torch.allclose(flat, scores)
    fixed_text = torch.linalg.lstsq(100 * test.features, flat).solution.T  # (C, D) reproduces every row
    assert torch.allclose(100 * test.features @ fixed_text.T, flat, atol=1e-3)
    loaded = _round_trip(m)
    with pytest.raises(RuntimeError, match="bind_backbone"):
        loaded.decision_scores(test.features)
    assert torch.allclose(loaded.bind_backbone(tiny).decision_scores(test.features), flat, atol=1e-6)
    with pytest.raises(ValueError, match="class_specific"):
        create_method("cocoop", class_specific=True)


# ------------------------------------------------------------------------------------------------ CLIP-LoRA


def test_clip_lora_starts_at_the_frozen_model_and_saves_adapters_only(image_episode, tiny):
    support, val, test, text, pixels = image_episode
    start = create_method("clip-lora", iterations=0).bind_backbone(tiny, pixels).fit(support, val, text)
    test_pixels = pixels(test.ids)
    frozen = 100 * tiny.encode_images(test_pixels) @ start.text_.T
    assert torch.allclose(start.image_scores(test_pixels), frozen, atol=1e-4)  # B = 0: adapters start at zero
    m = create_method("clip-lora", iterations=12, batch_size=4, lr=1e-2, seed=0).bind_backbone(tiny, pixels)
    m.fit(support, support, text)
    sel = m.selected_
    assert sel["lora_rank"] == 2 and sel["lora_alpha"] == 1.0 and sel["lora_dropout"] == 0.25
    assert sel["iteration"] > 0 and sel["epoch"] == -(-sel["iteration"] // 2)  # 2 steps per pass (6 images)
    tensors, meta = m.get_state()
    assert all(k.startswith("fitted.lora_.") or k == "fitted.text_" for k in tensors)
    assert all("lora" in k for k in tensors if k != "fitted.text_")
    backbone_numels = {p.numel() for mod in tiny.modules() for p in mod.parameters()}
    assert not any(t.numel() in backbone_numels for k, t in tensors.items() if k != "fitted.text_")
    scores = m.image_scores(test_pixels)
    assert not torch.allclose(scores, frozen, atol=1e-3)
    loaded = _round_trip(m).bind_backbone(tiny, pixels)
    assert torch.allclose(loaded.image_scores(test_pixels), scores, atol=1e-5)
    # the shared backbone was never modified
    assert torch.allclose(100 * tiny.encode_images(test_pixels) @ start.text_.T, frozen)
    with pytest.raises(UsageError, match="scores images"):
        m.decision_scores(test.features)
    with pytest.raises(UsageError, match="image source"):
        create_method("clip-lora").bind_backbone(tiny).fit(support, val, text)


def test_clip_lora_on_open_clip_vit_adapts_qkv_of_every_layer_exactly(tiny_openclip_vit):
    from xmodal.fewshot._lora_towers import lora_towers

    _, _, spec = tiny_openclip_vit
    bb = load_backbone(spec, engine="torch")
    towers = lora_towers(bb)
    assert towers.image_targets == [f"visual.transformer.resblocks.0.attn.{p}_proj" for p in "qkv"]
    assert towers.text_targets == [f"transformer.resblocks.0.attn.{p}_proj" for p in "qkv"]
    pixels = torch.randn(3, 3, 32, 32)
    # the split q/k/v attention computes what the fused one did
    assert torch.allclose(towers.upper(towers.lower(pixels)), bb.encode_images(pixels), atol=1e-5)
    tower = towers.text()
    ids, mask = tower.tokenize(["a photo of a dog."])
    assert torch.allclose(tower.encode(tower.embed(ids), ids, mask), bb.encode_texts(["a photo of a dog."]), atol=1e-5)
    # the backbone keeps its own fused attention (the copy was rewritten, not the backbone)
    assert type(bb.model.visual.transformer.resblocks[0].attn).__name__ == "MultiheadAttention"
