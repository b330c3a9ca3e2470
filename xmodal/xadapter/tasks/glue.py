"""GLUE fine-tuning with (or without) X-adapters and dev-set evaluation (papers.md A.8)."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import DatasetError, XmodalError

# task -> (text columns, label column, label names (None = regression), dev files, metrics)
TASKS = {
    "CoLA": (("sentence",), "label", ["0", "1"], ["dev.tsv"], ("matthews",)),
    "SST-2": (("sentence",), "label", ["0", "1"], ["dev.tsv"], ("accuracy",)),
    "MRPC": (("#1 String", "#2 String"), "Quality", ["0", "1"], ["dev.tsv"], ("accuracy", "f1")),
    "STS-B": (("sentence1", "sentence2"), "score", None, ["dev.tsv"], ("pearson", "spearman")),
    "QQP": (("question1", "question2"), "is_duplicate", ["0", "1"], ["dev.tsv"], ("accuracy", "f1")),
    "MNLI": (("sentence1", "sentence2"), "gold_label", ["entailment", "neutral", "contradiction"],
             ["dev_matched.tsv", "dev_mismatched.tsv"], ("accuracy",)),
    "QNLI": (("question", "sentence"), "label", ["entailment", "not_entailment"], ["dev.tsv"], ("accuracy",)),
    "RTE": (("sentence1", "sentence2"), "label", ["entailment", "not_entailment"], ["dev.tsv"], ("accuracy",)),
}
_ALIASES = {k.lower().replace("-", ""): k for k in TASKS} | {"stsb": "STS-B", "sst2": "SST-2", "mnlim": "MNLI"}
# CoLA ships without a header: source, label, original label, sentence
_COLA_COLUMNS = ["source", "label", "label_original", "sentence"]


def canonical_task(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _ALIASES:
        raise XmodalError(f"unknown GLUE task {name!r}; choose one of {', '.join(TASKS)}")
    return _ALIASES[key]


@dataclass
class GlueExample:
    texts: tuple[str, ...]
    label: float | int


def task_dir(data: str | Path, task: str) -> Path:
    data = Path(data)
    for cand in (data / task, data / task.replace("-", ""), data):
        if (cand / "train.tsv").is_file() or any((cand / f).is_file() for f in TASKS[task][3]):
            return cand
    raise DatasetError(f"no GLUE {task} files under {data} (expected {data}/{task}/train.tsv and dev files)")


def read_glue(path: str | Path, task: str) -> tuple[list[GlueExample], int]:
    """Read one GLUE tsv -> (examples, skipped malformed lines). Header names are looked up per task."""
    task = canonical_task(task)
    cols, label_col, labels, _, _ = TASKS[task]
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"GLUE file {path} not found")
    with open(path, encoding="utf-8-sig") as fh:
        lines = [l.rstrip("\n").rstrip("\r") for l in fh]
    lines = [l for l in lines if l.strip()]
    if not lines:
        raise DatasetError(f"{path} is empty")
    first = lines[0].split("\t")
    if task == "CoLA" and not ("sentence" in first and "label" in first):
        header, body = _COLA_COLUMNS, lines
    else:
        header, body = [h.strip() for h in first], lines[1:]
    try:
        idx = [header.index(c) for c in cols]
        li = header.index(label_col)
    except ValueError as exc:
        raise DatasetError(f"{path}: header {header} lacks the {task} columns {list(cols) + [label_col]}") from exc
    out, skipped = [], 0
    for line in body:
        parts = line.split("\t")
        if len(parts) <= max(idx + [li]):
            skipped += 1
            continue
        raw = parts[li].strip()
        if labels is None:
            try:
                label: float | int = float(raw)
            except ValueError:
                skipped += 1
                continue
        else:
            if raw not in labels:
                skipped += 1
                continue
            label = labels.index(raw)
        out.append(GlueExample(tuple(parts[i].strip() for i in idx), label))
    return out, skipped


# ----- metrics ------------------------------------------------------------------------------------
def _rank(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    # average ties
    uniq, inv = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inv, ranks)
    counts = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inv, torch.ones_like(x))
    return (sums / counts)[inv]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else 0.0


def compute_metrics(task: str, preds: torch.Tensor, labels: torch.Tensor) -> dict:
    """GLUE dev metrics in percent: Matthews (CoLA), accuracy + F1 (MRPC, QQP), Pearson/Spearman (STS-B), accuracy."""
    task = canonical_task(task)
    out = {}
    if TASKS[task][2] is None:
        p, y = preds.double(), labels.double()
        out["pearson"] = 100 * _pearson(p, y)
        out["spearman"] = 100 * _pearson(_rank(p), _rank(y))
    else:
        p, y = preds.long(), labels.long()
        out["accuracy"] = 100 * float((p == y).double().mean()) if len(y) else 0.0
        if "f1" in TASKS[task][4]:
            tp = int(((p == 1) & (y == 1)).sum())
            fp = int(((p == 1) & (y == 0)).sum())
            fn = int(((p == 0) & (y == 1)).sum())
            out["f1"] = 100 * (2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        if task == "CoLA":
            tp = int(((p == 1) & (y == 1)).sum()); tn = int(((p == 0) & (y == 0)).sum())  # noqa: E702
            fp = int(((p == 1) & (y == 0)).sum()); fn = int(((p == 0) & (y == 1)).sum())  # noqa: E702
            den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            out["matthews"] = 100 * ((tp * tn - fp * fn) / den if den else 0.0)
    return {k: round(v, 2) for k, v in out.items()}


def main_metric(task: str) -> str:
    return TASKS[canonical_task(task)][4][0]


# ----- fine-tuning ---------------------------------------------------------------------------------
@dataclass
class GlueArgs:
    task: str = "RTE"
    data: str = "."
    plm: str = "minilm"
    xadapter: str | None = None
    experts: str = "t"
    backbone: str | None = None
    bank: str | None = None
    epochs: float = 3.0
    lr: float = 2e-5
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    max_train: int | None = None
    max_eval: int | None = None
    freeze_plm: bool = False
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    device: str = "auto"
    progress: bool = True
    strict: bool = False
    force: bool = False


def _device(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise XmodalError("--device cuda was requested but no CUDA device is visible")
    return torch.device(name)


def run_glue(args: GlueArgs, log=print) -> dict:
    """Fine-tune on ``train.tsv`` and evaluate on the dev file(s); returns the result dict."""
    from transformers import get_linear_schedule_with_warmup

    from ..model.config import parse_experts
    from ..retrieval.context import DEFAULT_BACKBONE, ContextBuilder, load_bank
    from ..model.modules import count_parameters, get_xadapter, load_xadapter, read_xadapter_meta
    from ..model.plm import load_classifier

    task = canonical_task(args.task)
    cols, _, labels, dev_files, _ = TASKS[task]
    folder = task_dir(args.data, task)
    train, skipped = read_glue(folder / "train.tsv", task)
    if not train:
        raise DatasetError(f"{folder / 'train.tsv'} has no usable {task} example: all {skipped} rows are malformed "
                           f"or have a label outside {labels if labels is not None else 'the numbers'}",
                           hint=f"check the label column {TASKS[task][1]!r} of the training file")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.max_train and len(train) > args.max_train:
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.max_train]
        train = [train[i] for i in sorted(pick.tolist())]
    devs, dev_skipped = {}, {}
    for name in dev_files:
        if (folder / name).is_file():
            ex, bad = read_glue(folder / name, task)
            key = name.rsplit(".", 1)[0]
            if bad and args.strict:
                raise DatasetError(f"{folder / name}: {bad} rows are malformed or have an invalid label (--strict)",
                                   hint="fix those rows, or drop --strict to skip them (they are counted in the result)")
            if not ex:
                raise DatasetError(f"{folder / name} has no usable {task} example ({bad} rows skipped)",
                                   hint=f"check the label column {TASKS[task][1]!r} of the dev file")
            devs[key] = ex[: args.max_eval] if args.max_eval else ex
            dev_skipped[key] = bad
    if not devs:
        raise DatasetError(f"no dev file for {task} in {folder} (expected {', '.join(dev_files)})")

    device = _device(args.device)
    num_labels = 1 if labels is None else len(labels)
    model, tokenizer, new_params, _ = load_classifier(args.plm, num_labels)
    builder, experts, notes = None, (), []
    if args.xadapter:
        meta = read_xadapter_meta(args.xadapter)
        stack = load_xadapter(model, args.xadapter, load_head=False, force=args.force, log=notes.append)
        experts = parse_experts(args.experts)
        stack.set_experts(experts)
        if experts:
            from ...backbones import load_backbone

            spec = args.backbone or meta["config"].get("backbone") or DEFAULT_BACKBONE
            backbone = load_backbone(spec, device=str(device))
            if "v" in experts and not args.bank:
                raise XmodalError("the V-expert needs --bank DIR for GLUE; or use --experts t")
            bank = load_bank(args.bank, backbone) if "v" in experts else None
            builder = ContextBuilder(stack.config, backbone, bank, device=device)
    elif args.experts and parse_experts(args.experts) and args.experts != GlueArgs.experts:
        notes.append("--experts ignored: no --xadapter given (plain PLM baseline)")
    # trainable parameters: (a) everything, or (b) adapters + new head only
    new = set(new_params)
    for name, p in model.named_parameters():
        p.requires_grad_(not args.freeze_plm or name.startswith("xadapter.") or name in new)
    model.to(device)
    counts = count_parameters(model)
    for note in notes:
        log(note)
    log(f"GLUE {task}: {len(train)} train examples ({skipped} malformed lines skipped), dev "
        + ", ".join(f"{k} {len(v)}" + (f" ({dev_skipped[k]} rows skipped)" if dev_skipped[k] else "")
                    for k, v in devs.items()) + f"; experts {','.join(experts) or 'none'}; "
        f"{'PLM frozen' if args.freeze_plm else 'full fine-tuning'}; trainable {counts['trainable']:,}")

    def batches(examples, shuffle: bool, epoch: int = 0):
        order = list(range(len(examples)))
        if shuffle:
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch)).tolist()
        for s in range(0, len(order), args.batch_size):
            chunk = [examples[i] for i in order[s: s + args.batch_size]]
            segs = list(zip(*[ex.texts for ex in chunk]))
            enc = tokenizer(*[list(x) for x in segs], padding=True, truncation=True, max_length=args.max_length,
                            return_tensors="pt")
            y = torch.tensor([ex.label for ex in chunk], dtype=torch.float if labels is None else torch.long)
            yield chunk, enc, y

    def forward(chunk, enc):
        enc = {k: v.to(device) for k, v in enc.items()}
        if builder is not None:
            ctx = builder.build([ex.texts for ex in chunk], experts)
            with get_xadapter(model).context(ctx):
                return model(**enc).logits
        return model(**enc).logits

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = max(1, math.ceil(args.epochs * steps_per_epoch))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total), total)
    t0, step, losses = time.time(), 0, []
    bar = None
    if args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"glue {task}", dynamic_ncols=True)
    epoch = 0
    while step < total:
        model.train()
        for chunk, enc, y in batches(train, True, epoch):
            logits = forward(chunk, enc)
            if labels is None:
                loss = torch.nn.functional.mse_loss(logits.squeeze(-1), y.to(device))
            else:
                loss = torch.nn.functional.cross_entropy(logits, y.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step >= total:
                break
        epoch += 1
    if bar is not None:
        bar.close()

    results = {}
    model.eval()
    with torch.no_grad():
        for name, examples in devs.items():
            preds, ys = [], []
            for chunk, enc, y in batches(examples, False):
                logits = forward(chunk, enc).float().cpu()
                preds.append(logits.squeeze(-1) if labels is None else logits.argmax(-1))
                ys.append(y)
            results[name] = compute_metrics(task, torch.cat(preds), torch.cat(ys))
    primary = next(iter(results.values()))
    return {
        "task": task, "metrics": results, "main_metric": main_metric(task),
        "score": primary[main_metric(task)], "train_size": len(train), "dev_size": {k: len(v) for k, v in devs.items()},
        "train_skipped": skipped, "dev_skipped": dev_skipped,
        "plm": args.plm, "xadapter": args.xadapter, "experts": list(experts),
        "mode": "frozen-plm" if args.freeze_plm else "full", "epochs": args.epochs, "lr": args.lr,
        "batch_size": args.batch_size, "seed": args.seed, "steps": step, "params": counts,
        "final_train_loss": losses[-1] if losses else None, "seconds": round(time.time() - t0, 2), "notes": notes,
    }


__all__ = ["TASKS", "GlueArgs", "run_glue", "read_glue", "compute_metrics", "canonical_task", "main_metric"]
