"""Differentiable access to a backbone's text tower, for methods that learn prompt tokens (CoOp, CoCoOp).

A backbone describes its towers (torch modules, tokenizer); this module reads only that, per backbone kind,
and exposes one small interface: tokenize prompts, look up (frozen) token embeddings, and encode a batch of
token-embedding sequences — with gradients — into the joint embedding space, exactly as the backbone's
``encode_texts`` does for plain text (``tests/test_fewshot_towers.py`` checks that equality per kind).

Kinds: ``tiny:clip`` (hashed bag of words, mean pooled), open_clip CLIP text transformers, Hugging Face
``CLIPModel``, and the offline default's MiniLM + ridge bridge.
"""
from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UsageError


class TextTower(abc.ABC):
    """Prompts -> token ids -> embeddings -> (N, D) L2-normalised text features.

    ``prefix_len``: tokens before the first word (a start token) — where CoOp's context vectors begin.
    """

    prefix_len: int = 1

    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.backbone, "device", "cpu"))

    @abc.abstractmethod
    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (N, T) long, mask (N, T) bool: real tokens) on the backbone's device."""

    @abc.abstractmethod
    def embedding(self) -> torch.nn.Embedding:
        """The token-embedding table (frozen)."""

    @abc.abstractmethod
    def encode(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, T, W) token embeddings (with learned tokens spliced in) -> (N, D) normalised features.
        ``ids``/``mask`` are those of the tokenized template (they give the pooling position)."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.embedding()(ids).float()

    @property
    def width(self) -> int:
        return int(self.embedding().weight.shape[1])


class _TinyTower(TextTower):
    prefix_len = 0

    def tokenize(self, texts):
        return self.backbone._tokenize(texts)

    def embedding(self):
        return self.backbone.word_emb

    def encode(self, embeds, ids, mask):
        m = mask[..., None].to(embeds.dtype)
        return F.normalize((embeds * m).sum(1) / m.sum(1), dim=-1)


class _OpenClipTower(TextTower):
    def tokenize(self, texts):
        ids = self.backbone.tokenizer(texts).to(self.device)
        eot = ids.argmax(dim=-1)  # the end-of-text token has the largest id in CLIP's vocabulary
        mask = torch.arange(ids.shape[1], device=ids.device)[None] <= eot[:, None]
        return ids, mask

    def embedding(self):
        return self.backbone.model.token_embedding

    def encode(self, embeds, ids, mask):
        m = self.backbone.model
        x = embeds + m.positional_embedding.to(embeds.dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        proj = m.text_projection
        x = proj(x) if isinstance(proj, torch.nn.Linear) else (x @ proj if proj is not None else x)
        return F.normalize(x.float(), dim=-1)


class _HFClipTower(TextTower):
    def tokenize(self, texts):
        bb = self.backbone
        enc = bb.tokenizer(texts, padding=True, truncation=True, max_length=bb.max_length, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].bool().to(self.device)

    def embedding(self):
        return self.backbone.model.text_model.embeddings.token_embedding

    def encode(self, embeds, ids, mask):
        tm = self.backbone.model.text_model
        h = tm.embeddings(inputs_embeds=embeds)
        t = h.shape[1]
        causal = torch.full((t, t), float("-inf"), device=h.device, dtype=h.dtype).triu(1)[None, None]
        h = tm.final_layer_norm(tm.encoder(inputs_embeds=h, attention_mask=causal).last_hidden_state)
        eos = getattr(tm, "eos_token_id", None)
        pos = ids.argmax(-1) if eos in (None, 2) else (ids == eos).int().argmax(-1)
        pooled = h[torch.arange(h.shape[0], device=h.device), pos]
        return F.normalize(self.backbone.model.text_projection(pooled).float(), dim=-1)


class _BridgeTower(TextTower):
    """MiniLM: attention-masked mean pooling, normalised, then the ridge bridge into the image space."""

    def tokenize(self, texts):
        enc = self.backbone.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].bool().to(self.device)

    def embedding(self):
        return self.backbone.text_model.embeddings.word_embeddings

    def encode(self, embeds, ids, mask):
        out = self.backbone.text_model(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state.float()
        m = mask[..., None].float()
        sentence = F.normalize((out * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
        return F.normalize(self.backbone._bridge(sentence), dim=-1)


def text_tower(backbone: Any) -> TextTower:
    """The text-tower view of ``backbone``, chosen from the modules it owns."""
    model = getattr(backbone, "model", None)
    if hasattr(backbone, "word_emb") and hasattr(backbone, "_tokenize"):
        return _TinyTower(backbone)
    if model is not None and hasattr(model, "token_embedding") and hasattr(model, "transformer"):
        return _OpenClipTower(backbone)
    if model is not None and hasattr(model, "text_model") and hasattr(model, "text_projection"):
        return _HFClipTower(backbone)
    if hasattr(backbone, "text_model") and hasattr(backbone, "_bridge"):
        return _BridgeTower(backbone)
    raise UsageError(f"prompt learning is not supported for the text tower of {getattr(backbone, 'spec', backbone)!r}",
                     hint="use an open_clip or Hugging Face CLIP backbone, bridge:lite0-minilm or tiny:clip")


def freeze(backbone: Any) -> None:
    """No gradient into the backbone's own weights (the methods train their own tensors only)."""
    for module in backbone.modules():
        module.requires_grad_(False)
