"""Configuration of an X-adapter (papers.md A.4, reconstruction [R])."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ...errors import XmodalError

EXPERTS = ("v", "t")
FEATURE_SOURCES = ("pooled", "tokens")


def parse_experts(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"v,t"`` / ``"v"`` / ``"t"`` / ``"none"`` -> a tuple of expert names in canonical order."""
    if text is None:
        return EXPERTS
    if isinstance(text, str):
        parts = [p.strip().lower() for p in text.replace("+", ",").split(",") if p.strip()]
    else:
        parts = [str(p).strip().lower() for p in text]
    if parts in (["none"], ["off"], []):
        return ()
    bad = [p for p in parts if p not in EXPERTS]
    if bad:
        raise XmodalError(f"unknown expert(s) {bad}; use a comma list of 'v' (image side) and 't' (text side), or 'none'")
    return tuple(e for e in EXPERTS if e in parts)


def parse_layers(text: str | list[int] | None, num_layers: int) -> list[int]:
    """Layer selection -> sorted 0-based indices of the PLM layers an adapter follows.

    Accepts a list of ints, ``"top2"`` / ``"top-N"``, ``"all"``, ``"top-half"``, ``"bottom-half"``
    or a comma list such as ``"4,5"``. Negative indices count from the top (-1 = last layer).
    """
    if text is None:
        text = "top2"
    if isinstance(text, str):
        key = text.strip().lower().replace("_", "-")
        if key == "all":
            out = list(range(num_layers))
        elif key == "top-half":
            out = list(range(num_layers // 2, num_layers))
        elif key == "bottom-half":
            out = list(range(num_layers // 2))
        elif key.startswith("top"):
            n = int(key[3:].lstrip("-") or 1)
            out = list(range(max(0, num_layers - n), num_layers))
        else:
            try:
                out = [int(p) for p in key.split(",") if p.strip()]
            except ValueError as exc:
                raise XmodalError(f"cannot read layer selection {text!r}; use e.g. 'top2', 'all', 'top-half' or '4,5'") from exc
    else:
        out = [int(i) for i in text]
    resolved = sorted({i % num_layers if -num_layers <= i < 0 else i for i in out})
    bad = [i for i in resolved if not 0 <= i < num_layers]
    if bad or not resolved:
        raise XmodalError(f"layer indices {bad or out} out of range for a PLM with {num_layers} layers (0..{num_layers - 1})")
    return resolved


@dataclass
class XAdapterConfig:
    """Everything that defines the added modules (the PLM side is filled in by ``add_xadapter``).

    experts         which experts exist: ``("v", "t")``, ``("v",)`` or ``("t",)``
    layers          PLM layer indices (0-based) after which an X-adapter sits; ``None`` = top 2,
                    or a selector string ("top2", "all", "top-half", "bottom-half", "4,5")
    heads           cross-attention heads
    attn_dim        width of the cross-attention (Q/K/V/O). ``None`` = hidden_size // 4, rounded down
                    to a multiple of ``heads``
    proj_dim        width of the projected CLIP features X~ = LN(X W_in + b_in). ``None`` = attn_dim.
                    ``attn_dim = proj_dim = hidden_size`` reproduces A.4 literally (W_in in R^{d_c x d},
                    W_q, W_k, W_v, W_o in R^{d x d}); that costs ~11% of BERT-base with four experts
                    (and ~18% of MiniLM-L6 with 1280-d features), over the 10% budget, hence the
                    narrower default
    bottleneck      r, width of the bottleneck FFN
    feature_source  "pooled" (one CLIP embedding per image / per text) or "tokens" (image patch tokens
                    of every retrieved image, per-token text states)
    k               images retrieved per text for the V-expert
    clip_dim        width of the CLIP features fed to the V-expert (embed_dim for pooled, token_dim for tokens)
    clip_dim_text   width of the T-expert's CLIP features (None = clip_dim)
    mask_ratio      MLM masking ratio used during adaptation
    dropout         dropout on the expert outputs (attention output and FFN output)
    init_std        normal init std of the non-zero weights
    """

    experts: tuple[str, ...] = EXPERTS
    layers: Any = None
    heads: int = 4
    attn_dim: int | None = None
    proj_dim: int | None = None
    bottleneck: int = 128
    feature_source: str = "pooled"
    k: int = 4
    clip_dim: int | None = None
    clip_dim_text: int | None = None
    mask_ratio: float = 0.15
    dropout: float = 0.1
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5
    # filled in when the adapter is attached to a PLM
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    model_type: str | None = None
    # where the CLIP features come from (informational, checked when a bank is used)
    backbone: str | None = None
    backbone_fingerprint: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.experts = parse_experts(self.experts)
        if not self.experts:
            raise XmodalError("an X-adapter needs at least one expert ('v' and/or 't')")
        if self.feature_source not in FEATURE_SOURCES:
            raise XmodalError(f"feature_source must be one of {FEATURE_SOURCES}, got {self.feature_source!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise XmodalError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.k < 1:
            raise XmodalError(f"k (retrieved images per text) must be >= 1, got {self.k}")

    # ------------------------------------------------------------------------------------------
    def resolved(self, hidden_size: int, num_hidden_layers: int, model_type: str) -> "XAdapterConfig":
        """A copy with the PLM-dependent fields filled in (layers, attn_dim, clip dims)."""
        cfg = dataclasses.replace(self, extra=dict(self.extra))
        cfg.hidden_size, cfg.num_hidden_layers, cfg.model_type = hidden_size, num_hidden_layers, model_type
        cfg.layers = parse_layers(self.layers, num_hidden_layers)
        if cfg.attn_dim is None:
            cfg.attn_dim = max(cfg.heads, (hidden_size // 4) // cfg.heads * cfg.heads)
        if cfg.proj_dim is None:
            cfg.proj_dim = cfg.attn_dim
        if cfg.attn_dim % cfg.heads:
            raise XmodalError(f"attn_dim {cfg.attn_dim} is not divisible by heads {cfg.heads}")
        if cfg.clip_dim is None:
            raise XmodalError("clip_dim is unknown: build the config with XAdapterConfig.for_backbone(backbone, ...) "
                              "or pass clip_dim explicitly")
        if cfg.clip_dim_text is None:
            cfg.clip_dim_text = cfg.clip_dim
        return cfg

    @classmethod
    def for_backbone(cls, backbone, **kwargs) -> "XAdapterConfig":
        """Fill clip dims, backbone spec and fingerprint from a ``VisionLanguageBackbone``."""
        source = kwargs.get("feature_source", "pooled")
        dim = backbone.embed_dim if source == "pooled" else backbone.token_dim
        kwargs.setdefault("clip_dim", dim)
        kwargs.setdefault("clip_dim_text", dim)
        kwargs.setdefault("backbone", backbone.spec)
        kwargs.setdefault("backbone_fingerprint", backbone.fingerprint())
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["experts"] = list(self.experts)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "XAdapterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
