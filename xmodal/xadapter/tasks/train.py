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

import hashlib
import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ...errors import InputError, XmodalError
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
from ..model.plm import load_mlm

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "summary.json"
ADAPTER_SUBDIR = "xadapter"
# arguments that must not change between a run and its resumption
_RESUME_KEYS = ("plm", "backbone", "steps", "batch_size", "lr", "mask_ratio", "max_length", "seed", "experts",
                "corpus", "warmup_ratio", "weight_decay", "visual", "focus_words")


def read_corpus(files: list[str | Path], limit: int | None = None) -> list[str]:
    """jsonl files with {"text": ...} per line, or plain text files with one text per line."""
    texts: list[str] = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise XmodalError(f"corpus file {path} not found")
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                if path.suffix in (".jsonl", ".json"):
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise XmodalError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from exc
                else:
                    text = line
                text = " ".join(str(text).split())
                if text:
                    texts.append(text)
                if limit and len(texts) >= limit:
                    return texts
    if not texts:
        raise XmodalError(f"the corpus {', '.join(map(str, files))} has no texts")
    return texts


class _EpochPerm:
    """Caches the per-epoch permutations used by ``batch_indices``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._cache = n, seed, {}

    def rows(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
        start = (step * world + rank) * batch_size
        out = []
        for pos in range(start, start + batch_size):
            epoch, offset = divmod(pos, self.n)
            if epoch not in self._cache:
                self._cache = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    self.seed * 1_000_003 + epoch))}
            out.append(int(self._cache[epoch][offset]))
        return out


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

    def fingerprint(self) -> dict:
        d = {k: getattr(self, k) for k in _RESUME_KEYS}
        d["corpus"] = [str(Path(c).resolve()) for c in self.corpus]
        d["corpus_sha256"] = corpus_digest(self.corpus)
        return d


def corpus_digest(files: list[str | Path]) -> str:
    """SHA-256 over the corpus files' bytes (in order): a resume refuses a corpus whose content changed."""
    h = hashlib.sha256()
    for f in files:
        path = Path(f)
        if path.is_file():
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def load_checkpoint(path: Path) -> dict:
    """Read a training checkpoint without unpickling code: ``torch.load(weights_only=True)`` accepts only
    tensors and plain containers, so a crafted file cannot run anything."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError (truncated)
        raise InputError(f"{path} is not a readable X-adapter training checkpoint ({type(exc).__name__}); "
                         "it was refused without running any code in it",
                         hint=f"delete {path} to start the run afresh, or pass another --out") from None
    keys = {"step", "args", "adapter", "head", "optimizer", "scheduler", "rng"}
    if not isinstance(ckpt, dict) or not keys <= set(ckpt):
        raise InputError(f"{path} is not an X-adapter training checkpoint (missing "
                         f"{sorted(keys - set(ckpt) if isinstance(ckpt, dict) else keys)})",
                         hint=f"delete {path} to start the run afresh, or pass another --out")
    return ckpt


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
    return Accelerator(cpu=device == "cpu", kwargs_handlers=handlers)


def train_mlm(args: TrainArgs, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) MLM adaptation; returns a summary dict (also written to ``out/summary.json``)."""
    from transformers import get_linear_schedule_with_warmup

    out = Path(args.out)
    ckpt_path = out / CHECKPOINT_NAME
    experts = parse_experts(args.experts)
    if not experts:
        raise XmodalError("--experts none leaves nothing to train; use v,t, v or t")
    if args.steps < 1:
        raise XmodalError("--steps must be >= 1")
    checkpoint = None
    if ckpt_path.is_file():
        if not args.resume:
            raise XmodalError(f"{out} already holds a training checkpoint; pass --resume to continue it "
                              "or choose another --out")
        checkpoint = load_checkpoint(ckpt_path)
        saved = checkpoint["args"]
        diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in args.fingerprint().items()
                 if saved.get(k) != v]
        if diffs:
            raise XmodalError("cannot resume: the run's settings changed (" + "; ".join(diffs) + ")",
                              hint=f"rerun with the original settings and corpus, or start a fresh run with another "
                                   f"--out than {out}")
    elif args.resume:
        log(f"no checkpoint in {out}; starting a fresh run")

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    accelerator = _make_accelerator(args.device)
    device = accelerator.device

    # ----- models ------------------------------------------------------------------------------
    model, tokenizer, new_head, plm_path = load_mlm(args.plm)
    if tokenizer.mask_token_id is None:
        raise XmodalError(f"the tokenizer of {args.plm} has no mask token; MLM adaptation needs one")
    bank = None
    backbone_spec = args.backbone
    from ...backbones import load_backbone

    if "v" in experts:
        if not args.bank:
            raise XmodalError("the V-expert needs a retrieval bank: pass --bank DIR (build one with "
                              "`xmodal xadapter bank`), or train the T-expert only with --experts t")
        if backbone_spec is None:
            meta_path = Path(args.bank) / "bank.json"
            backbone_spec = json.loads(meta_path.read_text()).get("backbone") if meta_path.is_file() else None
    backbone_spec = backbone_spec or DEFAULT_BACKBONE
    backbone = load_backbone(backbone_spec, device=str(device))
    if "v" in experts:
        bank = load_bank(args.bank, backbone)
    cfg = XAdapterConfig.for_backbone(
        backbone, experts=experts, layers=args.layers, heads=args.heads, attn_dim=args.attn_dim,
        proj_dim=args.proj_dim, bottleneck=args.bottleneck, feature_source=args.feature_source, k=args.k,
        mask_ratio=args.mask_ratio, dropout=args.dropout)
    stack = add_xadapter(model, cfg)
    if new_head:
        mark_new_head(model, new_head)
    counts = count_parameters(model)
    head_note = (f"{args.plm} ships without an MLM head: a fresh one ({counts['new_head']:,} params, decoder tied to "
                 "the frozen word embeddings) is created and trained with the adapters") if new_head else None
    if head_note:
        log(head_note)
    log(f"trainable params: {counts['trainable']:,} = {counts['trainable_pct_of_plm']:.2f}% of the PLM's "
        f"{counts['plm']:,} (adapters {counts['adapter']:,} = {counts['adapter_pct_of_plm']:.2f}%)")
    log(f"backbone {backbone.name}; experts {','.join(experts)} after layers {stack.config.layers}; "
        f"features {cfg.feature_source}, k={cfg.k}")

    texts = read_corpus(args.corpus, args.max_texts)
    params = adapter_parameters(model)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * args.steps), args.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    base = unwrap(model)
    builder = ContextBuilder(get_xadapter(base).config, backbone, bank, device=device, visual=args.visual)
    focus_ids = None
    if args.focus_words:
        words = [w.strip() for w in args.focus_words.split(",") if w.strip()]
        ids_ = [tokenizer.encode(" " + w, add_special_tokens=False) for w in words]
        bad = [w for w, i in zip(words, ids_) if len(i) != 1]
        if bad:
            raise XmodalError(f"--focus-words must be single tokens of the PLM vocabulary; not so for {bad}")
        focus_ids = torch.tensor([i[0] for i in ids_])

    start_step = 0
    if checkpoint is not None:
        get_xadapter(base).load_state_dict(checkpoint["adapter"])
        named = dict(base.named_parameters())
        with torch.no_grad():
            for name, value in checkpoint["head"].items():
                named[name].copy_(value.to(named[name].device))
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        _set_rng_state(checkpoint["rng"])
        start_step = int(checkpoint["step"])
        log(f"resumed from step {start_step} of {args.steps}")

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    if accelerator.is_main_process:
        kept = []
        if log_path.is_file() and checkpoint is not None:
            kept = [l for l in log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start_step]
        log_path.write_text("".join(l + "\n" for l in kept))

    def save_checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        stack_now = get_xadapter(base)
        named = dict(base.named_parameters())
        state = {
            "step": step, "args": args.fingerprint(), "config": stack_now.config.to_dict(),
            "adapter": {k: v.detach().cpu() for k, v in stack_now.state_dict().items()},
            "head": {n: named[n].detach().cpu() for n in stack_now.head_param_names},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        _atomic_write_bytes(ckpt_path, buf.getvalue())

    perm = _EpochPerm(len(texts), args.seed)
    end_step = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    model.train()
    losses: list[float] = []
    bar = None
    if args.progress and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=start_step, desc="xadapter mlm", dynamic_ncols=True)
    t0 = time.time()
    step = start_step
    with open(log_path, "a") as log_fh:
        for step in range(start_step, end_step):
            torch.manual_seed(args.seed * 1_000_003 + step * 7919 + accelerator.process_index)
            rows = perm.rows(step, args.batch_size, accelerator.process_index, accelerator.num_processes)
            enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=args.max_length,
                            return_tensors="pt")
            gen = torch.Generator().manual_seed(args.seed * 7_368_787 + step * 104_729 + accelerator.process_index)
            if focus_ids is None:
                ids, labels, _ = mask_tokens(enc["input_ids"], enc["attention_mask"], tokenizer, args.mask_ratio, gen)
            else:
                ids, labels, _ = mask_tokens(enc["input_ids"], enc["attention_mask"], tokenizer, args.mask_ratio, gen,
                                             focus_ids=focus_ids)
            queries = visible_texts(ids, enc["attention_mask"], tokenizer)
            ctx = builder.build(queries, experts)
            batch = {k: v.to(device) for k, v in enc.items()}
            batch["input_ids"], batch["labels"] = ids.to(device), labels.to(device)
            with get_xadapter(base).context(ctx):
                loss = model(**batch).loss
            accelerator.backward(loss)
            if args.grad_clip:
                accelerator.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(accelerator.gather(loss.detach()[None]).mean())
            losses.append(value)
            if accelerator.is_main_process:
                log_fh.write(json.dumps({"step": step + 1, "loss": round(value, 6),
                                         "lr": scheduler.get_last_lr()[0]}) + "\n")
                log_fh.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < end_step:
                save_checkpoint(step + 1)
        step = end_step
    if bar is not None:
        bar.close()
    save_checkpoint(step)
    finished = step >= args.steps
    summary = {
        "out": str(out), "plm": args.plm, "plm_path": str(plm_path), "backbone": backbone_spec,
        "stand_in_backbone": bool(getattr(backbone, "is_stand_in", False)), "bank": args.bank,
        "experts": list(experts), "layers": get_xadapter(base).config.layers, "feature_source": cfg.feature_source,
        "k": cfg.k, "visual": args.visual, "focus_words": args.focus_words, "steps_done": step, "steps": args.steps, "finished": finished, "resumed_from": start_step,
        "params": counts, "new_mlm_head": bool(new_head), "new_head_note": head_note,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "seconds": round(time.time() - t0, 2), "log": str(log_path), "checkpoint": str(ckpt_path),
    }
    if accelerator.is_main_process:
        if finished:
            save_xadapter(base, out / ADAPTER_SUBDIR, extra={"training": {k: summary[k] for k in (
                "plm", "backbone", "bank", "steps", "feature_source", "k")}})
            summary["xadapter"] = str(out / ADAPTER_SUBDIR)
        _atomic_write_bytes(out / SUMMARY_NAME, json.dumps(summary, indent=2).encode())
    accelerator.wait_for_everyone()
    return summary


__all__ = ["TrainArgs", "train_mlm", "read_corpus"]
