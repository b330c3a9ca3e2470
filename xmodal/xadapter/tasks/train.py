"""Visual-knowledge adaptation by masked language modelling (papers.md A.6).

Frozen PLM and CLIP; only the X-adapters (and a fresh MLM head when the PLM ships without one) train.
Each step: BERT masking (80/10/10) -> the text the PLM sees, minus mask tokens, is the retrieval query
and the T-expert input (no leakage) -> k images retrieved from the bank -> MLM loss on masked positions.

Determinism and resuming: the batch of step s and its masking are pure functions of (seed, s), and
the dropout RNG is reseeded from (seed, s) every step, so a run resumed from a checkpoint (adapter,
optimizer, scheduler, step, RNG states; written atomically) ends with the same weights as an
uninterrupted run.
"""
from __future__ import annotations

import io
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ...errors import XmodalError
from ...progress import Progress
from ..model.config import XAdapterConfig, parse_experts
from ..retrieval.context import DEFAULT_BACKBONE, ContextBuilder, load_bank
from ..model.masking import mask_tokens, visible_texts
from ..model.modules import (
    _atomic_write_bytes,
    add_xadapter,
    adapter_parameters,
    count_parameters,
    get_xadapter,
    mark_new_head,
    save_xadapter,
    unwrap,
)
from ..model.plm import load_mlm, masked_lm_logits
from .common import EpochPerm as _EpochPerm
from .common import corpus_digest, load_checkpoint_file
from .corpus import Corpus, read_corpus_rows

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "summary.json"
ADAPTER_SUBDIR = "xadapter"
# arguments that must not change between a run and its resumption
_RESUME_KEYS = ("plm", "backbone", "steps", "batch_size", "lr", "mask_ratio", "max_length", "seed", "experts",
                "corpus", "warmup_ratio", "weight_decay", "visual", "focus_words", "layers", "heads", "attn_dim",
                "proj_dim", "bottleneck", "feature_source", "k", "dropout", "max_texts", "head", "train_head",
                "image_root", "paired_retrieved", "skip_bad_rows")


def read_corpus(files: list[str | Path], limit: int | None = None, skip_bad_rows: bool = False) -> list[str]:
    """The texts of jsonl files ({"text": ...} per line) or plain text files (one text per line), validated
    (see ``corpus.read_corpus_rows``; image fields are checked there and ignored here)."""
    return read_corpus_rows(files, limit, skip_bad_rows=skip_bad_rows).texts


@dataclass
class TrainArgs:
    plm: str = "minilm"
    backbone: str | None = None
    bank: str | None = None
    corpus: list[str] = field(default_factory=list)
    out: str = "xadapter-run"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    mask_ratio: float = 0.15
    max_length: int = 64
    device: str = "auto"
    resume: bool = False
    seed: int = 0
    experts: str = "v,t"
    layers: str = "top2"
    heads: int = 4
    attn_dim: int | None = None
    proj_dim: int | None = None
    bottleneck: int = 128
    feature_source: str = "pooled"
    k: int = 4
    dropout: float = 0.1
    save_every: int = 500
    stop_after: int | None = None
    max_texts: int | None = None
    grad_clip: float = 1.0
    progress: bool = True
    visual: str = "real"
    focus_words: str | None = None
    head: str | None = None             # a text-only head folder (`xmodal xadapter head`) loaded before training
    train_head: bool | None = None      # train the MLM head with the adapters (None: only when no --head is given)
    image_root: str | None = None       # where paired image paths are relative to (None: each corpus file's folder)
    paired_retrieved: bool = False      # paired rows also get their k retrieved images
    skip_bad_rows: bool = False         # count and skip malformed corpus rows instead of stopping

    def trains_head(self) -> bool:
        return self.head is None if self.train_head is None else bool(self.train_head)

    def fingerprint(self) -> dict:
        """Everything a resumed run must share with the run that wrote the checkpoint."""
        d = {k: getattr(self, k) for k in _RESUME_KEYS}
        d["corpus"] = [str(Path(c).resolve()) for c in self.corpus]
        d["corpus_sha256"] = corpus_digest(self.corpus)
        d["bank_build"] = _recorded_id(self.bank, "bank.json", "build_id")
        d["head_sha256"] = _recorded_id(self.head, "head.json", "tensor_sha256")
        return d


def _recorded_id(folder: str | None, meta_file: str, key: str) -> str | None:
    """The identity an artefact folder records in its JSON (a bank's build id in bank.json, a head's tensor
    digest in head.json): a rebuilt artefact gets a new one, so a resume refuses it."""
    if not folder:
        return None
    try:
        return json.loads((Path(folder) / meta_file).read_text()).get(key)
    except (OSError, ValueError):
        return None


def load_checkpoint(path: Path) -> dict:
    """An adaptation run's checkpoint (see ``load_checkpoint_file``)."""
    return load_checkpoint_file(path, {"step", "args", "adapter", "head", "optimizer", "scheduler", "rng"})


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _make_accelerator(device: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    device = (device or "auto").lower()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise XmodalError("--device cuda was requested but no CUDA device is visible")
    # gates can switch experts off, leaving parameters without gradients under DDP
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    # "auto" without a GPU is the CPU: say so, so that under a launcher (torchrun, `accelerate launch
    # --multi_gpu`) the processes join one gloo group instead of training alone
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return Accelerator(cpu=cpu, kwargs_handlers=handlers)


# ----- the parts of a run ---------------------------------------------------------------------------
def _check_args(args: TrainArgs) -> tuple[str, ...]:
    experts = parse_experts(args.experts)
    if not experts:
        raise XmodalError("--experts none leaves nothing to train; use v,t, v or t")
    if args.steps < 1:
        raise XmodalError("--steps must be >= 1")
    return experts


def _open_checkpoint(args: TrainArgs, out: Path, world: int, log) -> dict | None:
    """The checkpoint to resume from (verified against the current settings), or None for a fresh run."""
    ckpt_path = out / CHECKPOINT_NAME
    if not ckpt_path.is_file():
        if args.resume:
            log(f"no checkpoint in {out}; starting a fresh run")
        return None
    if not args.resume:
        raise XmodalError(f"{out} already holds a training checkpoint; pass --resume to continue it "
                          "or choose another --out")
    checkpoint = load_checkpoint(ckpt_path)
    saved = checkpoint["args"]
    now = {**args.fingerprint(), "processes": world}
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in now.items()
             if saved.get(k, v if k == "processes" else None) != v]
    if diffs:
        raise XmodalError("cannot resume: the run's settings changed (" + "; ".join(diffs) + ")",
                          hint=f"rerun with the original settings and corpus, or start a fresh run with another "
                               f"--out than {out}")
    return checkpoint


@dataclass
class _Parts:
    """What ``_build_model`` assembles: the PLM with its adapters, the VLM and the bank."""

    model: torch.nn.Module
    tokenizer: object
    backbone: object
    backbone_spec: str
    bank: object
    config: XAdapterConfig
    counts: dict
    new_head: list
    head_note: str | None
    plm_path: object


def _build_model(args: TrainArgs, experts: tuple[str, ...], device, log, paired_only: bool = False) -> _Parts:
    """``paired_only``: every corpus row brings its own image(s), so no retrieval bank is needed."""
    from ...backbones import load_backbone

    model, tokenizer, new_head, plm_path = load_mlm(args.plm)
    if tokenizer.mask_token_id is None:
        raise XmodalError(f"the tokenizer of {args.plm} has no mask token; MLM adaptation needs one")
    if args.head:
        from .head import load_head

        loaded = load_head(model, args.head)
        log(f"text-only base head loaded from {args.head} ({len(loaded)} tensors)"
            + ("" if args.trains_head() else "; it stays frozen"))
    backbone_spec = args.backbone
    needs_bank = ("v" in experts and args.visual != "zero"
                  and (not paired_only or args.paired_retrieved or bool(args.bank)))
    if needs_bank:
        if not args.bank:
            raise XmodalError("the V-expert needs a retrieval bank: pass --bank DIR (build one with "
                              "`xmodal xadapter bank`), or train the T-expert only with --experts t")
        if backbone_spec is None:
            meta_path = Path(args.bank) / "bank.json"
            backbone_spec = json.loads(meta_path.read_text()).get("backbone") if meta_path.is_file() else None
    backbone_spec = backbone_spec or DEFAULT_BACKBONE
    backbone = load_backbone(backbone_spec, device=str(device))
    bank = load_bank(args.bank, backbone) if needs_bank else None
    cfg = XAdapterConfig.for_backbone(
        backbone, experts=experts, layers=args.layers, heads=args.heads, attn_dim=args.attn_dim,
        proj_dim=args.proj_dim, bottleneck=args.bottleneck, feature_source=args.feature_source, k=args.k,
        mask_ratio=args.mask_ratio, dropout=args.dropout)
    stack = add_xadapter(model, cfg)
    if new_head:
        mark_new_head(model, new_head)   # saved with the adapter either way, so the folder is self-contained
        if not args.trains_head():
            named = dict(model.named_parameters())
            for n in new_head:
                named[n].requires_grad_(False)
    counts = count_parameters(model)
    head_note = None
    if new_head and args.head is None:
        head_note = (f"{args.plm} ships without an MLM head: a fresh one ({counts['new_head']:,} params, decoder tied "
                     "to the frozen word embeddings) is created and trained with the adapters (build a text-only "
                     "base first with `xmodal xadapter head` and pass --head to train the adapters alone)")
    if head_note:
        log(head_note)
    log(f"trainable params: {counts['trainable']:,} = {counts['trainable_pct_of_plm']:.2f}% of the PLM's "
        f"{counts['plm']:,} (adapters {counts['adapter']:,} = {counts['adapter_pct_of_plm']:.2f}%)")
    log(f"backbone {backbone.name}; experts {','.join(experts)} after layers {stack.config.layers}; "
        f"features {cfg.feature_source}, k={cfg.k}" + ("" if args.visual == "real" else f"; visual input: {args.visual}"))
    return _Parts(model, tokenizer, backbone, backbone_spec, bank, cfg, counts, new_head, head_note, plm_path)


def _embed_paired(corpus: Corpus, parts: _Parts, log, progress: bool, visual: str = "real"):
    """Embed the corpus's paired images once (bank rows reused when the bank holds the same files)."""
    from ..retrieval.paired import PairedImages

    paths = sorted({p for r in corpus.rows for p in r.images})
    step = max(1, len(paths) // 10)

    def report(done: int, total: int) -> None:
        if progress and (done % step < 64 or done == total):
            log(f"paired images: embedded {done}/{total}")

    if visual == "zero":    # the control feeds zeros: nothing to embed
        paired = PairedImages(paths, torch.zeros(len(paths), int(parts.backbone.embed_dim)))
    else:
        paired = PairedImages.embed(paths, parts.backbone, parts.bank, progress=report)
    source = "not embedded: zero input" if visual == "zero" else f"{paired.from_bank} taken from the bank"
    log(f"paired images: {len(paths)} distinct ({source}), "
        f"{sum(1 for r in corpus.rows if r.images)} of {len(corpus.rows)} rows paired")
    return paired


def _optimizer(model, args: TrainArgs):
    """AdamW (weight decay on matrices only) + linear warm-up / decay over the adapter (+ new head) parameters."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in adapter_parameters(model) if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * args.steps), args.steps)
    return params, optimizer, scheduler


def _restore(checkpoint: dict, base, optimizer, scheduler) -> int:
    get_xadapter(base).load_state_dict(checkpoint["adapter"])
    named = dict(base.named_parameters())
    with torch.no_grad():
        for name, value in checkpoint["head"].items():
            named[name].copy_(value.to(named[name].device))
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    _set_rng_state(checkpoint["rng"])
    return int(checkpoint["step"])


def _save_checkpoint(path: Path, step: int, args: TrainArgs, base, optimizer, scheduler, accelerator) -> None:
    """Adapter, new head, optimizer, scheduler, step and RNG state; tensors and plain containers only (so it
    loads with ``weights_only=True``), written atomically by the main process."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    stack = get_xadapter(base)
    named = dict(base.named_parameters())
    state = {
        "step": step, "args": {**args.fingerprint(), "processes": accelerator.num_processes},
        "config": stack.config.to_dict(),
        "adapter": {k: v.detach().cpu() for k, v in stack.state_dict().items()},
        "head": {n: named[n].detach().cpu() for n in stack.head_param_names},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write_bytes(path, buf.getvalue())


def _focus_ids(words: str | None, tokenizer) -> torch.Tensor | None:
    if not words:
        return None
    names = [w.strip() for w in words.split(",") if w.strip()]
    ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in names]
    bad = [w for w, i in zip(names, ids) if len(i) != 1]
    if bad:
        raise XmodalError(f"--focus-words must be single tokens of the PLM vocabulary; not so for {bad}")
    return torch.tensor([i[0] for i in ids])


def _masked_batch(texts, perm: _EpochPerm, step: int, args: TrainArgs, tokenizer, rank: int, world: int,
                  focus_ids):
    """This process's share of step ``step``'s batch: (tokenizer output, masked ids, labels, global target count).

    With several processes every one of them tokenizes and masks the whole global batch (``world`` x
    ``batch_size`` rows, the rows one process would take at that size) and keeps its slice, so the
    masking does not depend on how the batch is split.
    """
    if world == 1:
        rows = perm.rows(step, args.batch_size, rank, world)
    else:
        rows = [r for k in range(world) for r in perm.rows(step, args.batch_size, k, world)]
    enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=args.max_length,
                    return_tensors="pt")
    gen = torch.Generator().manual_seed(args.seed * 7_368_787 + step * 104_729)
    if focus_ids is None:
        ids, labels, _ = mask_tokens(enc["input_ids"], enc["attention_mask"], tokenizer, args.mask_ratio, gen)
    else:
        ids, labels, _ = mask_tokens(enc["input_ids"], enc["attention_mask"], tokenizer, args.mask_ratio, gen,
                                     focus_ids=focus_ids)
    n_targets = int((labels != -100).sum())
    if world > 1:
        part = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
        enc = {k: v[part] for k, v in enc.items()}
        ids, labels = ids[part], labels[part]
    return enc, ids, labels, n_targets


def _local_rows(perm: _EpochPerm, step: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Corpus rows of this process's share of step ``step`` (the rows ``_masked_batch`` keeps)."""
    return perm.rows(step, batch_size, rank, world)


def _loss(model, batch: dict, labels: torch.Tensor, n_targets: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss to backpropagate, this process's summed target loss).

    One process: the model's own mean cross-entropy. Several: the summed cross-entropy of this slice
    divided by the global target count, times ``world`` (DDP averages gradients over processes), so the
    gradient equals the one-process gradient of the global batch.
    """
    if world == 1:
        logits = masked_lm_logits(model, batch, labels)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[labels != -100])
        return loss, loss.detach()
    logits = model(**batch).logits
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    return total * world / max(n_targets, 1), total.detach()


def _write_log_head(log_path: Path, checkpoint, start_step: int) -> None:
    """Keep the log lines up to the resumed step (a fresh run starts an empty log)."""
    kept = []
    if log_path.is_file() and checkpoint is not None:
        kept = [l for l in log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start_step]
    log_path.write_text("".join(l + "\n" for l in kept))


def train_mlm(args: TrainArgs, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) MLM adaptation; returns a summary dict (also written to ``out/summary.json``)."""
    out = Path(args.out)
    ckpt_path = out / CHECKPOINT_NAME
    experts = _check_args(args)
    accelerator = _make_accelerator(args.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    checkpoint = _open_checkpoint(args, out, world, log)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = accelerator.device
    corpus = read_corpus_rows(args.corpus, args.max_texts, image_root=args.image_root,
                              skip_bad_rows=args.skip_bad_rows)
    if corpus.skipped:
        log(f"skipped {corpus.skipped} malformed corpus rows (--skip-bad-rows)")
    texts = corpus.texts
    paired_only = corpus.paired and all(r.images for r in corpus.rows)
    parts = _build_model(args, experts, device, log, paired_only=paired_only)
    params, optimizer, scheduler = _optimizer(parts.model, args)
    model, optimizer = accelerator.prepare(parts.model, optimizer)
    base = unwrap(model)
    stack = get_xadapter(base)
    paired = None
    if corpus.paired and "v" in experts:
        paired = _embed_paired(corpus, parts, log, args.progress, args.visual)
    builder = ContextBuilder(stack.config, parts.backbone, parts.bank, device=device, visual=args.visual,
                             paired=paired, paired_retrieved=args.paired_retrieved, cache_queries=True)
    focus_ids = _focus_ids(args.focus_words, parts.tokenizer)
    start_step = 0
    if checkpoint is not None:
        start_step = _restore(checkpoint, base, optimizer, scheduler)
        log(f"resumed from step {start_step} of {args.steps}")

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    if accelerator.is_main_process:
        _write_log_head(log_path, checkpoint, start_step)
    save = lambda s: _save_checkpoint(ckpt_path, s, args, base, optimizer, scheduler, accelerator)  # noqa: E731

    perm = _EpochPerm(len(texts), args.seed)
    end_step = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    model.train()
    losses: list[float] = []
    # a bar on a terminal, one line every few seconds when stderr is piped (xmodal.progress)
    bar = Progress(args.steps, "xadapter mlm", enabled=args.progress and accelerator.is_local_main_process,
                   initial=start_step)
    t0 = time.time()
    with open(log_path, "a") if accelerator.is_main_process else open(os.devnull, "w") as log_fh:
        for step in range(start_step, end_step):
            torch.manual_seed(args.seed * 1_000_003 + step * 7919 + rank)   # dropout
            enc, ids, labels, n_targets = _masked_batch(texts, perm, step, args, parts.tokenizer, rank, world,
                                                        focus_ids)
            seen = visible_texts(ids, enc["attention_mask"], parts.tokenizer)
            if paired is None:
                ctx = builder.build(seen, experts)
            else:
                rows = _local_rows(perm, step, args.batch_size, rank, world)
                ctx = builder.build(seen, experts, images=[corpus.rows[i].images for i in rows])
            batch = {k: v.to(device) for k, v in enc.items()}
            batch["input_ids"] = ids.to(device)
            with stack.context(ctx):
                loss, summed = _loss(model, batch, labels.to(device), n_targets, world)
            accelerator.backward(loss)
            if args.grad_clip:
                accelerator.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(summed) if world == 1 else float(accelerator.gather(summed[None]).sum()) / max(n_targets, 1)
            losses.append(value)
            if accelerator.is_main_process:
                log_fh.write(json.dumps({"step": step + 1, "loss": round(value, 6),
                                         "lr": scheduler.get_last_lr()[0]}) + "\n")
                log_fh.flush()
            bar.update(1, note=f"loss {value:.3f}")
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < end_step:
                save(step + 1)
    bar.close()
    save(end_step)
    return _finish(args, parts, base, accelerator, out, end_step, start_step, losses, time.time() - t0)


def _finish(args: TrainArgs, parts: _Parts, base, accelerator, out: Path, step: int, start_step: int,
            losses: list[float], seconds: float) -> dict:
    """Write the adapter (when the run is complete) and ``summary.json``."""
    finished = step >= args.steps
    stack = get_xadapter(base)
    summary = {
        "out": str(out), "plm": args.plm, "plm_path": str(parts.plm_path), "backbone": parts.backbone_spec,
        "stand_in_backbone": bool(getattr(parts.backbone, "is_stand_in", False)), "bank": args.bank,
        "experts": list(stack.config.experts), "layers": stack.config.layers,
        "feature_source": parts.config.feature_source, "k": parts.config.k, "visual": args.visual,
        "focus_words": args.focus_words, "head": args.head, "head_trained": args.trains_head(),
        "paired_retrieved": args.paired_retrieved, "processes": accelerator.num_processes,
        "global_batch": args.batch_size * accelerator.num_processes, "steps_done": step, "steps": args.steps,
        "finished": finished, "resumed_from": start_step, "params": parts.counts, "new_mlm_head": bool(parts.new_head),
        "new_head_note": parts.head_note, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "seconds": round(seconds, 2),
        "log": str(out / LOG_NAME), "checkpoint": str(out / CHECKPOINT_NAME),
    }
    if accelerator.is_main_process:
        if finished:
            save_xadapter(base, out / ADAPTER_SUBDIR, extra={"training": {k: summary[k] for k in (
                "plm", "backbone", "bank", "steps", "feature_source", "k", "visual", "head", "head_trained")}})
            summary["xadapter"] = str(out / ADAPTER_SUBDIR)
        _atomic_write_bytes(out / SUMMARY_NAME, json.dumps(summary, indent=2).encode())
    accelerator.wait_for_everyone()
    return summary


__all__ = ["TrainArgs", "train_mlm", "read_corpus", "load_checkpoint", "corpus_digest"]
