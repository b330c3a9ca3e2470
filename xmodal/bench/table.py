"""Render the result summary (``summary.py``) as Markdown.

Per (backbone, dataset, shots, method): mean ± sample std of top-1 over the seeds present, and the
average-over-datasets block (a spread over seeds, like every other cell).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from .summary import DATASET_NOTES, Stat, Summary, dataset_notes, summarize

MIN_SEEDS = 3  # the protocol: averages over at least 3 seeds

__all__ = ["DATASET_NOTES", "MIN_SEEDS", "Stat", "Summary", "dataset_notes", "fit_time_block", "main", "markdown_table",
           "summarize"]


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
