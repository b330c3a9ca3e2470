"""Zero-shot text classifier: the prompt-ensemble class embeddings of a backbone."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .encoders.base import VisionLanguageBackbone


def text_classifier(backbone: VisionLanguageBackbone, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """(C, D): for each class, the L2-normalised mean of its normalised template embeddings (CLIP's recipe)."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every prompt template needs one '{{}}' placeholder, got {templates!r}")
    rows = []
    for name in classnames:
        emb = backbone.encode_texts([t.format(name.replace("_", " ")) for t in templates])
        rows.append(F.normalize(emb.float().mean(0), dim=-1))
    return torch.stack(rows).cpu()


def evaluate_zeroshot(backbone: VisionLanguageBackbone, dataset, split: str = "test",
                      templates: list[str] | None = None, **extract_options) -> dict:
    """Zero-shot top-1 (overall and per class) of ``backbone`` on a dataset split, with provenance."""
    import time

    from .features import extract_features

    tpl = list(templates or dataset.templates)
    t0 = time.perf_counter()
    fs = extract_features(backbone, dataset, split, **extract_options)
    weights = text_classifier(backbone, dataset.classnames, tpl)
    correct = (fs.features @ weights.T).argmax(1) == fs.labels
    per_class = {name: round(correct[fs.labels == c].float().mean().item(), 4)
                 for c, name in enumerate(dataset.classnames) if (fs.labels == c).any()}
    return {"top1": round(correct.float().mean().item(), 4), "n": len(fs), "backbone": backbone.name,
            "backbone_spec": backbone.spec, "fingerprint": backbone.fingerprint(), "stand_in": backbone.is_stand_in,
            "dataset": dataset.name, "split": split, "templates": tpl, "per_class": per_class,
            "seconds": round(time.perf_counter() - t0, 2)}


def zeroshot_table(result: dict):
    """A rich table of ``evaluate_zeroshot``'s per-class and overall top-1 (CLI and demo)."""
    from rich.table import Table

    table = Table(title=f"Zero-shot top-1 on {result['dataset']}/{result['split']} — {result['backbone']}")
    table.add_column("class")
    table.add_column("top-1 %", justify="right")
    for name, acc in result["per_class"].items():
        table.add_row(name, f"{100 * acc:.1f}")
    table.add_row("[bold]all[/bold]", f"[bold]{100 * result['top1']:.2f}[/bold]")
    return table
