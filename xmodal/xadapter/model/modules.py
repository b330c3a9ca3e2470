"""V-expert / T-expert modules and their injection into Hugging Face BERT / RoBERTa encoders.

The base model is never edited: ``add_xadapter`` registers a forward hook on each chosen
``encoder.layer[i]`` that rewrites the layer's output

    H' = H + g_V (E_V(H, X_V) - H) + g_T (E_T(H, X_T) - H)

and attaches the adapter parameters as one sub-module ``model.xadapter`` (an ``XAdapterStack``).
The CLIP context (X_V, X_T and their masks) is given per batch::

    with model.xadapter.context(visual=xv, visual_mask=mv, text=xt, text_mask=mt):
        out = model(**batch)

or ``model.xadapter.set_context(...)`` / ``clear_context()``. Gates are switched at run time with
``model.xadapter.set_gates(v=True, t=False)``.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CacheMismatchError, ShapeError, XmodalError
from ...filemode import apply_umask
from .config import XAdapterConfig, parse_experts

WEIGHTS_NAME = "xadapter.safetensors"
CONFIG_NAME = "xadapter_config.json"
FORMAT_VERSION = 1


@dataclass
class XContext:
    """CLIP features for one batch. Shapes: visual (B, m_V, d_c), text (B, m_T, d_c'); masks bool, True = real."""

    visual: torch.Tensor | None = None
    visual_mask: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None

    def to(self, device) -> "XContext":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return XContext(move(self.visual), move(self.visual_mask), move(self.text), move(self.text_mask))


# ------------------------------------------------------------------------------------------------
class Expert(nn.Module):
    """One expert E(H, X): residual cross-attention to projected CLIP features + bottleneck FFN."""

    def __init__(self, hidden: int, clip_dim: int, heads: int, attn_dim: int, bottleneck: int,
                 dropout: float = 0.1, eps: float = 1e-5, init_std: float = 0.02, proj_dim: int | None = None) -> None:
        super().__init__()
        proj_dim = proj_dim or hidden
        self.heads, self.attn_dim = heads, attn_dim
        self.in_proj = nn.Linear(clip_dim, proj_dim)    # W_in: modality projection
        self.in_norm = nn.LayerNorm(proj_dim, eps=eps)
        self.q = nn.Linear(hidden, attn_dim)
        self.k = nn.Linear(proj_dim, attn_dim)
        self.v = nn.Linear(proj_dim, attn_dim)
        self.o = nn.Linear(attn_dim, hidden)            # W_o, zero-initialised
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.down = nn.Linear(hidden, bottleneck)       # W_down
        self.up = nn.Linear(bottleneck, hidden)         # W_up, zero-initialised
        self.drop = nn.Dropout(dropout)
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.02) -> None:
        for lin in (self.in_proj, self.q, self.k, self.v, self.down):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        for lin in (self.o, self.up):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for norm in (self.in_norm, self.ffn_norm):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)

    def delta(self, h: torch.Tensor, x: torch.Tensor, x_mask: torch.Tensor | None) -> torch.Tensor:
        """E(H, X) - H, i.e. C + F. Exactly zero at initialisation."""
        b, n, _ = h.shape
        x = x.to(dtype=self.in_proj.weight.dtype)
        m = x.shape[1]
        if x_mask is None:
            x_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        x_mask = x_mask.to(dtype=torch.bool)
        has_any = x_mask.any(dim=1)                                  # samples with no context: no cross-attention
        safe_mask = x_mask | ~has_any[:, None]
        xt = self.in_norm(self.in_proj(x))
        dh = self.attn_dim // self.heads
        q = self.q(h).view(b, n, self.heads, dh).transpose(1, 2)
        k = self.k(xt).view(b, m, self.heads, dh).transpose(1, 2)
        v = self.v(xt).view(b, m, self.heads, dh).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :])
        c = self.o(att.transpose(1, 2).reshape(b, n, self.attn_dim))
        c = self.drop(c) * has_any[:, None, None].to(c.dtype)
        z = h + c
        f = self.drop(self.up(F.gelu(self.down(self.ffn_norm(z)))))
        return c + f

    def forward(self, h: torch.Tensor, x: torch.Tensor, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        return h + self.delta(h, x, x_mask)

    @torch.no_grad()
    def attention(self, h: torch.Tensor, x: torch.Tensor, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The cross-attention weights (B, heads, n, m) that ``delta`` uses: a diagnostic (does the expert
        tell its visual inputs apart, or average them?)."""
        b, n, _ = h.shape
        x = x.to(dtype=self.in_proj.weight.dtype)
        m = x.shape[1]
        dh = self.attn_dim // self.heads
        xt = self.in_norm(self.in_proj(x))
        q = self.q(h).view(b, n, self.heads, dh).transpose(1, 2)
        k = self.k(xt).view(b, m, self.heads, dh).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / dh ** 0.5
        if x_mask is not None:
            scores = scores.masked_fill(~x_mask.bool()[:, None, None, :], float("-inf"))
        return scores.softmax(-1)


class XAdapterLayer(nn.Module):
    """The experts placed after one PLM layer."""

    def __init__(self, cfg: XAdapterConfig) -> None:
        super().__init__()
        dims = {"v": cfg.clip_dim, "t": cfg.clip_dim_text}
        self.experts = nn.ModuleDict({
            e: Expert(cfg.hidden_size, dims[e], cfg.heads, cfg.attn_dim, cfg.bottleneck,
                      cfg.dropout, cfg.layer_norm_eps, cfg.init_std, cfg.proj_dim)
            for e in cfg.experts
        })


class _LayerHook:
    """Forward hook on ``encoder.layer[idx]`` that applies the adapter to the layer's output."""

    def __init__(self, stack: "XAdapterStack", idx: int) -> None:
        self.stack, self.idx = stack, idx

    def __call__(self, module, args, output):
        if isinstance(output, tuple):
            return (self.stack.apply_layer(self.idx, output[0]),) + tuple(output[1:])
        if hasattr(output, "last_hidden_state"):  # pragma: no cover - future-proofing
            output.last_hidden_state = self.stack.apply_layer(self.idx, output.last_hidden_state)
            return output
        return self.stack.apply_layer(self.idx, output)


class XAdapterStack(nn.Module):
    """All X-adapters of one PLM, their gates, the current batch context and the hook handles."""

    def __init__(self, cfg: XAdapterConfig) -> None:
        super().__init__()
        self.config = cfg
        self.adapters = nn.ModuleDict({str(i): XAdapterLayer(cfg) for i in cfg.layers})
        self.gates = {e: (e in cfg.experts) for e in ("v", "t")}
        self.head_param_names: list[str] = []   # newly created head parameters (saved with the adapter)
        self._context: XContext | None = None
        self._handles: list = []
        # diagnostics: when a list, every expert application appends (layer, expert, h, features, mask, delta)
        self.trace: list | None = None

    # ----- gates ----------------------------------------------------------------------------
    def set_gates(self, v: bool | None = None, t: bool | None = None) -> None:
        for name, value in (("v", v), ("t", t)):
            if value is None:
                continue
            if value and name not in self.config.experts:
                raise XmodalError(f"this X-adapter has no {name.upper()}-expert (it has: {','.join(self.config.experts)})")
            self.gates[name] = bool(value)

    def set_experts(self, experts: str | tuple | list | None) -> None:
        """Gate on exactly the named experts ("v,t", "v", "t", "none")."""
        names = parse_experts(experts) if experts is not None else self.config.experts
        self.set_gates(v="v" in names, t="t" in names)

    @property
    def active_experts(self) -> tuple[str, ...]:
        return tuple(e for e in ("v", "t") if self.gates[e])

    # ----- context --------------------------------------------------------------------------
    def set_context(self, ctx: XContext | None = None, *, visual=None, visual_mask=None, text=None, text_mask=None) -> None:
        if ctx is None:
            ctx = XContext(visual, visual_mask, text, text_mask)
        for feats, dim, name in ((ctx.visual, self.config.clip_dim, "visual"), (ctx.text, self.config.clip_dim_text, "text")):
            if feats is not None and (feats.dim() != 3 or feats.shape[-1] != dim):
                raise ShapeError(f"{name} context must be (batch, tokens, {dim}); got {tuple(feats.shape)}")
        self._context = ctx

    def clear_context(self) -> None:
        self._context = None

    @contextlib.contextmanager
    def context(self, ctx: XContext | None = None, **kwargs):
        previous = self._context
        self.set_context(ctx, **kwargs)
        try:
            yield self
        finally:
            self._context = previous

    # ----- the rewrite ------------------------------------------------------------------------
    def apply_layer(self, idx: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.adapters[str(idx)]
        ctx = self._context or XContext()
        out = h
        for name, feats, mask in (("v", ctx.visual, ctx.visual_mask), ("t", ctx.text, ctx.text_mask)):
            if not self.gates[name]:
                continue
            if feats is None:
                raise XmodalError(
                    f"the {name.upper()}-expert is on but no {'visual' if name == 'v' else 'text'} context was set; "
                    "wrap the forward in `with model.xadapter.context(...)` or switch it off with "
                    f"model.xadapter.set_gates({name}=False)")
            if feats.shape[0] != h.shape[0]:
                if feats.shape[0] != 1:
                    raise ShapeError(f"{name} context has batch {feats.shape[0]} but the PLM batch is {h.shape[0]}")
                feats = feats.expand(h.shape[0], -1, -1)
                mask = None if mask is None else mask.expand(h.shape[0], -1)
            feats = feats.to(h.device)
            mask = None if mask is None else mask.to(h.device)
            delta = layer.experts[name].delta(h, feats, mask)
            if self.trace is not None:
                self.trace.append((idx, name, h.detach(), feats.detach(), mask, delta.detach()))
            out = out + delta
        return out

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------------------------------
def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise XmodalError(
            f"cannot find encoder.layer in {type(model).__name__}; X-adapters support BERT- and RoBERTa-family "
            "encoders (BertModel, RobertaModel and their *ForMaskedLM / *ForSequenceClassification heads)")
    return layers


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model


def get_xadapter(model: nn.Module) -> XAdapterStack:
    stack = getattr(unwrap(model), "xadapter", None)
    if not isinstance(stack, XAdapterStack):
        raise XmodalError("this model has no X-adapter; call add_xadapter(model, config) or load_xadapter(model, dir)")
    return stack


def has_xadapter(model: nn.Module) -> bool:
    return isinstance(getattr(unwrap(model), "xadapter", None), XAdapterStack)


def plm_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the base encoder's weights (names, shapes, bytes), without the adapter, the pooler and
    any task or MLM head, so the same PLM gives the same value whichever head class loaded it."""
    import hashlib

    model = unwrap(model)
    base = getattr(model, "base_model", model)
    h = hashlib.sha256()
    for name, p in sorted(base.named_parameters(), key=lambda kv: kv[0]):
        if name.startswith(("xadapter.", "pooler.")):
            continue
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:24]


def plm_info(model: nn.Module) -> dict:
    cfg = unwrap(model).config
    return {"model_type": getattr(cfg, "model_type", None), "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": getattr(cfg, "vocab_size", None)}


def add_xadapter(model: nn.Module, config: XAdapterConfig, freeze_base: bool = True) -> XAdapterStack:
    """Attach X-adapters to a HF BERT/RoBERTa model in place; returns ``model.xadapter``.

    Base weights are set to ``requires_grad=False`` (unless ``freeze_base=False``) and never written.
    """
    model = unwrap(model)
    if has_xadapter(model):
        raise XmodalError("this model already has an X-adapter")
    layers = _encoder_layers(model)
    info = plm_info(model)
    if info["model_type"] not in ("bert", "roberta"):
        # same layout (encoder.layer[i] returning hidden states) works; say which families are tested
        import warnings

        warnings.warn(f"X-adapter is tested on BERT and RoBERTa; {info['model_type']!r} has a compatible layout "
                      "and is used as is", stacklevel=2)
    cfg = config.resolved(info["hidden_size"], len(layers), info["model_type"])
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    ref = next(model.parameters())
    stack = XAdapterStack(cfg).to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    stack.train(model.training)  # follow the model's train/eval mode (dropout)
    model.add_module("xadapter", stack)
    for idx in cfg.layers:
        stack._handles.append(layers[idx].register_forward_hook(_LayerHook(stack, idx)))
    return stack


def remove_xadapter(model: nn.Module) -> None:
    model = unwrap(model)
    stack = get_xadapter(model)
    stack.remove_hooks()
    del model._modules["xadapter"]


def mark_new_head(model: nn.Module, names: list[str]) -> list[str]:
    """Record freshly created head parameters (e.g. an MLM head for a bare BertModel) and make them trainable."""
    model = unwrap(model)
    stack = get_xadapter(model)
    params = dict(model.named_parameters())
    kept = []
    for name in names:
        if name in params:
            params[name].requires_grad_(True)
            kept.append(name)
    stack.head_param_names = sorted(set(stack.head_param_names) | set(kept))
    return kept


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Adapter + new-head parameters (what trains during adaptation)."""
    model = unwrap(model)
    stack = get_xadapter(model)
    params = dict(model.named_parameters())
    return list(stack.parameters()) + [params[n] for n in stack.head_param_names]


def count_parameters(model: nn.Module) -> dict:
    """Trainable / adapter / head / PLM parameter counts and percentages of the PLM."""
    model = unwrap(model)
    stack = getattr(model, "xadapter", None)
    adapter_ids = {id(p) for p in stack.parameters()} if isinstance(stack, XAdapterStack) else set()
    head_names = set(stack.head_param_names) if isinstance(stack, XAdapterStack) else set()
    seen, plm, head, adapter, trainable = set(), 0, 0, 0, 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        if id(p) in adapter_ids:
            adapter += p.numel()
        elif name in head_names:
            head += p.numel()
        else:
            plm += p.numel()
    pct = lambda x: 100.0 * x / max(plm, 1)  # noqa: E731
    return {"plm": plm, "adapter": adapter, "new_head": head, "trainable": trainable,
            "adapter_pct_of_plm": pct(adapter), "trainable_pct_of_plm": pct(trainable)}


# ----- persistence ------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        apply_umask(tmp)          # mkstemp makes 0600; the file gets the mode any file the user creates gets
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_xadapter(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write adapter-only weights (safetensors) + JSON config (+ new head weights) to ``directory``."""
    from safetensors.torch import save

    model = unwrap(model)
    stack = get_xadapter(model)
    directory = Path(directory)
    params = dict(model.named_parameters())
    tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in stack.state_dict().items()}
    for name in stack.head_param_names:
        tensors[f"head.{name}"] = params[name].detach().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, "config": stack.config.to_dict(),
            "plm": {**plm_info(model), "fingerprint": plm_fingerprint(model)},
            "head_params": stack.head_param_names, "gates": stack.gates, **(extra or {})}
    _atomic_write_bytes(directory / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    _atomic_write_bytes(directory / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True).encode())
    return directory


def resolve_adapter_dir(directory: str | os.PathLike) -> Path:
    """A training run folder (holding ``xadapter/``) or the adapter folder itself -> the adapter folder."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() and (directory / "xadapter" / CONFIG_NAME).is_file():
        return directory / "xadapter"
    return directory


def read_xadapter_meta(directory: str | os.PathLike) -> dict:
    directory = resolve_adapter_dir(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise XmodalError(f"{directory} is not an X-adapter folder (no {CONFIG_NAME}); "
                          "produce one with `xmodal xadapter train` or save_xadapter()")
    return json.loads(path.read_text())


def load_xadapter(model: nn.Module, directory: str | os.PathLike, load_head: bool = True,
                  freeze_base: bool = True, force: bool = False, log=None) -> XAdapterStack:
    """Attach (if needed) and fill the X-adapter saved in ``directory``.

    Raises ``CacheMismatchError`` when the model's architecture / hidden size / depth differs from the
    PLM the adapter was trained on, or when its base weights differ (the adapter records the PLM's
    fingerprint; ``force=True`` loads anyway, with a warning). With ``load_head=False`` (or when the
    model has no such head, e.g. a sequence classifier) saved head weights are skipped.
    """
    from safetensors.torch import load_file

    model = unwrap(model)
    directory = resolve_adapter_dir(directory)
    meta = read_xadapter_meta(directory)
    saved, here = meta["plm"], plm_info(model)
    diffs = [f"{k}: adapter has {saved.get(k)}, model has {here.get(k)}"
             for k in ("model_type", "hidden_size", "num_hidden_layers") if saved.get(k) != here.get(k)]
    if diffs:
        raise CacheMismatchError(
            f"the X-adapter in {directory} was trained for a different PLM ({'; '.join(diffs)}). "
            "Load it into the same base model it was trained with (same --plm).")
    want = saved.get("fingerprint")
    if want is not None:
        got = plm_fingerprint(model)
        if got != want:
            msg = (f"the X-adapter in {directory} was trained on a PLM with other weights (fingerprint {want}); "
                   f"this PLM's fingerprint is {got}")
            if not force:
                raise CacheMismatchError(msg, hint="load it into the PLM it was trained with (the same --plm), "
                                                   "or pass --force to load it anyway")
            import warnings

            warnings.warn(msg + "; loaded anyway (force)", stacklevel=2)
            if log is not None:
                log("warning: " + msg + "; loaded anyway (--force)")
    cfg = XAdapterConfig.from_dict(meta["config"])
    if has_xadapter(model):
        stack = get_xadapter(model)
        if stack.config.to_dict() != cfg.to_dict():
            remove_xadapter(model)
            stack = add_xadapter(model, cfg, freeze_base=freeze_base)
    else:
        stack = add_xadapter(model, cfg, freeze_base=freeze_base)
    tensors = load_file(str(directory / WEIGHTS_NAME))
    adapter_state = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    missing, unexpected = stack.load_state_dict(adapter_state, strict=False)
    if missing or unexpected:
        raise CacheMismatchError(f"X-adapter weights in {directory} do not match its config "
                                 f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    if load_head and head:
        params = dict(model.named_parameters())
        present = [n for n in head if n in params]
        with torch.no_grad():
            for name in present:
                if params[name].shape != head[name].shape:
                    raise CacheMismatchError(f"head parameter {name} has shape {tuple(head[name].shape)} in {directory} "
                                             f"but {tuple(params[name].shape)} in the model")
                params[name].copy_(head[name].to(params[name].device, params[name].dtype))
        mark_new_head(model, present)
    if "gates" in meta:
        stack.set_gates(**{k: bool(v) and k in cfg.experts for k, v in meta["gates"].items()})
    return stack


def expected_param_count(cfg: XAdapterConfig) -> int:
    """Closed-form parameter count of a resolved config (matches ``XAdapterStack.num_parameters``)."""
    d, a, p, r = cfg.hidden_size, cfg.attn_dim, cfg.proj_dim, cfg.bottleneck
    total = 0
    for e in cfg.experts:
        dc = cfg.clip_dim if e == "v" else cfg.clip_dim_text
        total += (dc * p + p + 2 * p) + (d * a + a) + 2 * (p * a + a) + (a * d + d) + 2 * d + (d * r + r) + (r * d + d)
    return total * len(cfg.layers)


__all__ = [
    "XContext", "Expert", "XAdapterLayer", "XAdapterStack", "add_xadapter", "remove_xadapter", "get_xadapter",
    "has_xadapter", "mark_new_head", "adapter_parameters", "count_parameters", "save_xadapter", "load_xadapter",
    "read_xadapter_meta", "resolve_adapter_dir", "expected_param_count", "unwrap", "plm_info", "plm_fingerprint",
]
