"""Resumable sweeps: backbone × datasets × shots × seeds × methods into ``OUT/results.jsonl``.

* Rows already in the results file are skipped (a killed sweep continues where it stopped; an
  episode whose methods are all done touches no feature at all).
* Features come from the on-disk cache of ``xmodal.features``; within a run each (backbone, dataset)
  is extracted once and every (shots, seed) reuses it.
* After the sweep: ``OUT/table.md`` (mean ± std over seeds) and ``OUT/accuracy_vs_shots.png``.
"""
from __future__ import annotations

import json
import os
import sys

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .plot import plot_accuracy_vs_shots
from .provenance import git_commit, utc_timestamp, xmodal_version
from .run import FeatureBank, _dataset_spec, _default_extract, _default_split, resolve_methods, run_episode
from .store import ResultStore
from .table import markdown_table

RESULTS_FILE = "results.jsonl"
TABLE_FILE = "table.md"
PLOT_FILE = "accuracy_vs_shots.png"
CONFIG_FILE = "sweep.json"


class StaleResultsError(RuntimeError):
    """The results folder holds rows made with a different backbone weights / feature setup."""


@dataclass
class SweepResult:
    out_dir: Path
    results_path: Path
    table_path: Path | None
    plot_path: Path | None
    rows: list[dict[str, Any]]  # every row of the requested grid (old and new)
    new_rows: int
    skipped_rows: int
    table: str
    repaired: str | None = None
    missing: list[tuple] = field(default_factory=list)


def _parse_list(value: str | Sequence[Any], cast: Callable[[str], Any] = str) -> list[Any]:
    if isinstance(value, str):
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    return [cast(v) if isinstance(v, str) else v for v in value]


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _check_compatible(store: ResultStore, backbone_spec: str, fingerprint: str, dataset_specs: list[str],
                      augment_views: int) -> None:
    """Refuse to mix rows from different weights or view counts under one key (they would be skipped)."""
    for row in store.rows:
        if row.get("backbone") != backbone_spec or row.get("dataset") not in dataset_specs:
            continue
        if row.get("backbone_fingerprint") not in (None, fingerprint):
            raise StaleResultsError(
                f"{store.path} already holds rows for {backbone_spec!r} made with different weights "
                f"(fingerprint {row.get('backbone_fingerprint')!r}, now {fingerprint!r}); "
                "use a new --out folder (resuming would silently keep the old rows)")
        if row.get("augment_views") not in (None, augment_views):
            raise StaleResultsError(
                f"{store.path} holds rows made with augment_views={row.get('augment_views')}, this sweep uses "
                f"{augment_views}; use a new --out folder or the same --augment-views")


def run_sweep(backbone: Any, datasets: Sequence[Any] | str, shots: Sequence[int] | str, seeds: Sequence[int] | str,
              methods: str | Sequence[str], out_dir: str | os.PathLike[str], *,
              cache_dir: str = ".xmodal-cache", device: str | None = None, augment_views: int = 10,
              augment_scope: str = "split", augment_seed: int = 0, batch_size: int = 64, num_workers: int = 0,
              progress: bool = True, write_report: bool = True,
              extract_fn: Callable[..., Any] = _default_extract,
              split_fn: Callable[[Any, int, int], Any] = _default_split,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> SweepResult:
    """Run (or resume) a sweep. ``backbone``/``datasets`` are specs or already-built objects."""
    names = resolve_methods(methods)  # fail before any expensive work
    shots_l = [int(k) for k in _parse_list(shots, int)]
    seeds_l = [int(s) for s in _parse_list(seeds, int)]
    data_l = _parse_list(datasets) if isinstance(datasets, str) else list(datasets)
    if not (shots_l and seeds_l and data_l):
        raise ValueError("a sweep needs at least one dataset, one shots value and one seed")
    backbone_spec = backbone if isinstance(backbone, str) else str(backbone.spec)
    data_specs = [d if isinstance(d, str) else _dataset_spec(d) for d in data_l]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out / RESULTS_FILE)
    grid = [(d, k, s) for d in data_specs for k in shots_l for s in seeds_l]

    def pending(d: str, k: int, s: int) -> list[str]:
        return [m for m in names if not store.has((m, backbone_spec, d, k, s))]

    n_skipped = sum(len(names) - len(pending(*e)) for e in grid)
    n_new = 0
    todo = [e for e in grid if pending(*e)]
    if todo:
        if isinstance(backbone, str):
            from ..backbones import load_backbone

            backbone = load_backbone(backbone, device=device or "cpu")
        _check_compatible(store, backbone_spec, str(backbone.fingerprint()), data_specs, augment_views)
        _write_json_atomic(out / CONFIG_FILE, {
            "backbone": backbone_spec, "backbone_fingerprint": str(backbone.fingerprint()),
            "datasets": data_specs, "shots": shots_l, "seeds": seeds_l, "methods": names,
            "augment_views": augment_views, "augment_scope": augment_scope, "augment_seed": augment_seed,
            "cache_dir": str(cache_dir), "device": device, "xmodal_version": xmodal_version(),
            "git_commit": git_commit(), "updated": utc_timestamp(),
        })
        bar = _progress(total=len(grid), initial=len(grid) - len(todo), enabled=progress)
        try:
            for d_obj, d_spec in zip(data_l, data_specs):
                episodes = [(k, s) for (d, k, s) in todo if d == d_spec]
                if not episodes:
                    continue
                dataset = d_obj
                if isinstance(dataset, str):
                    from ..data import load_dataset

                    dataset = load_dataset(dataset)
                bank = FeatureBank(backbone, dataset, augment_views=augment_views, augment_scope=augment_scope,
                                   augment_seed=augment_seed, cache_dir=str(cache_dir), device=device,
                                   batch_size=batch_size, num_workers=num_workers, progress=progress,
                                   extract_fn=extract_fn)
                if augment_scope == "union" and augment_views > 0:
                    # the union over the whole grid (not only what is left), so the cache key is stable
                    bank.use_view_samples(x for k in shots_l for s in seeds_l
                                          for x in split_fn(dataset, k, s).support)
                for k, s in episodes:
                    bar.set_description(f"{d_spec} {k}-shot seed {s}")

                    def record(row: dict[str, Any]) -> None:
                        nonlocal n_new
                        if store.append(row):
                            n_new += 1
                        if on_row is not None:
                            on_row(row)

                    run_episode(bank, k, s, names, backbone_spec=backbone_spec, dataset_spec=d_spec,
                                skip=lambda m, k=k, s=s, d=d_spec: store.has((m, backbone_spec, d, k, s)),
                                on_row=record, device=device, split_fn=split_fn)
                    bar.update(1)
                del bank
        finally:
            bar.close()

    rows = [store.get((m, backbone_spec, d, k, s)) for (d, k, s) in grid for m in names]
    missing = [(m, backbone_spec, d, k, s) for (d, k, s) in grid for m in names
               if not store.has((m, backbone_spec, d, k, s))]
    rows = [r for r in rows if r is not None]
    table = markdown_table(rows, methods=names, datasets=data_specs)
    table_path = plot_path = None
    if write_report:
        table_path = out / TABLE_FILE
        tmp = table_path.with_name(f".{TABLE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(table + "\n")
        os.replace(tmp, table_path)
        if rows:
            plot_path = plot_accuracy_vs_shots(rows, out / PLOT_FILE, methods=names, datasets=data_specs)
    return SweepResult(out_dir=out, results_path=store.path, table_path=table_path, plot_path=plot_path,
                       rows=rows, new_rows=n_new, skipped_rows=n_skipped, table=table,
                       repaired=store.repaired, missing=missing)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="episode", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, leave=True)


__all__ = ["run_sweep", "SweepResult", "StaleResultsError", "RESULTS_FILE", "TABLE_FILE", "PLOT_FILE"]
