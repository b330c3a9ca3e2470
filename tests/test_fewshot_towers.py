"""Text-tower access for prompt learning: encoding a prompt's own token embeddings gives the backbone's
``encode_texts`` result, per backbone kind, and gradients reach a spliced-in token."""
import pytest
import torch

from xmodal.backbones import load_backbone
from xmodal.fewshot.towers import text_tower

TEXTS = ["a photo of a cat.", "a blurry photo of an aeroplane.", "dog"]


def _check(bb):
    tower = text_tower(bb)
    ids, mask = tower.tokenize(TEXTS)
    embeds = tower.embed(ids).requires_grad_(True)
    feats = tower.encode(embeds, ids, mask)
    assert torch.allclose(feats, bb.encode_texts(TEXTS).float(), atol=1e-5)
    feats[:, 0].sum().backward()
    assert embeds.grad is not None and float(embeds.grad[:, tower.prefix_len].abs().sum()) > 0


def test_tiny_clip_tower_matches_encode_texts():
    _check(load_backbone("tiny:clip", engine="torch"))


def test_openclip_tower_matches_encode_texts(tiny_openclip_vit):
    _, _, spec = tiny_openclip_vit
    _check(load_backbone(spec, engine="torch"))


def test_unknown_backbone_kind_is_a_clear_error():
    from xmodal.errors import UsageError

    with pytest.raises(UsageError, match="prompt learning is not supported"):
        text_tower(object())


class _FakeHFBackbone:
    """A random tiny Hugging Face CLIPModel with a word-hashing tokenizer: what HFClipBackbone exposes
    (``model``, ``tokenizer``, ``max_length``, ``device``), without files or downloads."""

    spec = "hf:tiny-random"

    def __init__(self):
        from transformers import CLIPConfig, CLIPModel

        torch.manual_seed(0)
        cfg = CLIPConfig(text_config={"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16,
                                      "eos_token_id": 99, "bos_token_id": 98, "pad_token_id": 0},
                         vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                         projection_dim=16)
        self.model = CLIPModel(cfg).eval().requires_grad_(False)
        self.max_length, self.device = 16, torch.device("cpu")

    def tokenizer(self, texts, padding=True, truncation=True, max_length=16, return_tensors="pt"):
        rows = [[98] + [3 + sum(map(ord, w)) % 90 for w in t.lower().split()] + [99] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()}

    def encode_texts(self, texts):
        enc = self.tokenizer(texts)
        out = self.model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return torch.nn.functional.normalize(self.model.text_projection(out.pooler_output), dim=-1)

    def encode_images(self, pixels):
        out = self.model.vision_model(pixel_values=pixels)
        return torch.nn.functional.normalize(self.model.visual_projection(out.pooler_output), dim=-1)

    def modules(self):
        return [self.model]


def test_hf_clip_tower_matches_its_text_model_and_lora_targets_every_qkv():
    from xmodal.fewshot._lora_towers import lora_towers

    bb = _FakeHFBackbone()
    _check(bb)
    towers = lora_towers(bb)
    assert len(towers.image_targets) == len(towers.text_targets) == 2 * 3
    assert all(t.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") for t in towers.image_targets)
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.allclose(towers.upper(towers.lower(pixels)), bb.encode_images(pixels), atol=1e-5)


def test_bridge_towers_prompt_encoding_and_lora_split():
    """The offline default: MiniLM prompt encoding equals encode_texts; CLIP-LoRA adapts MiniLM's q/k/v
    in all 6 layers and EfficientNet-Lite0's last-stage pointwise convolutions + head, and the cached
    lower part followed by the adapted upper part is the tower's own image embedding."""
    from xmodal.fewshot._lora_towers import lora_towers

    bb = load_backbone("bridge:lite0-minilm", engine="torch")
    _check(bb)
    towers = lora_towers(bb)
    assert len(towers.text_targets) == 18 and {t.rsplit(".", 1)[-1] for t in towers.text_targets} == {
        "query", "key", "value"}
    assert towers.image_targets[-1] == "conv_head"
    stages = {t.split(".")[1] for t in towers.image_targets[:-1]}
    assert stages == {"6"} and all(t.endswith(("conv_pw", "conv_pwl")) for t in towers.image_targets[:-1])
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        lower = towers.lower(pixels)
        assert lower.shape == (2, 192, 7, 7)
        assert torch.allclose(towers.upper(lower), bb.encode_images(pixels), atol=1e-4)
