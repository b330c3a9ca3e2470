"""Aggregate result rows into mean ± std over seeds and render them as Markdown.

Per (backbone, dataset, shots, method): mean and *sample* standard deviation (ddof=1) of top-1 over
the seeds present. The average-over-datasets block first averages the datasets within each seed
(only seeds for which every dataset has a row), then takes mean ± std over those seeds, so its
spread is a spread over seeds, like every other cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

MIN_SEEDS = 3  # the protocol: averages over at least 3 seeds

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


def _fmt(stat: Stat | None, n_seeds: int, best: bool) -> str:
    if stat is None:
        return "–"
    text = f"{stat.mean:.2f}" if stat.n < 2 else f"{stat.mean:.2f} ± {stat.std:.2f}"
    if best:
        text = f"**{text}**"
    if stat.n != n_seeds:
        text += f" (n={stat.n})"
    return text


def _block(title: str, get, shots: list[int], methods: list[str], n_seeds: int) -> list[str]:
    lines = [f"### {title}", "", "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|" + "---:|" * len(shots)]
    best = {}
    for k in shots:
        means = [get(k, m).mean for m in methods if get(k, m) is not None]
        best[k] = max(means) if means else None
    for m in methods:
        cells = []
        for k in shots:
            st = get(k, m)
            cells.append(_fmt(st, n_seeds, best=st is not None and len(methods) > 1 and st.mean == best[k]))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown_table(rows: Iterable[dict[str, Any]], *, methods: Sequence[str] | None = None,
                   datasets: Sequence[str] | None = None, title: str = "Few-shot top-1 accuracy (%)") -> str:
    """Markdown: per backbone, one block per dataset (rows = methods, columns = shots) + the average block."""
    rows = list(rows)
    if not rows:
        return f"## {title}\n\n(no results yet)\n"
    parts = []
    for s in summarize(rows, methods=methods, datasets=datasets):
        n = len(s.seeds)
        stand_in = " — offline stand-in, not CLIP" if s.stand_in else ""
        head = [f"## {title}: backbone `{s.backbone}`{stand_in}", "",
                f"Mean ± sample std (ddof=1) of top-1 on the test split over **{n} seed{'s' if n != 1 else ''}** "
                f"({', '.join(map(str, s.seeds))}); hyper-parameters chosen on validation only. "
                f"Backbone fingerprint: {', '.join(f'`{f}`' for f in s.fingerprints)}. Best mean per column in bold.",
                ""]
        if n < MIN_SEEDS:
            head += [f"**Warning: only {n} seed{'s' if n != 1 else ''}; the protocol asks for at least "
                     f"{MIN_SEEDS} before an average is reported.**", ""]
        if not s.complete:
            head += ["Some cells have fewer seeds than the others: they are marked (n=…); "
                     "a '–' marks a missing cell (sweep not finished?).", ""]
        parts += head
        for d in s.datasets:
            parts += _block(f"{d}", lambda k, m, d=d: s.cells.get((d, k, m)), s.shots, s.methods, n)
            notes = ([f"Scored on {s.test_info[d]}."] if d in s.test_info else []) + dataset_notes(d)
            parts += [f"> {note}" for note in notes] + ([""] if notes else [])
        avg_title = (f"Average over {len(s.datasets)} dataset{'s' if len(s.datasets) != 1 else ''} "
                     f"({', '.join(s.datasets)}); per seed, then mean ± std over seeds")
        parts += _block(avg_title, lambda k, m: s.average.get((k, m)), s.shots, s.methods, n)
        avg_notes = sorted({note for d in s.datasets for note in dataset_notes(d)})
        parts += [f"> The average includes a dataset with this caveat: {note}" for note in avg_notes] + ([""] if avg_notes else [])
        parts += fit_time_block(s)
    return "\n".join(parts)


def fit_time_block(s: Summary) -> list[str]:
    """Mean fit time (s) per method at the largest shot count of each dataset (features cached)."""
    if not s.fit_time:
        return []
    cols = []
    for d in s.datasets:
        ks = [k for (dd, k, _) in s.fit_time if dd == d]
        if ks:
            cols.append((d, max(ks)))
    if not cols:
        return []
    lines = ["### Fit time per method (s, mean over seeds; features cached; wall clock on the machine that ran it)", "",
             "| method | " + " | ".join(f"{d} {k}-shot" for d, k in cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in s.methods:
        cells = [f"{s.fit_time[(d, k, m)]:.2f}" if (d, k, m) in s.fit_time else "–" for d, k in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    notes = sorted({note for d, _ in cols for note in dataset_notes(d)})
    return lines + [""] + [f"> {note}" for note in notes] + ([""] if notes else [])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m xmodal.bench.table RESULTS.jsonl [OUT_DIR]``: re-render table.md and the plot from every row
    of a results file (e.g. after several ``xmodal bench`` runs with different options into one folder,
    whose own table shows only its grid). Datasets keep the file's order; methods too unless --methods."""
    import argparse
    import os
    from pathlib import Path

    from .plot import plot_accuracy_vs_shots
    from .store import read_rows

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results")
    p.add_argument("out_dir", nargs="?")
    p.add_argument("--methods", help="comma-separated method order (default: the file's order)")
    args = p.parse_args(argv)
    rows = read_rows(args.results)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    out = Path(args.out_dir or Path(args.results).parent)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(rows, methods=methods)
    tmp = out / f".table.md.{os.getpid()}.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, out / "table.md")
    plot_accuracy_vs_shots(rows, out / "accuracy_vs_shots.png", methods=methods)
    print(text)


if __name__ == "__main__":
    main()
