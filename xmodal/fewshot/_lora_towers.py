"""Where CLIP-LoRA puts its low-rank adapters in each backbone kind, and what it caches below them.

Each kind gives: a private copy of the towers (the backbone itself is never modified: other methods of a
sweep share it), the PEFT target modules of each tower, the frozen image computation *below* the first
adapted layer (run once per image and view, then cached) and the trainable computation above it.

| kind | image tower: adapted | cached below | text tower: adapted |
|---|---|---|---|
| open_clip ViT | q, k, v of every attention layer (fused in_proj split into three Linear maps, same numbers) | pixels (the patch stem is cheap next to the layers) | q, k, v of every layer |
| HF CLIP | ``q_proj``, ``k_proj``, ``v_proj`` of every layer | pixels | the same |
| bridge:lite0-minilm | EfficientNet-Lite0 has no attention: the 1×1 (pointwise) convolutions — the per-position linear maps, the convolutional counterpart of q/k/v — of the last stage (``blocks.6``, 7×7) and the 1×1 head | the 7×7×192 map after ``blocks.5`` | MiniLM ``query``, ``key``, ``value`` of all 6 layers |
| tiny:clip | second convolution | output of the first | the token-embedding table |

Why only the top of EfficientNet-Lite0: the published recipe adapts every layer of a ViT, whose tokens
carry global context from the first layer on; a convolutional network's lower stages compute local
texture features that transfer across datasets, and its class-specific information forms in the last,
low-resolution stages. Adapting the last of them keeps the spirit (low-rank updates of the linear maps
that mix channels) at a cost a CPU can train, because everything below it is computed once (adapting
``blocks.5`` too cost 3.5–5× the CPU time per step of the adapted image part, measured on 2 cores).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .towers import TextTower, text_tower


class SplitQKVAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, fused in_proj) rewritten with separate q/k/v Linear maps,
    so a LoRA can adapt each; the same numbers as the module it is built from."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        d, h = mha.embed_dim, mha.num_heads
        self.num_heads, self.batch_first = h, mha.batch_first
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=mha.in_proj_bias is not None) for _ in range(3))
        with torch.no_grad():
            for i, lin in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                lin.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
                if mha.in_proj_bias is not None:
                    lin.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None):
        if key_padding_mask is not None:
            raise NotImplementedError("key_padding_mask is not used by CLIP's attention")
        x = query if self.batch_first else query.transpose(0, 1)                      # (N, L, D)
        n, length, d = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, length, h, d // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def split_attention(model: nn.Module) -> list[str]:
    """Replace every self-attention ``nn.MultiheadAttention`` child named ``attn`` by SplitQKVAttention;
    returns the q/k/v module names created."""
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention) and child._qkv_same_embed_dim:
                setattr(module, child_name, SplitQKVAttention(child))
                full = f"{name}.{child_name}" if name else child_name
                names += [f"{full}.q_proj", f"{full}.k_proj", f"{full}.v_proj"]
    return names


class LoraTowers:
    """A private copy of the backbone's towers with named LoRA targets (filled in per kind)."""

    kind: str = ""
    cached_below: str = ""

    def __init__(self, backbone: Any) -> None:
        self.view = copy.copy(backbone)  # shallow: the towers are replaced by deep copies below
        self.image_targets: list[str] = []
        self.text_targets: list[str] = []

    def image_root(self) -> nn.Module:
        raise NotImplementedError

    def text_root(self) -> nn.Module:
        raise NotImplementedError

    def lower(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen part of the image tower (cached)."""
        return pixels

    def upper(self, act: torch.Tensor) -> torch.Tensor:
        """Adapted part of the image tower: cached activations -> (N, D) normalised features."""
        raise NotImplementedError

    def text(self) -> TextTower:
        return text_tower(self.view)


class _OpenClipLora(LoraTowers):
    kind, cached_below = "open_clip", "pixels"

    def __init__(self, backbone: Any) -> None:
        super().__init__(backbone)
        self.view.model = copy.deepcopy(backbone.model)
        self.image_targets = ["visual." + n for n in split_attention(self.view.model.visual)]
        self.text_targets = ["transformer." + n for n in split_attention(self.view.model.transformer)]
        if not self.image_targets or not self.text_targets:
            raise UsageError(f"clip-lora needs attention layers in both towers of {backbone.spec}",
                             hint="use a ViT open_clip model (e.g. ViT-B-16)")

    def image_root(self):
        return self.view.model

    text_root = image_root

    def upper(self, act):
        return F.normalize(self.view.model.encode_image(act).float(), dim=-1)


class _HFClipLora(LoraTowers):
    kind, cached_below = "hf", "pixels"

    def __init__(self, backbone: Any) -> None:
        super().__init__(backbone)
        self.view.model = copy.deepcopy(backbone.model)
        names = [n for n, _ in self.view.model.named_modules()]
        pick = ("q_proj", "k_proj", "v_proj")
        self.image_targets = [n for n in names if n.startswith("vision_model.") and n.rsplit(".", 1)[-1] in pick]
        self.text_targets = [n for n in names if n.startswith("text_model.") and n.rsplit(".", 1)[-1] in pick]

    def image_root(self):
        return self.view.model

    text_root = image_root

    def upper(self, act):
        m = self.view.model
        return F.normalize(m.visual_projection(m.vision_model(pixel_values=act).pooler_output).float(), dim=-1)


class _BridgeLora(LoraTowers):
    kind, cached_below = "bridge", "EfficientNet-Lite0 activations after blocks.5 (7x7x192)"
    FIRST_ADAPTED_STAGE = 6

    def __init__(self, backbone: Any) -> None:
        super().__init__(backbone)
        self.view.image_model = copy.deepcopy(backbone.image_model)
        self.view.text_model = copy.deepcopy(backbone.text_model)
        img = self.view.image_model
        for name, module in img.named_modules():
            parts = name.split(".")
            if (len(parts) >= 3 and parts[0] == "blocks" and int(parts[1]) >= self.FIRST_ADAPTED_STAGE
                    and parts[-1] in ("conv_pw", "conv_pwl") and isinstance(module, nn.Conv2d)):
                self.image_targets.append(name)
        self.image_targets.append("conv_head")
        self.text_targets = [n for n, _ in self.view.text_model.named_modules()
                             if n.rsplit(".", 1)[-1] in ("query", "key", "value")]

    def image_root(self):
        return self.view.image_model

    def text_root(self):
        return self.view.text_model

    def lower(self, pixels):
        m = self.view.image_model
        x = m.bn1(m.conv_stem(pixels.contiguous(memory_format=torch.channels_last)))
        for block in m.blocks[:self.FIRST_ADAPTED_STAGE]:
            x = block(x)
        return x

    def upper(self, act):
        m = self.view.image_model
        x = act
        for block in m.blocks[self.FIRST_ADAPTED_STAGE:]:
            x = block(x)
        x = m.bn2(m.conv_head(x))
        return F.normalize(x.mean(dim=(2, 3)).float(), dim=-1)


class _TinyLora(LoraTowers):
    kind, cached_below = "tiny", "output of the first convolution"

    def __init__(self, backbone: Any) -> None:
        super().__init__(backbone)
        self.view.image_net = copy.deepcopy(backbone.image_net)
        self.view.word_emb = copy.deepcopy(backbone.word_emb)
        self.image_targets = ["2"]
        self.text_targets = ["word_emb"]
        self._text_holder = nn.ModuleDict({"word_emb": self.view.word_emb})

    def image_root(self):
        return self.view.image_net

    def text_root(self):
        return self._text_holder

    def text(self):
        self.view.word_emb = self._text_holder["word_emb"]
        return text_tower(self.view)

    def lower(self, pixels):
        return self.view.image_net[1](self.view.image_net[0](pixels))

    def upper(self, act):
        net = self.view.image_net
        x = act
        for layer in list(net)[2:]:
            x = layer(x)
        return F.normalize(x.flatten(2).mean(-1).float(), dim=-1)


def lora_towers(backbone: Any) -> LoraTowers:
    """The LoRA view of ``backbone``'s kind (read from the modules it owns)."""
    model = getattr(backbone, "model", None)
    if hasattr(backbone, "image_net") and hasattr(backbone, "word_emb"):
        return _TinyLora(backbone)
    if model is not None and hasattr(model, "visual") and hasattr(model, "transformer"):
        return _OpenClipLora(backbone)
    if model is not None and hasattr(model, "vision_model") and hasattr(model, "text_model"):
        return _HFClipLora(backbone)
    if hasattr(backbone, "image_model") and hasattr(backbone, "text_model"):
        return _BridgeLora(backbone)
    raise UsageError(f"clip-lora does not know the towers of {getattr(backbone, 'spec', backbone)!r}",
                     hint="use an open_clip ViT, a Hugging Face CLIP, bridge:lite0-minilm or tiny:clip backbone")


PixelFn = Callable[..., torch.Tensor]
