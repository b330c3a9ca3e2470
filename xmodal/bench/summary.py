"""Result rows aggregated into mean ± std over seeds: the one summary both renderers draw from (the Markdown
table in ``table.py``, the figure in ``plot.py``).

Per (backbone, dataset, shots, method): mean and *sample* standard deviation (ddof=1) of top-1 over
the seeds present. The average-over-datasets block first averages the datasets within each seed
(only seeds for which every dataset has a row), then takes mean ± std over those seeds, so its
spread is a spread over seeds, like every other cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

# Caveats printed under every block of a dataset whose spec or name contains the key (and under the
# average when it includes one): numbers that a reader must not take at face value.
DATASET_NOTES = {
    "tiny-imagenet": ("Tiny-ImageNet images come from ImageNet: the offline default's image tower was trained on "
                      "ImageNet-1k (and its text bridge fitted on ImageNet class names), so these numbers flatter "
                      "that backbone; use them for scale (202 classes) and ranking, not absolute claims."),
}


def dataset_notes(dataset: str) -> list[str]:
    key = dataset.lower()
    return [note for k, note in DATASET_NOTES.items() if k in key]


@dataclass
class Stat:
    mean: float
    std: float  # sample std over seeds; nan when n < 2
    n: int
    seeds: list[int]

    @classmethod
    def of(cls, values: dict[int, float]) -> "Stat":
        seeds = sorted(values)
        xs = [float(values[s]) for s in seeds]
        n = len(xs)
        mean = sum(xs) / n if n else math.nan
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n >= 2 else math.nan
        return cls(mean=mean, std=std, n=n, seeds=seeds)


@dataclass
class Summary:
    """All cells of one backbone."""

    backbone: str
    backbone_name: str
    fingerprints: list[str]
    stand_in: bool
    datasets: list[str]
    shots: list[int]
    methods: list[str]
    seeds: list[int]
    cells: dict[tuple[str, int, str], Stat] = field(default_factory=dict)  # (dataset, shots, method)
    average: dict[tuple[int, str], Stat] = field(default_factory=dict)  # (shots, method)
    fit_time: dict[tuple[str, int, str], float] = field(default_factory=dict)  # mean fit_time_s over seeds
    test_info: dict[str, str] = field(default_factory=dict)  # dataset -> "n_test=…" (+ subset rule)

    @property
    def complete(self) -> bool:
        want = len(self.seeds)
        return all(s.n == want for s in self.cells.values()) and len(self.cells) == (
            len(self.datasets) * len(self.shots) * len(self.methods))


def _ordered(values: Iterable[Any], order: Sequence[Any] | None) -> list[Any]:
    seen = list(dict.fromkeys(values))
    if order is None:
        return seen
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def summarize(rows: Iterable[dict[str, Any]], *, methods: Sequence[str] | None = None,
              datasets: Sequence[str] | None = None) -> list[Summary]:
    """Group rows by backbone and compute mean ± std per (dataset, shots, method) and the average block."""
    by_backbone: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_backbone.setdefault(str(row["backbone"]), []).append(row)
    out = []
    for backbone, group in by_backbone.items():
        ds = _ordered((r["dataset"] for r in group), datasets)
        ms = _ordered((r["method"] for r in group), methods)
        ks = sorted({int(r["shots"]) for r in group})
        seeds = sorted({int(r["seed"]) for r in group})
        values: dict[tuple[str, int, str], dict[int, float]] = {}
        times: dict[tuple[str, int, str], list[float]] = {}
        test_info: dict[str, set[str]] = {}
        for r in group:
            values.setdefault((r["dataset"], int(r["shots"]), r["method"]), {})[int(r["seed"])] = float(r["top1"])
            if r.get("fit_time_s") is not None:
                times.setdefault((r["dataset"], int(r["shots"]), r["method"]), []).append(float(r["fit_time_s"]))
            if r.get("n_test") is not None:
                sub = f", a fixed seeded subset of {r['test_per_class']} per class" if r.get("test_per_class") else ""
                test_info.setdefault(r["dataset"], set()).add(f"{r['n_test']} test images{sub}")
        summary = Summary(
            backbone=backbone, backbone_name=str(group[0].get("backbone_name", backbone)),
            fingerprints=sorted({str(r.get("backbone_fingerprint", "?")) for r in group}),
            stand_in=any(bool(r.get("stand_in")) for r in group),
            datasets=ds, shots=ks, methods=ms, seeds=seeds,
            cells={key: Stat.of(v) for key, v in values.items()},
            fit_time={key: sum(v) / len(v) for key, v in times.items()},
            test_info={d: "; ".join(sorted(v)) for d, v in test_info.items()},
        )
        for k in ks:
            for m in ms:
                per_seed = {}
                for s in seeds:
                    accs = [values.get((d, k, m), {}).get(s) for d in ds]
                    if all(a is not None for a in accs):
                        per_seed[s] = sum(accs) / len(accs)
                if per_seed:
                    summary.average[(k, m)] = Stat.of(per_seed)
        out.append(summary)
    return out
