"""``openclip:<arch>/<pretrained-tag-or-local-file>`` — open_clip models (the papers' RN50, ViT-B/16 ...).

Tokens for the X-adapter V-expert are projected into the joint space: ViT patch tokens through the
visual projection; ResNet spatial features through the attention pool's value and output projections.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import BackboneUnavailableError
from .base import VisionLanguageBackbone
from .fingerprint import module_fingerprint
from .transforms import augment_transform, describe


class OpenClipBackbone(VisionLanguageBackbone):
    def __init__(self, spec: str, target: str) -> None:
        super().__init__()
        import open_clip

        arch, sep, pretrained = target.partition("/")
        if not arch:
            raise ValueError(f"openclip spec needs an architecture: openclip:<arch>/<tag-or-file>, got {spec!r}")
        self.spec, self.arch, self.pretrained = spec, arch, pretrained or None
        if self.pretrained and Path(self.pretrained).expanduser().exists():
            self.pretrained = str(Path(self.pretrained).expanduser())
        if arch not in open_clip.list_models():
            raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=self.pretrained)
        except Exception as exc:  # download failures surface as many exception types
            raise BackboneUnavailableError(
                f"could not load weights for {spec!r} ({type(exc).__name__}: {exc}). Without network access, "
                f"pass a local checkpoint: openclip:{arch}/path/to/weights.bin (or .pt / .safetensors)"
            ) from exc
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self._preprocess = preprocess
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean = getattr(self.model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        self.std = getattr(self.model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.embed_dim = self._probe_embed_dim()
        self.token_dim = self.embed_dim
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self._fingerprint = module_fingerprint(self.model, extra=f"{arch}|{describe(preprocess)}")

    def _probe_embed_dim(self) -> int:
        with torch.inference_mode():
            return int(self.model.encode_text(self.tokenizer(["a"])).shape[-1])

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def fingerprint(self) -> str:
        return f"openclip-{self.arch}-{self._fingerprint}"

    @property
    def preprocess(self):
        return self._preprocess

    def augment_preprocess(self):
        return augment_transform(self.image_size, self.mean, self.std)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels.to(self.device)).float(), dim=-1)

    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        pixels = pixels.to(self.device)
        if hasattr(visual, "output_tokens") and hasattr(visual, "proj"):
            previous = visual.output_tokens
            visual.output_tokens = True
            try:
                pooled, tokens = visual(pixels)
            finally:
                visual.output_tokens = previous
            if visual.proj is not None:
                tokens = tokens @ visual.proj
            return torch.cat([pooled[:, None], tokens], dim=1).float()
        if hasattr(visual, "attnpool") and hasattr(visual, "stem"):  # ModifiedResNet
            x = visual.stem(pixels)
            for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
                x = layer(x)
            tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C)
            pool = visual.attnpool
            tokens = F.linear(F.linear(tokens, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight, pool.c_proj.bias)
            return tokens.float()
        raise NotImplementedError(f"image tokens are not supported for open_clip visual tower {type(visual).__name__}")

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)

    @torch.inference_mode()
    def text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        if not hasattr(m, "token_embedding"):
            raise NotImplementedError(f"token-level text states are not supported for {self.arch}")
        ids = self.tokenizer(texts).to(self.device)
        x = m.token_embedding(ids) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        proj = m.text_projection
        x = proj(x) if isinstance(proj, torch.nn.Linear) else (x @ proj if proj is not None else x)
        eot = ids.argmax(dim=-1)  # the end-of-text token has the largest id in CLIP's vocabulary
        mask = torch.arange(ids.shape[1], device=ids.device)[None] <= eot[:, None]
        return x.float(), mask
