"""``xmodal fewshot`` and ``xmodal bench``: registered on the main Typer app by ``register(app)``.

Human-readable output goes to stdout as rich tables; progress bars and notes go to stderr, so
``--json`` prints exactly one JSON document on stdout.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import typer

from ..cli_util import DEFAULT_BACKBONE, cache_dir_option, emit_json, resolve_device

def _methods_or_exit(methods: str) -> list[str]:
    from .run import UnknownMethodError, resolve_methods

    try:
        return resolve_methods(methods)
    except UnknownMethodError as exc:
        raise typer.BadParameter(str(exc), param_hint="--methods") from None


def _ints(value: str, name: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=name) from None
    if not out:
        raise typer.BadParameter("needs at least one value", param_hint=name)
    return out


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _emit_json(payload: Any) -> None:
    emit_json(payload, sort_keys=True)


# extraction options shared by `fewshot` and `bench` (one definition, so the two commands cannot drift)
BATCH_SIZE = typer.Option(64, "--batch-size", min=1, help="images per forward pass")
NUM_WORKERS = typer.Option(None, "--num-workers", min=0, help="loader workers (default: sized to the cores "
                                                               "inference leaves)")
ENGINE = typer.Option(None, "--engine", help="auto, torch or onnx (default: $XMODAL_ENGINE, else auto)")
DTYPE = typer.Option("fp32", "--dtype", help="fp32 (exact), bf16, fp16 (GPU) or int8 (CPU); reduced modes have "
                                             "their own cache entries and result identity")
SKIP_CORRUPT = typer.Option(False, "--skip-corrupt", help="skip unreadable images with a warning")


def fewshot_command(
    data: str = typer.Option(..., "--data", help="dataset spec, e.g. imagefolder:PATH, cifar10:PATH, coop:DTD@ROOT, digits"),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--backbone", help="backbone spec (tiny:clip, bridge:lite0-minilm, openclip:..., hf:...)"),
    shots: int = typer.Option(16, "--shots", min=1, help="K support images per class"),
    seed: int = typer.Option(1, "--seed", help="sampling seed of the episode"),
    methods: str = typer.Option("all", "--methods",
                                help="'all' or comma-separated method names (see `xmodal methods`)"),
    cache_dir: str = cache_dir_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    augment_views: int = typer.Option(10, "--augment-views", min=0, help="augmented views per support image"),
    augment_scope: str = typer.Option("support", "--augment-scope",
                                      help="extract views for the 'support' images only, or the whole train 'split'"),
    batch_size: int = BATCH_SIZE,
    num_workers: Optional[int] = NUM_WORKERS,
    engine: Optional[str] = ENGINE,
    dtype: str = DTYPE,
    skip_corrupt: bool = SKIP_CORRUPT,
    as_json: bool = typer.Option(False, "--json", help="print one JSON document (rows + context) instead of a table"),
) -> None:
    """One few-shot episode: fit each method on K shots (+ validation), report top-1 on test."""
    from .run import AUGMENT_SCOPES, FeatureBank, run_episode

    names = _methods_or_exit(methods)
    if augment_scope not in AUGMENT_SCOPES:
        raise typer.BadParameter(f"one of {', '.join(AUGMENT_SCOPES)}", param_hint="--augment-scope")
    from ..backbones import load_backbone
    from ..data import load_dataset

    dev = resolve_device(device)
    ds = load_dataset(data)  # the cheap check first: a bad spec fails before any weights load
    bb = load_backbone(backbone, device=dev, cache_dir=cache_dir, engine=engine)
    bank = FeatureBank(bb, ds, augment_views=augment_views, augment_scope=augment_scope, cache_dir=cache_dir,
                       device=dev, batch_size=batch_size, num_workers=num_workers, progress=True,
                       skip_corrupt=skip_corrupt, dtype=None if dtype == "fp32" else dtype)
    rows = run_episode(bank, shots, seed, names, backbone_spec=backbone, dataset_spec=data, device=dev, progress=True)
    context_keys = ("backbone", "backbone_name", "backbone_fingerprint", "stand_in", "dataset", "dataset_name",
                    "num_classes", "shots", "seed", "templates", "val_rule", "n_support", "n_val", "n_test",
                    "augment_views", "augment_scope", "device", "xmodal_version", "git_commit", "git_dirty")
    context = {k: rows[0][k] for k in context_keys} if rows else {}
    if as_json:
        _emit_json({"context": context, "rows": rows})
        return
    from rich.console import Console
    from rich.table import Table

    stand_in = " [yellow](offline stand-in, not CLIP)[/yellow]" if context.get("stand_in") else ""
    table = Table(title=f"{data} · {shots}-shot · seed {seed} · {backbone}{stand_in}")
    table.add_column("method")
    table.add_column("top-1 (%)", justify="right")
    table.add_column("hyper-parameters (chosen on val)")
    table.add_column("fit (s)", justify="right")
    from ..fewshot.selection import became, chosen_settings, fixed_settings, format_settings

    for r in rows:  # chosen settings only; curves stay in the JSON rows, fixed settings are listed once below
        chosen = format_settings({k: v for k, v in chosen_settings(r["hparams"]).items() if k != "kept"})
        turned = became(r["method"], r["hparams"])
        table.add_row(r["method"], f"{r['top1']:.2f}", chosen + (f" → {turned}" if turned else ""),
                      f"{r['fit_time_s']:.2f}")
    console = Console()
    console.print(table)
    for r in rows:
        fixed = fixed_settings(r["hparams"])
        if fixed:
            console.print(f"fixed {r['method']}: {format_settings(fixed)}", highlight=False)
    console.print(f"test: {context['n_test']} images · support: {context['n_support']} · val: {context['n_val']} "
                  f"({context['val_rule']}) · fingerprint {context['backbone_fingerprint']} · "
                  f"xmodal {context['xmodal_version']} @ {context['git_commit'][:12]}", highlight=False)


def bench_command(
    data: str = typer.Option(..., "--data", help="comma-separated dataset specs"),
    out: str = typer.Option(..., "--out", help="results folder (results.jsonl, table.md, accuracy_vs_shots.png)"),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--backbone", help="backbone spec"),
    shots: str = typer.Option("1,2,4,8,16", "--shots", help="comma-separated shots per class"),
    seeds: str = typer.Option("1,2,3", "--seeds", help="comma-separated seeds (>= 3 for a reported average)"),
    methods: str = typer.Option("all", "--methods",
                                help="'all' or comma-separated method names (see `xmodal methods`)"),
    cache_dir: str = cache_dir_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    augment_views: int = typer.Option(10, "--augment-views", min=0, help="augmented views per training image"),
    augment_scope: str = typer.Option("split", "--augment-scope",
                                      help="views for the whole train 'split', the 'union' of all support sets, or per-episode 'support'"),
    batch_size: int = BATCH_SIZE,
    num_workers: Optional[int] = NUM_WORKERS,
    engine: Optional[str] = ENGINE,
    dtype: str = DTYPE,
    skip_corrupt: bool = SKIP_CORRUPT,
    test_per_class: int = typer.Option(0, "--test-per-class", min=0,
                                       help="score a fixed seeded subset of N test images per class (0: the whole test split)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON summary document instead of the table"),
) -> None:
    """Resumable sweep over datasets × shots × seeds × methods; writes OUT/results.jsonl, table.md and a plot."""
    from .run import AUGMENT_SCOPES
    from .sweep import run_sweep
    from .table import summarize

    names = _methods_or_exit(methods)
    if augment_scope not in AUGMENT_SCOPES:
        raise typer.BadParameter(f"one of {', '.join(AUGMENT_SCOPES)}", param_hint="--augment-scope")
    shots_l, seeds_l = _ints(shots, "--shots"), _ints(seeds, "--seeds")
    datasets = [d.strip() for d in data.split(",") if d.strip()]
    err = _stderr_console()
    if len(seeds_l) < 3:
        err.print(f"[yellow]note:[/yellow] {len(seeds_l)} seed(s); averages need at least 3 to be reported")
    dev = resolve_device(device)
    result = run_sweep(backbone, datasets, shots_l, seeds_l, names, out, cache_dir=cache_dir, device=dev,
                       augment_views=augment_views, augment_scope=augment_scope, batch_size=batch_size,
                       num_workers=num_workers, progress=True, skip_corrupt=skip_corrupt,
                       dtype=None if dtype == "fp32" else dtype, engine=engine,
                       test_per_class=test_per_class or None)
    if result.repaired:
        err.print(f"[yellow]note:[/yellow] {result.results_path}: {result.repaired}")
    if as_json:
        summaries = []
        for s in summarize(result.rows, methods=names, datasets=datasets):
            summaries.append({
                "backbone": s.backbone, "fingerprints": s.fingerprints, "stand_in": s.stand_in, "seeds": s.seeds,
                "cells": [{"dataset": d, "shots": k, "method": m, "mean": st.mean, "std": st.std, "n": st.n}
                          for (d, k, m), st in s.cells.items()],
                "average": [{"shots": k, "method": m, "mean": st.mean, "std": st.std, "n": st.n}
                            for (k, m), st in s.average.items()],
            })
        _emit_json({"out": str(result.out_dir), "results": str(result.results_path),
                    "table": str(result.table_path), "plot": str(result.plot_path),
                    "new_rows": result.new_rows, "skipped_rows": result.skipped_rows,
                    "rows_total": len(result.rows), "summary": summaries, "std": "sample std over seeds (ddof=1)"})
        return
    sys.stdout.write(result.table + "\n")
    err.print(f"{result.new_rows} new row(s), {result.skipped_rows} already present · results: {result.results_path}"
              f" · table: {result.table_path} · plot: {result.plot_path}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``fewshot`` and ``bench`` commands to the main ``xmodal`` app."""
    app.command("fewshot")(fewshot_command)
    app.command("bench")(bench_command)

