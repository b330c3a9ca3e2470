"""CLI for the X-adapter: ``xmodal xadapter train``, ``xmodal probe colors``, ``xmodal glue``, ``xmodal fill-mask``.

``register(app)`` adds them to the main typer app (the ``xadapter`` group also gets ``bank`` from
``xmodal.xadapter.bank_cli`` when that module is present). Every command takes ``--json`` and then
prints exactly one JSON document on stdout (logs and progress go to stderr).
"""
from __future__ import annotations

import os
from typing import List, Optional

import typer


xadapter_app = typer.Typer(help="X-adapter: visual knowledge for text-only PLMs (papers.md part A).",
                           no_args_is_help=True)
probe_app = typer.Typer(help="Zero-shot probes of masked language models.", no_args_is_help=True)
_registered_bank = False


def _logger(json_out: bool):
    return lambda msg: typer.echo(msg, err=json_out)


def _emit(result: dict, json_out: bool, human) -> None:
    if json_out:
        from ..jsonio import dumps

        typer.echo(dumps(result, default=str))
    else:
        human(result)


def _quiet_hf() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _split_files(values: List[str]) -> list[str]:
    return [p for v in values for p in v.split(",") if p.strip()]


# ----------------------------------------------------------------------------------------------
@xadapter_app.command("head")
def head_command(
    corpus: List[str] = typer.Option(..., "--corpus", help="text corpus: jsonl ({\"text\": ...}) or .txt files; repeat or comma-separate"),
    out: str = typer.Option(..., "--out", help="folder for head.safetensors + head.json"),
    plm: str = typer.Option("minilm", "--plm", help="PLM: 'minilm' (packaged MiniLM-L6) or a local HF folder"),
    max_steps: int = typer.Option(3000, "--max-steps", help="upper bound; training stops earlier when the loss flattens"),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    window: int = typer.Option(100, "--window", help="steps per loss window of the stopping rule"),
    min_improvement: float = typer.Option(0.01, "--min-improvement", help="stop when a window's mean loss improves on the previous one by less than this fraction"),
    max_length: int = typer.Option(48, "--max-length"),
    max_texts: Optional[int] = typer.Option(None, "--max-texts"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="continue an unfinished head run in --out"),
    json_out: bool = typer.Option(False, "--json", help="print exactly one JSON document"),
) -> None:
    """Text-only base: train a PLM's missing MLM head alone (body frozen, no experts) until its loss flattens.

    Every adaptation run then starts from it (`xadapter train --head DIR`), and `probe colors --head DIR`
    probes it as the text-only row."""
    from .tasks.head import HeadArgs, train_head

    _quiet_hf()
    args = HeadArgs(plm=plm, corpus=_split_files(corpus), out=out, max_steps=max_steps, batch_size=batch_size,
                    lr=lr, window=window, min_improvement=min_improvement, max_length=max_length,
                    max_texts=max_texts, seed=seed, resume=resume, progress=not json_out)
    result = train_head(args, log=_logger(json_out))
    _emit(result, json_out, lambda r: typer.echo(f"head saved to {r['out']}: {r['steps']} steps, {r['stopped']}"))


@xadapter_app.command("train")
def train_command(
    plm: str = typer.Option("minilm", "--plm", help="PLM: 'minilm' (packaged MiniLM-L6), a local HF folder, or a hub id (offline: must be cached)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="VLM spec (default: the bank's backbone, else bridge:lite0-minilm)"),
    bank: Optional[str] = typer.Option(None, "--bank", help="retrieval bank folder (needed by the V-expert)"),
    corpus: List[str] = typer.Option(..., "--corpus", help="jsonl ({\"text\": ...} per line) or .txt files; repeat or comma-separate"),
    out: str = typer.Option(..., "--out", help="run folder: checkpoint.pt, train_log.jsonl, summary.json, xadapter/"),
    steps: int = typer.Option(1000, "--steps"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-4, "--lr"),
    weight_decay: float = typer.Option(0.01, "--weight-decay"),
    warmup_ratio: float = typer.Option(0.1, "--warmup-ratio"),
    mask_ratio: float = typer.Option(0.15, "--mask-ratio"),
    max_length: int = typer.Option(64, "--max-length"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (multi-GPU: run under `accelerate launch`)"),
    resume: bool = typer.Option(False, "--resume", help="continue from out/checkpoint.pt"),
    experts: str = typer.Option("v,t", "--experts", help="v,t | v | t"),
    layers: str = typer.Option("top2", "--layers", help="top2 | top-N | all | top-half | bottom-half | 4,5"),
    heads: int = typer.Option(4, "--heads"),
    attn_dim: Optional[int] = typer.Option(None, "--attn-dim", help="cross-attention width (default hidden/4)"),
    proj_dim: Optional[int] = typer.Option(None, "--proj-dim", help="CLIP projection width (default attn-dim)"),
    bottleneck: int = typer.Option(128, "--bottleneck"),
    feature_source: str = typer.Option("pooled", "--features", help="pooled | tokens"),
    k: int = typer.Option(4, "--k", help="images retrieved per text"),
    seed: int = typer.Option(0, "--seed"),
    save_every: int = typer.Option(500, "--save-every", help="checkpoint every N steps"),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="stop after N steps in this invocation (checkpoint kept; continue with --resume)"),
    max_texts: Optional[int] = typer.Option(None, "--max-texts", help="use only the first N corpus texts"),
    dropout: float = typer.Option(0.1, "--dropout", help="dropout inside the experts"),
    visual: str = typer.Option("real", "--visual", help="V-expert input: real | shuffled (images of other classes) | zero; the last two are controls"),
    focus_words: Optional[str] = typer.Option(None, "--focus-words", help="comma list of words always masked when present (e.g. the colour terms)"),
    head: Optional[str] = typer.Option(None, "--head", help="text-only base head folder (built by `xmodal xadapter head`); loaded before training and kept frozen unless --train-head"),
    train_head: Optional[bool] = typer.Option(None, "--train-head/--freeze-head", help="train the MLM head with the adapters (default: only when no --head is given)"),
    image_root: Optional[str] = typer.Option(None, "--image-root", help="folder that corpus rows' \"image\" paths are relative to (default: each corpus file's folder)"),
    paired_retrieved: bool = typer.Option(False, "--paired-retrieved", help="rows with their own image also get the k retrieved images"),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="count and skip malformed corpus rows instead of stopping at the first"),
    json_out: bool = typer.Option(False, "--json", help="print exactly one JSON document"),
) -> None:
    """MLM adaptation: train X-adapters on a corpus (PLM and CLIP frozen).

    The V-expert sees each row's own image(s) when rows name them ({"text": ..., "image": "rel/path.jpg"}),
    else the k images retrieved from --bank for the masked text."""
    from .tasks.train import TrainArgs, train_mlm

    _quiet_hf()
    args = TrainArgs(plm=plm, backbone=backbone, bank=bank, corpus=_split_files(corpus), out=out, steps=steps,
                     batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                     mask_ratio=mask_ratio, max_length=max_length, device=device, resume=resume, seed=seed,
                     experts=experts, layers=layers, heads=heads, attn_dim=attn_dim, proj_dim=proj_dim,
                     bottleneck=bottleneck, feature_source=feature_source, k=k, save_every=save_every,
                     stop_after=stop_after, max_texts=max_texts, progress=not json_out, dropout=dropout,
                     visual=visual, focus_words=focus_words, head=head, train_head=train_head,
                     image_root=image_root, paired_retrieved=paired_retrieved, skip_bad_rows=skip_bad_rows)
    summary = train_mlm(args, log=_logger(json_out))

    def human(s):
        state = "finished" if s["finished"] else f"stopped at step {s['steps_done']} (continue with --resume)"
        typer.echo(f"{state}: loss {s['first_loss']:.4f} -> {s['last_loss']:.4f} in {s['seconds']}s; "
                   f"log {s['log']}" + (f"; adapter {s['xadapter']}" if s.get("xadapter") else ""))

    _emit(summary, json_out, human)


# ----------------------------------------------------------------------------------------------
@probe_app.command("colors")
def probe_colors_command(
    data: str = typer.Option(..., "--data", help="Memory Colors (Index,Descriptor,Item,Color) or Color Terms (object,color) CSV"),
    plm: str = typer.Option("minilm", "--plm"),
    xadapter: Optional[str] = typer.Option(None, "--xadapter", help="X-adapter folder (from `xmodal xadapter train`)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="VLM spec (default: the adapter's)"),
    bank: Optional[str] = typer.Option(None, "--bank", help="retrieval bank (needed when the V-expert is on)"),
    templates: str = typer.Option("valm", "--templates", help="valm (VaLM's 9; alias valag) | norlund (13)"),
    experts: Optional[str] = typer.Option(None, "--experts", help="v,t | v | t | none (default: all of the adapter's)"),
    trailing_period: bool = typer.Option(False, "--trailing-period", help="add '.' after the mask (VaLM templates)"),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
    visual: str = typer.Option("real", "--visual", help="V-expert input: real (retrieved images) | shuffled (images of other classes, a control) | zero (a control)"),
    force: bool = typer.Option(False, "--force", help="load an adapter trained on a PLM with other weights (warns)"),
    head: Optional[str] = typer.Option(None, "--head", help="text-only head folder (`xmodal xadapter head`): probe the text-only base of a PLM shipped without an MLM head"),
    json_out: bool = typer.Option(False, "--json", help="print exactly one JSON document"),
) -> None:
    """Zero-shot object-colour probe: accuracy over template x object, argmax within the dataset's colours."""
    _quiet_hf()
    result = run_probe(data, plm, xadapter, backbone, bank, templates, experts, trailing_period, batch_size,
                       device, log=_logger(json_out), visual=visual, force=force, head=head)

    def human(r):
        typer.echo(f"colour probe on {r['data']} ({r['n_objects']} objects x {r['n_templates']} templates), "
                   f"experts: {','.join(r['experts']) or 'none'}")
        for row in r["per_template"]:
            typer.echo(f"  {row['accuracy']:6.2f}  {row['template']}")
        typer.echo(f"accuracy {r['accuracy']:.2f}%  (candidates: {', '.join(r['candidates'])})")

    _emit(result, json_out, human)


def run_probe(data, plm="minilm", xadapter=None, backbone=None, bank=None, templates="valm", experts=None,
              trailing_period=False, batch_size=64, device="auto", log=print, visual="real", force=False,
              head=None) -> dict:
    """The colour probe of ``data`` on a PLM, optionally through an X-adapter (see ``tasks.adapted``)."""
    from .tasks.adapted import load_adapted_mlm
    from .tasks.probe import probe_colors, read_color_csv

    items = read_color_csv(data)
    a = load_adapted_mlm(plm, xadapter, backbone, bank, experts, device, visual=visual, force=force, log=log, head=head)
    result = probe_colors(a.model, a.tokenizer, items, templates=templates, trailing_period=trailing_period,
                          builder=a.builder, batch_size=batch_size, device=a.device)
    result.update({"data": str(data), "plm": plm, "xadapter": xadapter, "head": head, "backbone": a.backbone_spec, "bank": bank,
                   "experts": list(a.active), "visual": visual if "v" in a.active else None})
    if a.warnings:
        result["warnings"] = a.warnings
    return result


# ----------------------------------------------------------------------------------------------
def glue_command(
    task: str = typer.Option(..., "--task", help="CoLA | SST-2 | MRPC | STS-B | RTE | QQP | MNLI | QNLI"),
    data: str = typer.Option(..., "--data", help="GLUE root (with <task>/train.tsv, dev.tsv) or the task folder"),
    plm: str = typer.Option("minilm", "--plm"),
    xadapter: Optional[str] = typer.Option(None, "--xadapter", help="X-adapter folder (omit for the plain-PLM baseline)"),
    experts: str = typer.Option("t", "--experts", help="v,t | v | t | none (default t: no retrieval needed, A.8)"),
    backbone: Optional[str] = typer.Option(None, "--backbone"),
    bank: Optional[str] = typer.Option(None, "--bank", help="retrieval bank (when the V-expert is on)"),
    epochs: float = typer.Option(3.0, "--epochs"),
    lr: float = typer.Option(2e-5, "--lr"),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_length: int = typer.Option(128, "--max-length"),
    seed: int = typer.Option(0, "--seed"),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="seeded subset of N training examples"),
    max_eval: Optional[int] = typer.Option(None, "--max-eval", help="first N dev examples only"),
    freeze_plm: bool = typer.Option(False, "--freeze-plm", help="train adapters + head only (A.8 reading b)"),
    device: str = typer.Option("auto", "--device"),
    strict: bool = typer.Option(False, "--strict", help="a dev row with an invalid label is an error instead of being counted and skipped"),
    force: bool = typer.Option(False, "--force", help="load an adapter trained on a PLM with other weights (warns)"),
    json_out: bool = typer.Option(False, "--json", help="print exactly one JSON document"),
) -> None:
    """Fine-tune a PLM (+ X-adapter) on a GLUE task and report the dev metric."""
    from .tasks.glue import GlueArgs, run_glue

    _quiet_hf()
    args = GlueArgs(task=task, data=data, plm=plm, xadapter=xadapter, experts=experts, backbone=backbone, bank=bank,
                    epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
                    max_train=max_train, max_eval=max_eval, freeze_plm=freeze_plm, device=device,
                    progress=not json_out, strict=strict, force=force)
    result = run_glue(args, log=_logger(json_out))

    def human(r):
        for split, metrics in r["metrics"].items():
            typer.echo(f"{r['task']} {split}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))

    _emit(result, json_out, human)


# ----------------------------------------------------------------------------------------------
def fill_mask_command(
    text: str = typer.Argument(..., help='a text with one [MASK], e.g. "The banana is [MASK]."'),
    plm: str = typer.Option("minilm", "--plm", help="'minilm', a local HF folder with an MLM head, or the PLM of --xadapter"),
    xadapter: Optional[str] = typer.Option(None, "--xadapter", help="X-adapter folder (from `xmodal xadapter train`)"),
    bank: Optional[str] = typer.Option(None, "--bank", help="retrieval bank (when the V-expert is on)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="VLM spec (default: the adapter's)"),
    experts: Optional[str] = typer.Option(None, "--experts", help="v,t | v | t | none (default: all of the adapter's)"),
    compare: bool = typer.Option(False, "--compare", help="show experts on and off side by side (same weights)"),
    image: List[str] = typer.Option([], "--image", help="image file the V-expert sees instead of retrieved ones (repeatable)"),
    head: Optional[str] = typer.Option(None, "--head", help="text-only head folder (for a PLM without an MLM head, no --xadapter)"),
    top_k: int = typer.Option(5, "--top-k", help="how many fillers to show"),
    device: str = typer.Option("auto", "--device"),
    force: bool = typer.Option(False, "--force", help="load an adapter trained on a PLM with other weights (warns)"),
    json_out: bool = typer.Option(False, "--json", help="print exactly one JSON document"),
) -> None:
    """Top-k fillers of the [MASK] in TEXT, with the X-adapter's experts on (and off, with --compare)."""
    from .tasks.fill_mask import FillMask

    _quiet_hf()
    fill = FillMask(plm, xadapter, bank, backbone=backbone, experts=experts, top_k=top_k, device=device, force=force,
                    head=head, images=image)
    fill.load(log=_logger(json_out))
    out = fill(text, compare=compare)
    result = {"text": text, "plm": plm, "xadapter": xadapter, "bank": bank, "experts": list(fill.active_experts),
              "images": list(image),
              **({"compare": out} if compare else {"predictions": out})}

    def human(r):
        if not compare:
            for p in r["predictions"]:
                typer.echo(f"{p['score']:8.4f}  {p['token']}")
            return
        on, off = r["compare"]["experts_on"], r["compare"]["experts_off"]
        label = ",".join(r["experts"]) or "none"
        typer.echo(f"{'experts ' + label:>28}    {'experts off':>28}")
        for a, b in zip(on, off):
            typer.echo(f"{a['token']:>18} {a['score']:8.4f}    {b['token']:>18} {b['score']:8.4f}")

    _emit(result, json_out, human)


# ----------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    """Add ``xadapter`` (train [+ bank]), ``probe`` (colors) and ``glue`` to the main app."""
    global _registered_bank
    if not _registered_bank:
        try:
            from .retrieval.bank_cli import register_bank
        except ImportError:
            register_bank = None
        if register_bank is not None:
            register_bank(xadapter_app)
        _registered_bank = True
    app.add_typer(xadapter_app, name="xadapter")
    app.add_typer(probe_app, name="probe")
    app.command("glue")(glue_command)
    app.command("fill-mask")(fill_mask_command)


__all__ = ["xadapter_app", "probe_app", "register", "run_probe", "glue_command", "fill_mask_command"]
