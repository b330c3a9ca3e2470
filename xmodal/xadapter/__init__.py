"""X-adapter: plug-in cross-modal adapters that give a frozen text-only PLM visual knowledge.

papers.md part A. Public API:

    from xmodal.xadapter import XAdapterConfig, add_xadapter, save_xadapter, load_xadapter
    cfg = XAdapterConfig.for_backbone(backbone, experts="v,t", layers="top2")
    stack = add_xadapter(model, cfg)              # model: Bert/Roberta(Model|ForMaskedLM|ForSequenceClassification)
    with stack.context(builder.build(texts)):     # per-batch CLIP context
        out = model(**batch)
"""
from .config import XAdapterConfig, parse_experts, parse_layers
from .context import ContextBuilder, load_bank
from .masking import mask_tokens, visible_texts
from .modules import (
    Expert,
    XAdapterLayer,
    XAdapterStack,
    XContext,
    adapter_parameters,
    add_xadapter,
    count_parameters,
    get_xadapter,
    has_xadapter,
    load_xadapter,
    mark_new_head,
    read_xadapter_meta,
    remove_xadapter,
    save_xadapter,
)

__all__ = [
    "XAdapterConfig", "parse_experts", "parse_layers", "ContextBuilder", "load_bank", "mask_tokens",
    "visible_texts", "Expert", "XAdapterLayer", "XAdapterStack", "XContext", "adapter_parameters",
    "add_xadapter", "count_parameters", "get_xadapter", "has_xadapter", "load_xadapter", "mark_new_head",
    "read_xadapter_meta", "remove_xadapter", "save_xadapter",
]
