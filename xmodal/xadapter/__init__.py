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
import importlib.abc as _abc
import importlib.util as _util
import sys as _sys

# The modules lived side by side in this package before it had sub-packages; ``xmodal.xadapter.bank``,
# ``xmodal.xadapter.train`` etc. stay importable as the very same module objects. Nothing is imported
# until it is used, so ``xmodal --help`` (which registers these commands) does not load torch.
_LEGACY = {"config": "model.config", "modules": "model.modules", "masking": "model.masking", "plm": "model.plm",
           "tiny": "model.tiny", "bank": "retrieval.bank", "bank_cli": "retrieval.bank_cli",
           "context": "retrieval.context", "train": "tasks.train", "probe": "tasks.probe", "glue": "tasks.glue",
           "fill_mask": "tasks.fill_mask"}
_PUBLIC = {
    "XAdapterConfig": "model.config", "parse_experts": "model.config", "mask_tokens": "model.masking",
    "visible_texts": "model.masking", "ContextBuilder": "retrieval.context", "load_bank": "retrieval.context",
    "FillMask": "tasks.fill_mask",
    **{name: "model.modules" for name in (
        "Expert", "XAdapterLayer", "XAdapterStack", "XContext", "adapter_parameters", "add_xadapter",
        "count_parameters", "get_xadapter", "has_xadapter", "load_xadapter", "mark_new_head", "plm_fingerprint",
        "read_xadapter_meta", "remove_xadapter", "save_xadapter")},
}


class _AliasLoader(_abc.Loader):
    """Loads ``xmodal.xadapter.<old>`` as the module object of its new home."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return _importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass


class _AliasFinder(_abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        prefix = __name__ + "."
        if fullname.startswith(prefix) and fullname[len(prefix):] in _LEGACY:
            return _util.spec_from_loader(fullname, _AliasLoader(f"{__name__}.{_LEGACY[fullname[len(prefix):]]}"))
        return None


if not any(isinstance(f, _AliasFinder) for f in _sys.meta_path):
    _sys.meta_path.append(_AliasFinder())


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(_importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    if name in _LEGACY:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_PUBLIC)
