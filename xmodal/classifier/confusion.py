"""Confusion-matrix figure for ``xmodal predict --eval`` (Agg canvas: no display, global backend untouched)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..cache import atomic_path


def write_confusion_png(matrix: torch.Tensor, classes: list[str], path: str | Path, dpi: int = 110,
                        title: str | None = None) -> Path:
    """Rows: true class, columns: predicted class; cells coloured by row-normalised rate, labelled with counts.
    ``title`` (which model, on which images) heads the figure, so a PNG found later says what it shows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = len(classes)
    counts = matrix.double()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    side = min(16.0, 2.5 + 0.45 * c)
    fig = Figure(figsize=(side + 1.5, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = list(range(c))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    fontsize = 9 if c <= 20 else 6
    ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=fontsize)
    ax.set_yticklabels(classes, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (parent folder)")
    if c <= 30:
        for i in range(c):
            for j in range(c):
                n = int(matrix[i, j])
                if n:
                    ax.text(j, i, str(n), ha="center", va="center", fontsize=fontsize,
                            color="white" if rates[i, j] > 0.5 else "black")
    total = int(matrix.sum())
    score = f"top-1 {100 * int(matrix.trace()) / max(total, 1):.2f}% on {total} images"
    if title:
        import textwrap

        title = textwrap.fill(title, width=max(40, int(9 * side)))
    ax.set_title(f"{title}\n{score}" if title else score, fontsize=9 if title else None)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
