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
