"""Accuracy-vs-shots figure: one panel per dataset plus the average (when there are several datasets),
one line per method.

Error bars are the sample std over seeds (none for single-seed points). Uses the Agg canvas
directly, so it never needs a display and never changes the global matplotlib backend.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .summary import Summary, dataset_notes, summarize


def plot_accuracy_vs_shots(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str], *,
                           methods: Sequence[str] | None = None, datasets: Sequence[str] | None = None,
                           dpi: int = 110) -> Path:
    """Write a PNG to ``path`` (atomically) and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summaries = summarize(list(rows), methods=methods, datasets=datasets)
    panels: list[tuple[str, list[tuple[Summary, Any]]]] = []
    datasets_all = list(dict.fromkeys(d for s in summaries for d in s.datasets))
    for d in datasets_all:
        panels.append((d, [(s, lambda k, m, s=s, d=d: s.cells.get((d, k, m))) for s in summaries]))
    if len(datasets_all) > 1:  # with one dataset the average panel would repeat it
        panels.append((f"average over {len(datasets_all)} dataset(s)",
                       [(s, lambda k, m, s=s: s.average.get((k, m))) for s in summaries]))
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows))
    FigureCanvasAgg(fig)
    multi_backbone = len(summaries) > 1
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors  # 20 distinct colours: the dark half first, then the light
    palette = list(tab20[0::2]) + list(tab20[1::2])
    for i, (title, series) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        markers = "osD^v<>pX*h"
        for s, get in series:
            n_methods = len(s.methods)
            for j, m in enumerate(s.methods):
                pts = [(k, get(k, m)) for k in s.shots if get(k, m) is not None]
                if not pts:
                    continue
                # a small horizontal dodge per method keeps overlapping error bars readable (log2 axis)
                dodge = 2 ** (0.035 * (j - (n_methods - 1) / 2))
                xs = [k * dodge if k > 0 else k for k, _ in pts]
                ys = [st.mean for _, st in pts]
                es = [0.0 if math.isnan(st.std) else st.std for _, st in pts]
                label = f"{m} [{s.backbone}]" if multi_backbone else m
                ax.errorbar(xs, ys, yerr=es, marker=markers[j % len(markers)], markersize=3.5, capsize=3, linewidth=1.4,
                            label=label, color=palette[j % len(palette)])
        shots = sorted({k for s, _ in series for k in s.shots})
        if shots and shots[0] > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(shots)
            ax.set_xticklabels([str(k) for k in shots])
        flag = "\n(ImageNet images: flatters an ImageNet-trained backbone)" if dataset_notes(title) else ""
        ax.set_title(title + flag, fontsize=9)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 (%)")
        ax.grid(True, alpha=0.3)
    if summaries:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8,
                       frameon=False)
        seeds = sorted({x for s in summaries for x in s.seeds})
        stand_in = " (offline stand-in, not CLIP)" if any(s.stand_in for s in summaries) else ""
        fig.suptitle(f"{', '.join(s.backbone for s in summaries)}{stand_in}: mean ± std over "
                     f"{len(seeds)} seed(s)", fontsize=10)
    n_legend_rows = math.ceil(len(summaries[0].methods) / 5) if summaries else 0
    fig.tight_layout(rect=(0, 0.04 + 0.04 * n_legend_rows, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
    return path
