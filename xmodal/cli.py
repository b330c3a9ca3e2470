"""The ``xmodal`` command.

Foundation commands live here (backbones, datasets, features, zeroshot); the few-shot harness
(``fewshot``, ``bench``) and the X-adapter commands (``xadapter``, ``probe``, ``glue``) register
themselves from their packages. Every command that produces a result accepts ``--json`` and then
prints exactly one JSON document on stdout (progress bars go to stderr).
"""
from __future__ import annotations

import time
from typing import Optional

import typer

from .cli_errors import XmodalGroup
from .cli_util import DEFAULT_BACKBONE, cache_dir_option, emit_json, resolve_device

app = typer.Typer(cls=XmodalGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cross-modal adapters: few-shot CLIP adaptation and visual knowledge for language models.")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Print the traceback of an error (also: XMODAL_DEBUG=1)."),
) -> None:
    """Errors: one line on stderr (one JSON document with --json); exit codes 2 usage, 3 input data,
    4 environment or resources, 1 internal error."""

@app.command()
def backbones(as_json: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """List backbone specs."""
    from .backbones import KNOWN_SPECS

    if as_json:
        emit_json(KNOWN_SPECS)
        return
    for spec, text in KNOWN_SPECS.items():
        typer.echo(f"{spec:34s} {text}")


@app.command()
def datasets(as_json: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """List dataset spec forms and the CoOp registry."""
    from .data import COOP_DATASETS, DATASET_SPECS

    registry = {name: {"folder": i.folder, "image_dir": i.image_dir, "split_file": i.split_file,
                       "templates": i.templates} for name, i in COOP_DATASETS.items()}
    if as_json:
        emit_json({"specs": DATASET_SPECS, "coop": registry})
        return
    for spec, text in DATASET_SPECS.items():
        typer.echo(f"{spec:24s} {text}")
    typer.echo("\nCoOp datasets (coop:NAME@ROOT):")
    for name, info in registry.items():
        typer.echo(f"  {name:15s} $ROOT/{info['folder']}/{info['image_dir']}  {info['split_file'] or ''}")


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """List the few-shot methods (the names --method and --methods take)."""
    import sys as _sys

    from .fewshot import available_methods, create_method

    rows = []
    for name in available_methods():
        m = create_method(name)
        module = _sys.modules[type(m).__module__]
        summary = ((module.__doc__ or "").strip().splitlines() or [""])[0]
        rows.append({"name": name, "training_free": bool(m.training_free),
                     "tower": bool(getattr(m, "needs_backbone", False)), "summary": summary})
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        kind = "training-free" if r["training_free"] else "trained" + (", in the towers" if r["tower"] else "")
        typer.echo(f"{r['name']:14s} {kind:24s} {r['summary']}")


@app.command()
def features(
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="Backbone spec (see `xmodal backbones`)."),
    data: str = typer.Option(..., help="Dataset spec (see `xmodal datasets`)."),
    split: str = typer.Option("test", help="Split to embed."),
    augment_views: int = typer.Option(0, help="Also embed this many random augmented views per image."),
    augment_seed: int = typer.Option(0, help="Seed of the augmented views."),
    cache_dir: str = cache_dir_option(),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1 ... or auto."),
    engine: Optional[str] = typer.Option(None, help="auto (exact ONNX Runtime export on CPU where faster, else "
                                          "PyTorch), torch or onnx. Default: $XMODAL_ENGINE, else auto."),
    dtype: str = typer.Option("fp32", help="fp32 (exact), bf16 (GPU autocast; CPU autocast + compile), fp16 (GPU) "
                                           "or int8 (CPU, ONNX Runtime); reduced modes have their own cache "
                                           "entries and print their fidelity to fp32."),
    workers: Optional[int] = typer.Option(None, help="Data-loader worker processes (default: sized to the cores "
                                                     "inference leaves)."),
    skip_corrupt: bool = typer.Option(False, help="Skip unreadable images with a warning instead of failing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Embed a dataset split with a backbone, into the on-disk cache (a second run reads the cache)."""
    from .backbones import load_backbone
    from .data import load_dataset
    from .features import extract_features

    t0 = time.perf_counter()
    bb = load_backbone(backbone, device=resolve_device(device), cache_dir=cache_dir, engine=engine)
    ds = load_dataset(data)
    t1 = time.perf_counter()
    fs = extract_features(bb, ds, split, augment_views=augment_views, augment_seed=augment_seed,
                          cache_dir=cache_dir, batch_size=batch_size, dtype=dtype, num_workers=workers,
                          skip_corrupt=skip_corrupt, progress=not as_json)
    t2 = time.perf_counter()
    out = {"backbone": bb.name, "fingerprint": bb.fingerprint(), "dataset": ds.name, "split": split,
           "n": len(fs), "dim": fs.dim, "augment_views": augment_views, "load_seconds": round(t1 - t0, 3),
           "extract_seconds": round(t2 - t1, 3), "cache_dir": cache_dir,
           "engine": fs.meta.get("engine"), "dtype": fs.meta.get("dtype"), "fidelity": fs.meta.get("fidelity")}
    from .shards import is_main_process

    if not is_main_process():  # under accelerate/torchrun, rank 0 reports for all
        return
    if as_json:
        emit_json(out)
    else:
        fid = out["fidelity"]
        typer.echo(f"{out['n']} x {out['dim']} features of {ds.name}/{split} with {bb.name} "
                   f"in {out['extract_seconds']:.2f} s (engine: {out['engine']}; cache: {cache_dir})"
                   + (f"; cosine to fp32 mean {fid['cos_mean']:.5f} / min {fid['cos_min']:.5f}" if fid else ""))


@app.command()
def zeroshot(
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="Backbone spec (see `xmodal backbones`)."),
    data: str = typer.Option(..., help="Dataset spec (see `xmodal datasets`)."),
    split: str = typer.Option("test", help="Split to evaluate."),
    templates: Optional[str] = typer.Option(None, help="Prompt templates separated by '|' (default: the dataset's)."),
    cache_dir: str = cache_dir_option(),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    device: str = typer.Option("auto", help="cpu, cuda ... or auto."),
    engine: Optional[str] = typer.Option(None, help="auto (exact ONNX Runtime export on CPU where faster, else "
                                          "PyTorch), torch or onnx. Default: $XMODAL_ENGINE, else auto."),
    dtype: str = typer.Option("fp32", help="fp32 (exact), bf16 (GPU autocast; CPU autocast + compile), fp16 (GPU) "
                                           "or int8 (CPU, ONNX Runtime)."),
    workers: Optional[int] = typer.Option(None, help="Data-loader worker processes (default: sized to the cores "
                                                     "inference leaves)."),
    skip_corrupt: bool = typer.Option(False, help="Skip unreadable images with a warning instead of failing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Zero-shot top-1 accuracy with the prompt-ensemble text classifier."""
    from .backbones import load_backbone
    from .data import load_dataset
    from .zeroshot import evaluate_zeroshot

    bb = load_backbone(backbone, device=resolve_device(device), cache_dir=cache_dir, engine=engine)
    ds = load_dataset(data)
    out = evaluate_zeroshot(bb, ds, split, templates.split("|") if templates else None, cache_dir=cache_dir,
                            batch_size=batch_size, dtype=dtype, num_workers=workers, skip_corrupt=skip_corrupt,
                            progress=not as_json)
    if as_json:
        emit_json(out)
        return
    from rich.console import Console

    from .zeroshot import zeroshot_table

    Console().print(zeroshot_table(out))
    typer.echo(f"{out['n']} images, {len(out['templates'])} prompt template(s); chance = {100 / len(ds.classnames):.1f}%")


def _register_subcommands() -> None:
    from .bench.cli import register as register_bench
    from .classifier_cli import register as register_classifier
    from .xadapter.cli import register as register_xadapter
    from .serve.cli import register as register_serve

    register_bench(app)
    register_classifier(app)
    register_xadapter(app)
    register_serve(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
