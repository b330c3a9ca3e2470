"""ContextBuilder: with both experts on pooled features each text is CLIP-encoded once, same result."""
from __future__ import annotations

import torch

from xmodal.backbones import load_backbone
from xmodal.xadapter import ContextBuilder, XAdapterConfig
from xmodal.xadapter.bank import RetrievalBank

TEXTS = ["a red apple on a table", ("a dog runs", "a cat sleeps"), "the blue sky"]


def _bank(tmp_path, clip):
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(40, clip.embed_dim, generator=gen)
    return RetrievalBank.from_embeddings(emb, tmp_path / "bank",
                                         meta={"backbone": clip.spec, "fingerprint": clip.fingerprint()})


def test_pooled_v_and_t_encode_each_text_once_and_match_separate_calls(tmp_path, monkeypatch):
    clip = load_backbone("tiny:clip")
    bank = _bank(tmp_path, clip)
    cfg = XAdapterConfig.for_backbone(clip, experts="v,t", layers="top2")
    builder = ContextBuilder(cfg, clip, bank)
    separate_v = builder.visual_features(["a red apple on a table", "a dog runs", "a cat sleeps", "the blue sky"])
    separate_t = builder.text_features(["a red apple on a table", "a dog runs", "a cat sleeps", "the blue sky"])

    calls = []
    original = clip.encode_texts
    monkeypatch.setattr(clip, "encode_texts", lambda texts: calls.append(list(texts)) or original(texts))
    ctx = builder.build(TEXTS)
    assert len(calls) == 1 and len(calls[0]) == 4  # one CLIP pass for retrieval and the T-expert together
    # example 1 is a pair: its two segments' images / text features are concatenated
    assert torch.equal(ctx.visual[1, : 2 * cfg.k], separate_v[0][1:3].reshape(-1, separate_v[0].shape[-1]))
    assert torch.equal(ctx.text[0, :1], separate_t[0][0])
    assert torch.equal(ctx.text[2, :1], separate_t[0][3])
    assert ctx.visual_mask[0].sum() == cfg.k and ctx.visual_mask[1].sum() == 2 * cfg.k
