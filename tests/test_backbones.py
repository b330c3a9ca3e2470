"""Every backbone kind through the one factory: shapes, normalisation, fingerprints, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from xmodal.backbones import load_backbone
from xmodal.errors import BackboneUnavailableError


def _check_protocol(bb, image_size: int | None = None):
    img = Image.new("RGB", (40, 30), (200, 40, 10))
    pixels = torch.stack([bb.preprocess(img), bb.augment_preprocess()(img)])
    emb = bb.encode_images(pixels)
    assert emb.shape == (2, bb.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    txt = bb.encode_texts(["a photo of a cat.", "a dog"])
    assert txt.shape == (2, bb.embed_dim)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    tokens = bb.image_tokens(pixels)
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[2] == bb.token_dim
    states, mask = bb.text_tokens(["a photo of a cat.", "a dog"])
    assert states.shape[:2] == mask.shape and states.shape[2] == bb.token_dim
    assert mask.sum(1)[0] > mask.sum(1)[1]  # longer text, more real tokens
    assert isinstance(bb.fingerprint(), str) and len(bb.fingerprint()) > 8


def test_tiny_clip_protocol_and_determinism():
    a, b = load_backbone("tiny:clip"), load_backbone("tiny:clip")
    _check_protocol(a)
    assert a.fingerprint() == b.fingerprint()
    assert load_backbone("tiny:clip:1").fingerprint() != a.fingerprint()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(a.encode_images(x), b.encode_images(x))


def test_unknown_spec_names_the_known_forms():
    with pytest.raises(ValueError, match="bridge:lite0-minilm"):
        load_backbone("nonsense:model")


def test_openclip_random_weights_round_trip(tmp_path, tiny_openclip_vit):
    model, _, spec = tiny_openclip_vit
    bb = load_backbone(spec, cache_dir=str(tmp_path))
    _check_protocol(bb)
    assert bb.image_tokens(torch.zeros(1, 3, 32, 32)).shape == (1, 1 + 16, 16)  # CLS + 4x4 patches
    with torch.inference_mode():
        direct = torch.nn.functional.normalize(model.eval().encode_image(torch.ones(1, 3, 32, 32)), dim=-1)
    assert torch.allclose(bb.encode_images(torch.ones(1, 3, 32, 32)), direct, atol=1e-5)
    # other weights -> other fingerprint (feature caches can never mix them)
    import open_clip

    torch.manual_seed(1)
    torch.save(open_clip.create_model("XmodalTinyViT", pretrained=None).state_dict(), tmp_path / "other.pt")
    assert load_backbone(f"openclip:XmodalTinyViT/{tmp_path / 'other.pt'}").fingerprint() != bb.fingerprint()


def test_openclip_missing_weights_error_names_spec_and_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneUnavailableError, match=r"(?s)openclip:RN50/openai.*local checkpoint"):
        load_backbone("openclip:RN50/openai")


def _tiny_hf_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz.,")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def test_hf_clip_random_weights_round_trip(tmp_path):
    _tiny_hf_clip(tmp_path)
    bb = load_backbone(f"hf:{tmp_path}", cache_dir=str(tmp_path / "cache"))
    _check_protocol(bb)
    assert bb.embed_dim == 16
    assert bb.image_tokens(torch.zeros(1, 3, 32, 32)).shape == (1, 17, 16)
    assert bb.active_engine("image") == "onnx"  # auto: the exact ONNX Runtime export on CPU
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(bb.encode_images(x), bb.torch_tower("image")(x), atol=1e-5)


def test_hf_missing_model_error_names_spec_and_fix():
    with pytest.raises(BackboneUnavailableError, match=r"(?s)hf:no-such-org/no-such-clip.*local folder"):
        load_backbone("hf:no-such-org/no-such-clip")


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    # PyTorch engine: the ONNX export of this tower is exercised by benchmarks/features.py (tiny models in tests)
    return load_backbone("bridge:lite0-minilm", cache_dir=str(tmp_path_factory.mktemp("bridge-cache")), engine="torch")


def test_bridge_protocol_and_semantics(bridge):
    _check_protocol(bridge)
    assert bridge.is_stand_in and "stand-in" in bridge.name
    assert bridge.embed_dim == 1280
    # the ridge bridge puts a class name nearer its own classifier direction than unrelated ones
    head = torch.nn.functional.normalize(bridge.image_model.get_classifier().weight, dim=-1)
    t = bridge.encode_texts(["a photo of a goldfish.", "a photo of a tabby cat."])
    assert (t @ head.T).argmax(1).tolist() == [1, 281]  # ImageNet indices of goldfish and tabby cat


def test_bridge_ridge_map_is_cached(bridge, tmp_path):
    cached = list((bridge.cache_dir / "bridge").glob("ridge-*.safetensors"))
    assert len(cached) == 1
    again = load_backbone("bridge:lite0-minilm", cache_dir=str(bridge.cache_dir))
    assert again.fingerprint() == bridge.fingerprint()
    assert torch.equal(again.ridge_weight, bridge.ridge_weight.cpu())
