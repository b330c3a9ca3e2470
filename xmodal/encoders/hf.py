"""``hf:<model-id-or-local-folder>`` — Hugging Face ``CLIPModel`` (+ its processor and tokenizer)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import BackboneUnavailableError
from .base import VisionLanguageBackbone
from .fingerprint import module_fingerprint
from .transforms import augment_transform, describe, eval_transform


def _size(value) -> int:
    """Image side from a processor size (int, dict or transformers' SizeDict)."""
    if isinstance(value, int):
        return value
    get = value.get if isinstance(value, dict) else lambda k: getattr(value, k, None)
    return int(get("shortest_edge") or get("height"))


class HFClipBackbone(VisionLanguageBackbone):
    def __init__(self, spec: str, target: str) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        if not target:
            raise ValueError("hf spec needs a model id or folder: hf:openai/clip-vit-base-patch16 or hf:/path")
        self.spec = spec
        source = str(Path(target).expanduser()) if Path(target).expanduser().exists() else target
        try:
            self.model = CLIPModel.from_pretrained(source).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            processor = CLIPImageProcessor.from_pretrained(source)
        except Exception as exc:
            raise BackboneUnavailableError(
                f"could not load {spec!r} ({type(exc).__name__}: {exc}). Without network access, pass a local "
                "folder saved with CLIPModel.save_pretrained (plus tokenizer and image processor): hf:/path/to/folder"
            ) from exc
        self.image_size = _size(processor.crop_size if processor.do_center_crop else processor.size)
        self.mean, self.std = list(processor.image_mean), list(processor.image_std)
        self._eval = eval_transform(self.image_size, self.mean, self.std)
        self.embed_dim = int(self.model.config.projection_dim)
        self.token_dim = self.embed_dim
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self._fingerprint = module_fingerprint(self.model, extra=describe(self._eval))

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def fingerprint(self) -> str:
        return f"hf-clip-{self._fingerprint}"

    @property
    def preprocess(self):
        return self._eval

    def augment_preprocess(self):
        return augment_transform(self.image_size, self.mean, self.std)

    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_model(pixel_values=pixels.to(self.device))
        tokens = self.model.vision_model.post_layernorm(out.last_hidden_state)
        return self.model.visual_projection(tokens).float()

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_model(pixel_values=pixels.to(self.device))
        return F.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)

    def _tokenize(self, texts: list[str]):
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        out = self.model.text_model(**self._tokenize(texts))
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    @torch.inference_mode()
    def text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._tokenize(texts)
        out = self.model.text_model(**enc)
        return self.model.text_projection(out.last_hidden_state).float(), enc["attention_mask"].bool()
