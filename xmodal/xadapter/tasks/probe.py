"""Zero-shot object-colour probing with a masked LM, with or without X-adapters (papers.md A.7)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import DatasetError, XmodalError
from ..model.modules import get_xadapter, has_xadapter

# VaLM's nine prompts; the mask goes right after the last word [V S4, V3 S3]
VALM_TEMPLATES = [
    "Q: What is the color of [DESCRIPTOR] [ITEM]? A: It is",
    "What is the color of [DESCRIPTOR] [ITEM]? It is",
    "What is the usual color of [DESCRIPTOR] [ITEM]?",
    "What is the typical color of [DESCRIPTOR] [ITEM]?",
    "The color of [DESCRIPTOR] [ITEM] is",
    "The usual color of [DESCRIPTOR] [ITEM] is",
    "The common color of [DESCRIPTOR] [ITEM] is",
    "The typical color of [DESCRIPTOR] [ITEM] is",
    "[DESCRIPTOR] [ITEM] usually has the color of",
]
# Norlund et al.'s 13 masked templates ([V S5]); [SEP] becomes the tokenizer's separator
NORLUND_TEMPLATES = [
    "Q: What is the color of [DESCRIPTOR] [ITEM]? A: It is [MASK].",
    "Q: What is the color of [DESCRIPTOR] [ITEM]? [SEP] A: It is [MASK].",
    "Q: What is the colour of [DESCRIPTOR] [ITEM]? A: It is [MASK].",
    "What is the color of [DESCRIPTOR] [ITEM]? [MASK].",
    "What is the color of [DESCRIPTOR] [ITEM]? [SEP] [MASK].",
    "What is the colour of [DESCRIPTOR] [ITEM]? [MASK].",
    "The color of [ITEM] is [MASK].",
    "The usual color of [DESCRIPTOR] [ITEM] is [MASK].",
    "[DESCRIPTOR] [ITEM] usually has the color of [MASK].",
    "What is the usual color of [DESCRIPTOR] [ITEM]? [MASK].",
    "What is the usual color of [DESCRIPTOR] [ITEM]? [SEP] [MASK].",
    "What is the typical color of [DESCRIPTOR] [ITEM]? [MASK].",
    "What is the typical color of [DESCRIPTOR] [ITEM]? [SEP] [MASK].",
]
TEMPLATE_SETS = {"valm": VALM_TEMPLATES, "valag": VALM_TEMPLATES, "norlund": NORLUND_TEMPLATES}


@dataclass
class ColorItem:
    descriptor: str
    item: str
    color: str


def read_color_csv(path: str | Path) -> list[ColorItem]:
    """Memory Colors (Index, Descriptor, Item, Color) or Color Terms (object, color)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"colour dataset {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise DatasetError(f"{path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    items = []
    if {"item", "color"} <= set(header):
        i_d = header.index("descriptor") if "descriptor" in header else None
        i_i, i_c = header.index("item"), header.index("color")
    elif {"object", "color"} <= set(header):
        i_d, i_i, i_c = None, header.index("object"), header.index("color")
    else:
        raise DatasetError(f"{path}: unknown colour CSV header {rows[0]}; expected Memory Colors "
                           "(Index,Descriptor,Item,Color) or Color Terms (object,color)")
    for lineno, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(i_i, i_c):
            raise DatasetError(f"{path}:{lineno}: too few columns")
        desc = row[i_d].strip() if i_d is not None and i_d < len(row) else ""
        items.append(ColorItem(desc, row[i_i].strip(), row[i_c].strip().lower()))
    if not items:
        raise DatasetError(f"{path} has no rows")
    return items


def fill_template(template: str, item: ColorItem, tokenizer, trailing_period: bool = False) -> tuple[str, str]:
    """-> (prompt with the tokenizer's mask token, retrieval/CLIP query without mask and separators)."""
    text = template
    if item.descriptor:
        text = text.replace("[DESCRIPTOR]", item.descriptor)
    else:
        text = text.replace("[DESCRIPTOR] ", "").replace("[DESCRIPTOR]", "")
    text = text.replace("[ITEM]", item.item)
    if "[MASK]" not in text:
        text = text + " [MASK]" + ("." if trailing_period else "")
    query = " ".join(text.replace("[MASK]", " ").replace("[SEP]", " ").split())
    query = query.replace(" .", ".").replace(" ?", "?").rstrip(". ").strip()
    prompt = text.replace("[MASK]", tokenizer.mask_token).replace("[SEP]", tokenizer.sep_token or "")
    return " ".join(prompt.split()), query


def color_token_ids(colors: list[str], tokenizer) -> dict[str, int]:
    """Single-token id of each colour (RoBERTa/BPE: the leading-space form, e.g. "Ġred")."""
    out, bad = {}, []
    for color in colors:
        ids = tokenizer.encode(" " + color, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            bad.append(f"{color} -> {tokenizer.convert_ids_to_tokens(ids)}")
        else:
            out[color] = ids[0]
    if bad:
        raise XmodalError("every candidate colour must be a single token of the PLM vocabulary; not so for: "
                          + ", ".join(bad))
    return out


@torch.no_grad()
def probe_colors(model, tokenizer, items: list[ColorItem], templates: str = "valm", trailing_period: bool = False,
                 builder=None, batch_size: int = 64, device: str | torch.device = "cpu",
                 details: bool = False) -> dict:
    """Accuracy (%) over template x object, argmax restricted to the colours present in ``items``.

    ``builder`` (a ``ContextBuilder``) supplies the CLIP context when the model has active experts.
    ``details=True`` adds ``predictions``: one record per (template, object) with the gold and predicted
    colour and the candidate probabilities (for paired statistics and per-class confusions).
    """
    if templates not in TEMPLATE_SETS:
        raise XmodalError(f"unknown template set {templates!r}; use valm (VaLM's 9) or norlund (13)")
    tmpl = TEMPLATE_SETS[templates]
    colors = sorted({it.color for it in items})
    ids = color_token_ids(colors, tokenizer)
    cand = torch.tensor([ids[c] for c in colors], device=device)
    active = get_xadapter(model).active_experts if has_xadapter(model) else ()
    if active and builder is None:
        raise XmodalError("the X-adapter has active experts but no CLIP context builder was given")
    model.eval()
    jobs = [(t, it) for t in range(len(tmpl)) for it in items]
    correct = torch.zeros(len(tmpl), dtype=torch.long)
    confusion: dict[str, dict[str, int]] = {c: {d: 0 for d in colors} for c in colors}
    examples, records = [], []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start: start + batch_size]
        filled = [fill_template(tmpl[t], it, tokenizer, trailing_period) for t, it in chunk]
        enc = tokenizer([p for p, _ in filled], return_tensors="pt", padding=True).to(device)
        mask_pos = (enc["input_ids"] == tokenizer.mask_token_id)
        if not bool((mask_pos.sum(1) == 1).all()):
            raise XmodalError("each prompt must contain exactly one mask token after tokenisation")
        if active:
            ctx = builder.build([q for _, q in filled], active)
            with get_xadapter(model).context(ctx):
                logits = model(**enc).logits
        else:
            logits = model(**enc).logits
        at_mask = logits[mask_pos]                                   # (B, V)
        cand_logits = at_mask[:, cand].float()
        pred = cand_logits.argmax(-1).cpu()
        if details:
            probs = cand_logits.softmax(-1).cpu()
            for (t, it), p, row in zip(chunk, pred.tolist(), probs.tolist()):
                records.append({"template": t, "item": f"{it.descriptor} {it.item}".strip(), "gold": it.color,
                                "pred": colors[p], "probs": [round(x, 5) for x in row]})
        for (t, it), p, (prompt, query) in zip(chunk, pred.tolist(), filled):
            guess = colors[p]
            correct[t] += int(guess == it.color)
            confusion[it.color][guess] += 1
            if len(examples) < 5:
                examples.append({"prompt": prompt, "query": query, "gold": it.color, "pred": guess})
    n = len(items)
    extra = {"predictions": records} if details else {}
    per_template = [{"template": tmpl[t], "accuracy": round(100.0 * int(correct[t]) / n, 2)} for t in range(len(tmpl))]
    return {
        "accuracy": round(100.0 * int(correct.sum()) / (n * len(tmpl)), 2),
        "per_template": per_template, "n_objects": n, "n_templates": len(tmpl), "predictions": n * len(tmpl),
        "candidates": colors, "templates": templates, "trailing_period": trailing_period,
        "experts": list(active), "confusion": confusion, "examples": examples, **extra,
    }


@torch.no_grad()
def candidate_probs(model, tokenizer, prompts: list[str], candidates: list[str], visual: torch.Tensor | None = None,
                    visual_mask: torch.Tensor | None = None, batch_size: int = 128,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """Softmax over ``candidates`` at the one mask of each prompt -> (N, C) float tensor (CPU).

    ``visual`` (N, m, D) [+ ``visual_mask`` (N, m)]: what the V-expert sees for each prompt (e.g. the
    image the prompt is about); None runs the model as it is (experts off, or no adapter).
    """
    ids = color_token_ids(candidates, tokenizer)
    cand = torch.tensor([ids[c] for c in candidates], device=device)
    stack = get_xadapter(model) if has_xadapter(model) else None
    if visual is not None and (stack is None or "v" not in stack.active_experts):
        raise XmodalError("visual input was given but the model has no active V-expert")
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        mask_pos = enc["input_ids"] == tokenizer.mask_token_id
        if not bool((mask_pos.sum(1) == 1).all()):
            raise XmodalError("each prompt must contain exactly one mask token after tokenisation")
        if visual is not None:
            vm = None if visual_mask is None else visual_mask[start: start + batch_size].to(device)
            with stack.context(visual=visual[start: start + batch_size].to(device), visual_mask=vm):
                logits = model(**enc).logits
        else:
            logits = model(**enc).logits
        out.append(logits[mask_pos][:, cand].float().softmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0, len(candidates))


__all__ = ["candidate_probs", "VALM_TEMPLATES", "NORLUND_TEMPLATES", "read_color_csv", "fill_template", "color_token_ids", "probe_colors"]
