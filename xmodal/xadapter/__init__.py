"""X-adapter: plug-in cross-modal adapters that give a frozen text-only PLM visual knowledge.

papers.md part A. Layout:

    model/      config, expert modules + injection + save/load, MLM masking, PLM loading, tiny PLMs
    retrieval/  the image bank (+ its CLI command) and the per-batch CLIP context (ContextBuilder)
    tasks/      train (MLM adaptation), probe (colours), glue, fill_mask, adapted (inference assembly)
    cli.py      the commands: xadapter train/bank, probe colors, glue, fill-mask

Public API:

    from xmodal.xadapter import XAdapterConfig, add_xadapter, save_xadapter, load_xadapter, FillMask
    cfg = XAdapterConfig.for_backbone(backbone, experts="v,t", layers="top2")
    stack = add_xadapter(model, cfg)              # model: Bert/Roberta(Model|ForMaskedLM|ForSequenceClassification)
    with stack.context(builder.build(texts)):     # per-batch CLIP context
        out = model(**batch)
"""
import importlib as _importlib
import sys as _sys

# The modules lived side by side in this package before it had sub-packages; ``xmodal.xadapter.bank``,
# ``xmodal.xadapter.train`` etc. stay importable as the very same module objects.
_LEGACY = {"config": "model.config", "modules": "model.modules", "masking": "model.masking", "plm": "model.plm",
           "tiny": "model.tiny", "bank": "retrieval.bank", "bank_cli": "retrieval.bank_cli",
           "context": "retrieval.context", "train": "tasks.train", "probe": "tasks.probe", "glue": "tasks.glue",
           "fill_mask": "tasks.fill_mask"}
for _old, _new in _LEGACY.items():
    _mod = _importlib.import_module(f"{__name__}.{_new}")
    _sys.modules.setdefault(f"{__name__}.{_old}", _mod)
    globals()[_old] = _mod

from .model.config import XAdapterConfig, parse_experts  # noqa: E402
from .model.masking import mask_tokens, visible_texts  # noqa: E402
from .model.modules import (  # noqa: E402
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
    plm_fingerprint,
    read_xadapter_meta,
    remove_xadapter,
    save_xadapter,
)
from .retrieval.context import ContextBuilder, load_bank  # noqa: E402
from .tasks.fill_mask import FillMask  # noqa: E402

__all__ = [
    "XAdapterConfig", "parse_experts", "ContextBuilder", "load_bank", "mask_tokens", "FillMask",
    "visible_texts", "Expert", "XAdapterLayer", "XAdapterStack", "XContext", "adapter_parameters",
    "add_xadapter", "count_parameters", "get_xadapter", "has_xadapter", "load_xadapter", "mark_new_head",
    "plm_fingerprint", "read_xadapter_meta", "remove_xadapter", "save_xadapter",
]
