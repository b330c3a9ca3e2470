"""BERT-style masking (80/10/10) and the leakage-free text that CLIP sees (papers.md A.5, A.6)."""
from __future__ import annotations

import torch


def special_tokens_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype)
    return torch.isin(input_ids, special.to(input_ids.device))


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, ratio: float = 0.15,
                generator: torch.Generator | None = None,
                focus_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (masked input ids, labels with -100 on unselected positions, bool "replaced by [MASK]" matrix).

    Each real, non-special token is selected with probability ``ratio`` (at least one per sequence);
    of the selected, 80% become the mask token, 10% a random token and 10% stay unchanged.
    ``focus_ids``: token ids that are always selected when present (e.g. the colour terms); the random
    draws are the same with or without it, so the rest of the selection does not change.
    """
    ids = input_ids.clone()
    candidates = attention_mask.bool() & ~special_tokens_mask(ids, tokenizer)
    probs = torch.rand(ids.shape, generator=generator)
    selected = (probs < ratio) & candidates
    if focus_ids is not None and focus_ids.numel():
        selected |= torch.isin(ids, focus_ids.to(ids.device)) & candidates
    # at least one prediction per sequence that has a candidate
    none = ~selected.any(1) & candidates.any(1)
    if none.any():
        noise = torch.rand(ids.shape, generator=generator).masked_fill(~candidates, -1.0)
        pick = noise.argmax(1)
        rows = none.nonzero().flatten()
        selected[rows, pick[rows]] = True
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    ids[to_mask] = tokenizer.mask_token_id
    vocab = len(tokenizer)
    random_ids = torch.randint(vocab, ids.shape, generator=generator, dtype=ids.dtype)
    ids[to_random] = random_ids[to_random]
    return ids, labels, to_mask


def visible_texts(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer) -> list[str]:
    """The text the PLM actually sees, with mask and other special tokens dropped.

    This is what the retrieval query and the T-expert receive during MLM, so the words hidden behind
    a mask never reach CLIP.
    """
    drop = set(tokenizer.all_special_ids)
    out = []
    for row, keep in zip(input_ids.tolist(), attention_mask.bool().tolist()):
        ids = [i for i, k in zip(row, keep) if k and i not in drop]
        out.append(" ".join(tokenizer.decode(ids, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=True).split()))
    return out
