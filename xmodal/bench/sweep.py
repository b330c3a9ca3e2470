"""Resumable sweeps: backbone × datasets × shots × seeds × methods into ``OUT/results.jsonl``.

* Rows already in the results file are skipped (a killed sweep continues where it stopped; an
  episode whose methods are all done touches no feature at all) -- but only rows with this run's
  ``identity``: the same backbone weights, dataset content and extraction options. Rows computed
  from anything else are kept in the file, never reused, and named in a warning.
* Features come from the on-disk cache of ``xmodal.features``; within a run each (backbone, dataset)
  is extracted once and every (shots, seed) reuses it.
* After the sweep: ``OUT/table.md`` (mean ± std over seeds) and ``OUT/accuracy_vs_shots.png``.
"""
from __future__ import annotations

import os
import warnings

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import InputError, UsageError
from ..fewshot.base import create_method
from ..jsonio import dumps
from ..progress import Progress
from .plot import plot_accuracy_vs_shots
from .provenance import (describe_identity_change, git_commit, method_config, result_identity, utc_timestamp,
                         xmodal_version)
from .run import (AUGMENT_SCOPES, FeatureBank, _dataset_spec, _default_extract, _default_split, resolve_methods,
                  run_episode)
from .store import ResultStore
from .table import markdown_table

RESULTS_FILE = "results.jsonl"
TABLE_FILE = "table.md"
PLOT_FILE = "accuracy_vs_shots.png"
CONFIG_FILE = "sweep.json"


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
    stale: list[str] = field(default_factory=list)  # rows of the grid computed from something else: not reused


def _parse_list(value: str | Sequence[Any], what: str, cast: Callable[[str], Any] = str) -> list[Any]:
    try:
        if isinstance(value, str):
            return [cast(v.strip()) for v in value.split(",") if v.strip()]
        return [cast(v) if isinstance(v, str) else v for v in value]
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated values of type {cast.__name__}, got {value!r}",
                         hint=f"e.g. --{what} 1,2,3") from None


def _check_grid(shots: list[int], seeds: list[int], data_specs: list[str], augment_views: int,
                augment_scope: str) -> None:
    """Everything about the request that can be wrong, before any weights load or feature is computed."""
    if not (shots and seeds and data_specs):
        raise UsageError("a sweep needs at least one dataset, one shots value and one seed",
                         hint="pass --data, --shots and --seeds")
    for what, values in (("shots", shots), ("seeds", seeds), ("data", data_specs)):
        dup = sorted({v for v in values if values.count(v) > 1}, key=str)
        if dup:
            raise UsageError(f"--{what} lists {', '.join(map(str, dup))} more than once; each value is one "
                             "episode (a repeated one would be counted twice in the means)",
                             hint=f"list each value once in --{what}")
    bad = [k for k in shots if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise UsageError(f"--shots must be integers >= 1, got {bad}", hint="e.g. --shots 1,2,4,8,16")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise UsageError(f"--seeds must be integers, got {seeds}", hint="e.g. --seeds 1,2,3")
    if augment_views < 0:
        raise UsageError(f"augment_views must be >= 0, got {augment_views}", hint="use --augment-views 0 or more")
    if augment_scope not in AUGMENT_SCOPES:
        raise UsageError(f"augment_scope must be one of {AUGMENT_SCOPES}, got {augment_scope!r}",
                         hint="use --augment-scope " + "|".join(AUGMENT_SCOPES))


def _stale_notes(store: ResultStore, backbone_spec: str, identities: dict[str, dict[str, Any]]) -> list[str]:
    """Rows in the folder for the same (backbone, dataset) whose identity is not this run's: say what differs."""
    notes = []
    for d_spec, ident in identities.items():
        old = [r for r in store.rows if r.get("backbone") == backbone_spec and r.get("dataset") == d_spec
               and (r.get("identity") or "") != ident["identity"]]
        by_identity: dict[str, list[dict[str, Any]]] = {}
        for r in old:
            by_identity.setdefault(str(r.get("identity") or ""), []).append(r)
        for rows in by_identity.values():
            changes = describe_identity_change(rows[0].get("identity_detail"), ident["identity_detail"])
            notes.append(f"{len(rows)} row(s) for {backbone_spec} on {d_spec} in {store.path} were computed from "
                         f"something else ({'; '.join(changes)}): they stay in the file but are not reused; "
                         "these cells are computed afresh (use a new --out folder to keep runs apart)")
    return notes


def _stale_method_notes(store: ResultStore, backbone_spec: str, identities: dict[str, dict[str, Any]],
                        configs: dict[str, str]) -> list[str]:
    """Rows of the same data and features whose method settings differ from this run's (e.g. a default
    changed in an upgrade): they are not reused."""
    counts: dict[str, int] = {}
    for r in store.rows:
        d, m = r.get("dataset"), r.get("method")
        if (r.get("backbone") == backbone_spec and d in identities and m in configs
                and (r.get("identity") or "") == identities[d]["identity"]
                and (r.get("method_config") or "") != configs[m]):
            counts[m] = counts.get(m, 0) + 1
    return [f"{n} row(s) of {m} for {backbone_spec} in {store.path} were made with other or unrecorded method "
            "settings (another xmodal version or changed defaults): they stay in the file but are not reused; these "
            "cells are computed afresh" for m, n in sorted(counts.items())]


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run_sweep(backbone: Any, datasets: Sequence[Any] | str, shots: Sequence[int] | str, seeds: Sequence[int] | str,
              methods: str | Sequence[str], out_dir: str | os.PathLike[str], *,
              cache_dir: str = ".xmodal-cache", device: str | None = None, augment_views: int = 10,
              augment_scope: str = "split", augment_seed: int = 0, batch_size: int = 64, num_workers: int = 0,
              progress: bool = True, write_report: bool = True, skip_corrupt: bool = False,
              dtype: str | None = None, decode: str = "pil", test_per_class: int | None = None,
              engine: str | None = None,
              extract_fn: Callable[..., Any] = _default_extract,
              split_fn: Callable[[Any, int, int], Any] = _default_split,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> SweepResult:
    """Run (or resume) a sweep. ``backbone``/``datasets`` are specs or already-built objects.

    A row is reused only when it was computed from the same backbone weights, dataset content and
    extraction options (its ``identity``); rows of the same grid made from anything else stay in
    ``results.jsonl`` but are recomputed, with a warning that says what changed (``SweepResult.stale``).
    """
    names = resolve_methods(methods)  # fail before any expensive work
    shots_l = _parse_list(shots, "shots", int)
    seeds_l = _parse_list(seeds, "seeds", int)
    data_l = _parse_list(datasets, "data") if isinstance(datasets, str) else list(datasets)
    data_specs = [d if isinstance(d, str) else _dataset_spec(d) for d in data_l]
    _check_grid(shots_l, seeds_l, data_specs, augment_views, augment_scope)
    backbone_spec = backbone if isinstance(backbone, str) else str(backbone.spec)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder", hint="pass a folder path to --out")
    # datasets first: a bad spec or layout fails before any weights load
    if any(isinstance(d, str) for d in data_l):
        from ..data import load_dataset

        data_l = [load_dataset(d) if isinstance(d, str) else d for d in data_l]
    if split_fn is _default_split:  # shot counts no class can supply: refused before any weights load
        from ..data import check_shots

        for d_obj in data_l:
            check_shots(d_obj, shots_l, needs_val=True)
    if isinstance(backbone, str):
        from ..backbones import load_backbone

        backbone = load_backbone(backbone, device=device or "cpu", cache_dir=str(cache_dir), engine=engine)
    options = {"augment_views": int(augment_views),
               "augment_scope": augment_scope if augment_views > 0 else "none",
               "augment_seed": int(augment_seed) if augment_views > 0 else None,
               "dtype": str(dtype or "fp32"), "decode": str(decode or "pil"),
               "engine": str(getattr(backbone, "engine", "torch")), "skip_corrupt": bool(skip_corrupt)}
    if test_per_class:  # only when set, so the identities of full-test-split rows do not change
        options["test_per_class"] = int(test_per_class)
    identities = {d_spec: result_identity(backbone, d_obj, **options) for d_obj, d_spec in zip(data_l, data_specs)}

    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out / RESULTS_FILE)
    grid = [(d, k, s) for d in data_specs for k in shots_l for s in seeds_l]

    scale = float(getattr(backbone, "logit_scale", 100.0))  # as run_episode creates each method
    configs = {m: method_config(create_method(m, logit_scale=scale)) for m in names}

    def key(m: str, d: str, k: int, s: int) -> tuple:
        return (m, backbone_spec, d, k, s, identities[d]["identity"], configs[m])

    def pending(d: str, k: int, s: int) -> list[str]:
        return [m for m in names if not store.has(key(m, d, k, s))]

    stale = _stale_notes(store, backbone_spec, identities) + _stale_method_notes(store, backbone_spec, identities,
                                                                                  configs)
    for note in stale:
        warnings.warn(note, stacklevel=2)
    n_skipped = sum(len(names) - len(pending(*e)) for e in grid)
    n_new = 0
    todo = [e for e in grid if pending(*e)]
    if todo:
        _write_json_atomic(out / CONFIG_FILE, {
            "backbone": backbone_spec, "backbone_fingerprint": str(backbone.fingerprint()),
            "datasets": data_specs, "shots": shots_l, "seeds": seeds_l, "methods": names,
            "augment_views": augment_views, "augment_scope": augment_scope, "augment_seed": augment_seed,
            "options": options, "identities": {d: i["identity"] for d, i in identities.items()},
            "cache_dir": str(cache_dir), "device": device, "xmodal_version": xmodal_version(),
            "git_commit": git_commit(), "updated": utc_timestamp(),
        })
        bar = Progress(len(grid), "bench", unit="episode", initial=len(grid) - len(todo), enabled=progress)
        try:
            for dataset, d_spec in zip(data_l, data_specs):
                episodes = [(k, s) for (d, k, s) in todo if d == d_spec]
                if not episodes:
                    continue
                ident = identities[d_spec]
                bank = FeatureBank(backbone, dataset, augment_views=augment_views, augment_scope=augment_scope,
                                   augment_seed=augment_seed, cache_dir=str(cache_dir), device=device,
                                   batch_size=batch_size, num_workers=num_workers, progress=progress,
                                   skip_corrupt=skip_corrupt, dtype=dtype, decode=decode, extract_fn=extract_fn,
                                   test_per_class=test_per_class)
                if augment_scope == "union":
                    # the union over the whole grid (not only what is left), so the cache key is stable;
                    # without views it also covers the validation images (one plain extraction for all)
                    bank.use_view_samples(x for k in shots_l for s in seeds_l for sp in [split_fn(dataset, k, s)]
                                          for x in (sp.support if augment_views > 0 else sp.support + sp.val))
                for k, s in episodes:

                    def record(row: dict[str, Any], ident: dict[str, Any] = ident) -> None:
                        nonlocal n_new
                        row.update(ident)  # what the row was computed from: part of its key
                        if store.append(row):
                            n_new += 1
                        if on_row is not None:
                            on_row(row)

                    run_episode(bank, k, s, names, backbone_spec=backbone_spec, dataset_spec=d_spec,
                                skip=lambda m, k=k, s=s, d=d_spec: store.has(key(m, d, k, s)),
                                on_row=record, device=device, split_fn=split_fn, progress=progress)
                    bar.update(1, note=f"{d_spec} {k}-shot seed {s}")
                del bank
        finally:
            bar.close()

    rows = [store.get(key(m, d, k, s)) for (d, k, s) in grid for m in names]
    missing = [key(m, d, k, s) for (d, k, s) in grid for m in names if not store.has(key(m, d, k, s))]
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
                       repaired=store.repaired, missing=missing, stale=stale)


__all__ = ["run_sweep", "SweepResult", "RESULTS_FILE", "TABLE_FILE", "PLOT_FILE"]
