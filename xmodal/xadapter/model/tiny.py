"""Seeded random tiny BERT / RoBERTa folders for tests and smoke runs (no downloads).

``build_tiny_plm(dir, "bert")`` writes a Hugging Face folder (config, safetensors weights, tokenizer)
that ``--plm dir`` accepts like any local model. The vocabulary is built from the given texts plus the
basic colour words, so the colour probe works on it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

COLORS = ["black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red", "white", "yellow"]
_BASE_TEXTS = [
    "what is the color of a banana ? it is yellow .",
    "q : what is the usual typical common colour of the inside of an object ? a : it is",
    "the sky usually has the color of blue , grass is green and snow is white .",
]


def _words(texts: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for text in texts:
        for w in re.findall(r"\w+|[^\w\s]", text.lower()):
            counts[w] = counts.get(w, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))


def build_tiny_plm(directory: str | Path, arch: str = "bert", texts: list[str] | None = None, *,
                   hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int = 64,
                   max_vocab: int = 2000, max_positions: int = 130, head: str = "mlm", seed: int = 0) -> Path:
    """Write a random tiny PLM folder. ``head``: "mlm" (…ForMaskedLM) or "none" (bare …Model)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    texts = list(texts or []) + _BASE_TEXTS + [" ".join(COLORS)] * 20
    if arch == "bert":
        from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        words = [w for w in _words(texts) if w not in specials]
        vocab = specials + sorted(set(words[: max_vocab - len(specials) - len(COLORS)]) | set(COLORS))
        tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
        config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=intermediate,
                            max_position_embeddings=max_positions, pad_token_id=0)
        model_cls = BertForMaskedLM if head == "mlm" else BertModel
    elif arch == "roberta":
        from tokenizers import ByteLevelBPETokenizer
        from transformers import RobertaConfig, RobertaForMaskedLM, RobertaModel, RobertaTokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=max_vocab, min_frequency=2, show_progress=False,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        vocab_file, merges_file = bpe.save_model(str(directory))
        merges = [tuple(line.split(" ")) for line in Path(merges_file).read_text().splitlines() if line and not line.startswith("#")]
        tokenizer = RobertaTokenizer(vocab=json.loads(Path(vocab_file).read_text()), merges=merges)
        config = RobertaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=intermediate,
                               max_position_embeddings=max_positions, pad_token_id=1, bos_token_id=0,
                               eos_token_id=2, type_vocab_size=1)
        model_cls = RobertaForMaskedLM if head == "mlm" else RobertaModel
    else:
        raise ValueError(f"arch must be 'bert' or 'roberta', got {arch!r}")
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
