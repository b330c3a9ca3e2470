"""``xmodal fit`` and ``xmodal predict``: a saved few-shot classifier from the shell.

``fit`` fits one method on a dataset and saves the classifier folder; ``predict`` streams one row per image
(table, JSONL or CSV) as batches finish. Errors are raised, never printed here: the ``xmodal`` group reports
them (one line, or one JSON document with ``--json``). An unreadable image is a row, not the end of the run.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .cli_util import DEFAULT_BACKBONE, cache_dir_option, emit_json
from .errors import EXIT_INPUT, InputError, UsageError
from .jsonio import dumps

FORMATS = ("table", "jsonl", "csv")


def _method_params(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON (numbers, true/false, lists) or kept as strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param expects key=value, got {pair!r}", hint="e.g. --param epochs=10")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def fit_command(
    data: str = typer.Option(..., "--data", help="dataset spec (imagefolder:PATH, cifar10:PATH ...) or an ImageFolder "
                                                 "folder PATH/train/<class>/*.jpg"),
    method: str = typer.Option("xmadapter", "--method", help="few-shot method (see `xmodal methods`)"),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--backbone", help="backbone spec (see `xmodal backbones`)"),
    shots: Optional[int] = typer.Option(None, "--shots", min=1, help="K images per class (default: every train image)"),
    seed: int = typer.Option(0, "--seed", help="which images are support/validation, and the method's seed"),
    out: Path = typer.Option(..., "--out", help="folder to save the classifier to (written atomically)"),
    param: list[str] = typer.Option([], "--param", help="method parameter key=value (repeatable), e.g. epochs=10"),
    augment_views: int = typer.Option(10, "--augment-views", min=0, help="augmented views per support image"),
    cache_dir: str = cache_dir_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="images per forward pass"),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="data-loader worker processes"),
    abstain_target: float = typer.Option(0.95, "--abstain-target", min=0.01, max=1.0,
                                         help="top-1 the suggested --min-score aims at on held-out images "
                                              "(`predict --min-score auto` uses it)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document"),
) -> None:
    """Fit a few-shot classifier (hyper-parameters chosen on validation only) and save it to --out."""
    from .classifier.plan import plan_split, resolve_dataset

    # the dataset is listed, split and checked before torch and the backbone load: its errors come at once
    plan_split(resolve_dataset(data)[0], shots, seed)
    from .classifier import FewShotClassifier

    clf = FewShotClassifier(backbone=backbone, method=method, shots=shots, seed=seed, cache_dir=cache_dir,
                            device=device, augment_views=augment_views, batch_size=batch_size,
                            num_workers=num_workers, progress=not as_json,
                            abstain_target=abstain_target,
                            **_method_params(param))
    clf.fit(data)
    saved = clf.save(out)
    card = clf.card()
    ds = clf.info_["dataset"]
    result = {"out": str(saved), "method": card["method"], "backbone": card["backbone"],
              "backbone_name": card["backbone_name"], "stand_in": card["stand_in"],
              "fingerprint": card["backbone_fingerprint"], "classes": card["classes"],
              "val_accuracy": clf.val_accuracy_, "val_rule": ds["val_rule"], "n_support": ds["n_support"],
              "n_val": ds["n_val"], "shots": shots, "seed": seed, "selection": clf.selection_,
              "method_label": card["method_label"], "became": card["became"], "chosen": card["chosen"],
              "abstain": clf.info_.get("abstain"), "selected": clf.selected_,
              "fit_seconds": clf.info_["fit_seconds"]}
    if as_json:
        emit_json(result)
        return
    from .fewshot.selection import fixed_settings, format_settings

    cv = clf.selection_ != "validation set"
    fixed = fixed_settings(clf.selected_["per_fold"][0] if cv else clf.selected_)
    typer.echo(f"fitted {card['method']} on {data} with {card['backbone_name']}: {len(card['classes'])} classes, "
               + (f"{ds['n_support']} support images, no image left for validation" if cv else
                  f"{ds['n_support']} support / {ds['n_val']} validation images"))
    typer.echo(f"selection: {clf.selection_}" + (" (each fold's model chooses its settings on the fold it did not "
                                                 "train on; the classifier averages the folds' models)" if cv else ""))
    typer.echo(f"{'out-of-fold' if cv else 'validation'} top-1 {100 * clf.val_accuracy_:.2f}% "
               f"(the images the hyper-parameters were chosen on)")
    typer.echo(f"chosen on {'each held-out fold' if cv else 'validation'}: {card['chosen']}")
    typer.echo(f"fixed: {format_settings(fixed)}")
    ab = clf.info_.get("abstain") or {}
    if ab.get("min_score") is not None:
        typer.echo(f"suggested --min-score {ab['min_score']:.4g} ('auto'): {100 * ab['accuracy']:.1f}% top-1 on the "
                   f"{100 * ab['coverage']:.0f}% of held-out images it keeps "
                   f"(target {100 * ab['target_accuracy']:.0f}%)")
    else:
        typer.echo(f"no --min-score reaches {100 * ab.get('target_accuracy', 0.95):.0f}% top-1 on the held-out images")
    typer.echo(f"saved to {saved}")


class _Writer:
    """One output row per image, flushed as it is written (table, JSONL or CSV)."""

    def __init__(self, fmt: str, width: int, k: int, truth: bool = False) -> None:
        self.fmt, self.width, self.k, self.truth = fmt, width, k, truth  # truth: --eval adds true/correct
        self.csv = csv.writer(sys.stdout) if fmt == "csv" else None

    def header(self) -> None:
        if self.fmt == "table":
            typer.echo(f"{'path':{self.width}s}  {'label':20s} {'score':>7s}  top-{self.k}")
        elif self.csv is not None:
            extra = ["true", "correct"] if self.truth else []
            self.csv.writerow(["path", "label", "score", "top_k", "error", *extra])
        sys.stdout.flush()

    def row(self, row: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            sys.stdout.write(dumps(row) + "\n")
        elif self.csv is not None:
            top = ";".join(f"{t['label']}:{t['score']:.6f}" for t in row.get("top_k", []))
            self.csv.writerow([row["path"], row.get("label", ""),
                               "" if "score" not in row else f"{row['score']:.6f}", top, row.get("error", "")]
                              + ([row.get("true", ""), "" if "correct" not in row else str(row["correct"]).lower()]
                                 if self.truth else []))
        elif "error" in row:
            typer.echo(f"{row['path']:{self.width}s}  ERROR {row['error']}")
        else:
            top = "  ".join(f"{t['label']} {t['score']:.3f}" for t in row["top_k"])
            mark = "" if "correct" not in row else ("  ✓" if row["correct"] else f"  ✗ true: {row['true']}")
            typer.echo(f"{row['path']:{self.width}s}  {row['label']:20s} {row['score']:7.4f}  {top}{mark}")
        sys.stdout.flush()


def predict_command(
    model: Path = typer.Argument(..., help="classifier folder written by `xmodal fit --out`"),
    paths: list[str] = typer.Argument(..., help="image files, folders (walked recursively) or quoted globs"),
    top_k: int = typer.Option(5, "--top-k", min=1, help="classes listed per image"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="images per forward pass"),
    fmt: str = typer.Option("table", "--format", help="table, jsonl or csv (one row per image, streamed)"),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help="leave unreadable images and missing paths out "
                                                                    "(exit 0) instead of writing an error row for "
                                                                    "each and exiting 3"),
    evaluate: bool = typer.Option(False, "--eval", help="score against the parent folder names (ImageFolder "
                                                        "split) and write a confusion-matrix PNG"),
    confusion: Path = typer.Option(Path("confusion_matrix.png"), "--confusion", help="where --eval writes the PNG"),
    min_score: Optional[str] = typer.Option(None, "--min-score", help="label an image 'unknown' when its top class "
                                                                      "probability is below this (0-1), or 'auto': "
                                                                      "the threshold `xmodal fit` chose on held-out "
                                                                      "images"),
    eval_unknown: list[str] = typer.Option([], "--eval-unknown", help="images of none of the classes (folder, file "
                                                                      "or glob; repeatable): report the share labelled "
                                                                      "'unknown' under --min-score"),
    cache_dir: str = cache_dir_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    force: bool = typer.Option(False, "--force", help="load even if the classifier's files were edited or the "
                                                      "backbone's fingerprint differs (with a warning)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document with every row (not streamed)"),
) -> None:
    """Classify images with a saved classifier, one row per image as it goes.

    A missing path or an unreadable image is an error row and the run goes on; the exit code is then 3
    (0 with --skip-corrupt, which leaves them out), so a script can tell a complete run from a partial one.
    """
    from .classifier import FewShotClassifier
    from .classifier.evaluation import abstention
    from .classifier.inputs import expand_paths

    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}", hint=f"use one of: {', '.join(FORMATS)}")
    missing: list[tuple[str, str]] = []
    files = expand_paths(paths, missing=missing)
    outside = expand_paths(eval_unknown) if eval_unknown else []
    clf = FewShotClassifier.load(model, device=device, cache_dir=cache_dir, force=force)
    threshold = clf.resolve_min_score(min_score)
    card = clf.card()
    err = typer.get_text_stream("stderr")
    err.write(f"{card['method']} on {card['backbone_name']}, {card['num_classes']} classes; {len(files)} image(s)\n")
    writer = _Writer(fmt, min(max(len(f) for f in [*files, *(m for m, _ in missing)]), 60), top_k, truth=evaluate)
    if not as_json:
        writer.header()
    rows: list[dict[str, Any]] = []
    for path, message in missing:  # reported first, then the images found
        if skip_corrupt:
            err.write(f"warning: skipped {message}\n")
        elif as_json:
            rows.append({"path": path, "error": message})
        else:
            writer.row({"path": path, "error": message})
    truth: list[int] = []
    preds: list[int] = []
    top_scores: list[float] = []
    correct: list[bool] = []
    unknown = n_errors = n_rows = 0
    index = {c: i for i, c in enumerate(clf.classes_)}
    from .progress import Progress

    # progress only where it cannot mix with the rows: not when the rows go to the terminal stderr shares
    bar = Progress(len(files), "predict", unit="img", enabled=as_json or not sys.stdout.isatty())
    for p in clf.iter_predict(files, batch_size=batch_size, skip_corrupt=skip_corrupt):
        n_rows += 1
        bar.update(1)
        if p.error is not None:
            n_errors += 1
            row: dict[str, Any] = {"path": p.source, "error": p.error}
        else:
            top = clf.top_k_of(p.proba, top_k)
            row = {"path": p.source, "label": clf.label_of(p.proba, threshold), "score": top[0][1],
                   "top_k": [{"label": lab, "score": s} for lab, s in top]}
            if evaluate:
                true = index.get(Path(p.source).parent.name)
                if true is None:
                    unknown += 1
                else:
                    truth.append(true)
                    preds.append(int(p.proba.argmax()))
                    top_scores.append(top[0][1])
                    correct.append(preds[-1] == true)
                    row.update(true=clf.classes_[true], correct=row["label"] == clf.classes_[true])
        if as_json:
            rows.append(row)
        else:
            writer.row(row)
    bar.close()
    n_missing = len(missing)
    n_inputs = len(files) + n_missing
    n_failed = 0 if skip_corrupt else n_errors + n_missing
    n_skipped = len(files) - n_rows + (n_missing if skip_corrupt else 0)
    summary: dict[str, Any] = {"model": str(model), "method": card["method"], "backbone": card["backbone"],
                               "stand_in": card["stand_in"], "n_inputs": n_inputs}
    if threshold is not None:
        summary["min_score"] = threshold
    if evaluate:
        title = f"{_model_name(card)} on {_common_folder(files)}"
        summary["eval"] = _evaluate(truth, preds, clf.classes_, unknown, confusion, title)
        summary["eval"]["abstain"] = abstention(top_scores, correct, threshold)
    if outside:
        summary["eval_unknown"] = _eval_unknown(clf, outside, threshold, batch_size)
    failed = (f"{n_failed} of {n_inputs} input(s) could not be classified (error rows: "
              f"{n_missing} missing path(s), {n_errors} unreadable image(s))")
    fix = "fix or remove those inputs, or pass --skip-corrupt to leave them out (exit 0)"
    if as_json:
        doc = {**summary, "n_errors": n_failed, "n_skipped": n_skipped, "rows": rows}
        if n_failed:  # still one document on stdout: the rows, plus why the exit code is not 0
            doc.update(error=failed, type="InputError", hint=fix, exit_code=EXIT_INPUT)
        emit_json(doc)
        if n_failed:
            raise typer.Exit(EXIT_INPUT)
        return
    bad = f"{n_skipped} unreadable or missing skipped" if skip_corrupt else f"{n_failed} failed (error rows)"
    err.write(f"{n_rows - n_errors} of {n_inputs} input(s) classified; {bad}\n")
    if evaluate or outside:
        say = typer.echo if fmt == "table" else (lambda text: err.write(text + "\n"))
        for text in _eval_lines(summary, unknown):
            say(text)
    if n_failed:
        raise InputError(failed, hint=fix)


def _evaluate(truth: list[int], preds: list[int], classes: list[str], unknown: int, png: Path,
              title: str) -> dict[str, Any]:
    from .classifier.confusion import write_confusion_png
    from .classifier.evaluation import confusion_matrix, per_class_report

    if not truth:
        raise UsageError("--eval found no image inside a folder named after one of the classes "
                         f"({', '.join(classes[:5])}{'…' if len(classes) > 5 else ''})",
                         hint="point --eval at an ImageFolder split such as DATA/test (class = parent folder), "
                              "or leave --eval out")
    matrix = confusion_matrix(truth, preds, len(classes))
    write_confusion_png(matrix, classes, png, title=title)
    return {**per_class_report(matrix, classes), "n_unscored": unknown, "confusion": matrix.tolist(),
            "confusion_png": str(png), "title": title}


def _eval_unknown(clf: Any, files: list[str], threshold: float | None, batch_size: int) -> dict[str, Any]:
    """Top probabilities of images of none of the classes, and the share the threshold labels 'unknown'."""
    from .classifier.evaluation import abstention

    scores = [float(p.proba.max()) for p in clf.iter_predict(files, batch_size=batch_size, skip_corrupt=True)]
    out = abstention(scores, None, threshold)
    if scores:
        ordered = sorted(scores)
        out["median_top_score"] = ordered[len(ordered) // 2]
    out["n_unreadable"] = len(files) - len(scores)
    return out


def _eval_lines(summary: dict[str, Any], unscored: int) -> list[str]:
    """The human-readable evaluation: top-1, the per-class table, abstention in and out of the classes."""
    from .classifier.evaluation import format_report

    lines: list[str] = []
    ev = summary.get("eval")
    if ev is not None:
        lines.append(f"top-1 {ev['top1']:.2f}% ({ev['n_correct']}/{ev['n']} images whose parent folder is a class"
                     f"{f'; {unscored} others not scored' if unscored else ''}) · macro F1 {ev['macro']['f1']:.2f}% "
                     f"· confusion matrix: {ev['confusion_png']}")
        lines.extend(format_report(ev))
        ab = ev["abstain"]
        if ab["min_score"] is not None:
            acc = ab["accuracy_on_accepted"]
            lines.append(f"min score {ab['min_score']:.4g}: 'unknown' for {ab['abstained']}/{ab['n']} in-class "
                         f"images ({ab['abstention_rate']:.1f}%); top-1 on the rest "
                         f"{'–' if acc is None else f'{acc:.2f}%'}")
    out = summary.get("eval_unknown")
    if out is not None:
        if out["min_score"] is None:
            lines.append(f"out-of-class images: {out['n']} scored, median top probability "
                         f"{out.get('median_top_score', float('nan')):.3f}; none labelled 'unknown' "
                         "(give --min-score, e.g. --min-score auto)")
        else:
            lines.append(f"out-of-class images: 'unknown' for {out['abstained']}/{out['n']} "
                         f"({out['abstention_rate']:.1f}%) at min score {out['min_score']:.4g}")
    return lines


def _model_name(card: dict[str, Any]) -> str:
    return f"{card['method']} · {card['backbone_name']}"


def _common_folder(files: list[str]) -> str:
    import os

    if not files:
        return "no images"
    try:
        return os.path.commonpath([str(Path(f).resolve().parent) for f in files])
    except ValueError:  # different drives
        return f"{len(files)} images"


def register(app: typer.Typer) -> None:
    """Add ``fit`` and ``predict`` to the main ``xmodal`` app."""
    app.command("fit")(fit_command)
    app.command("predict")(predict_command)
