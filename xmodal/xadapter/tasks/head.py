"""The text-only base: an MLM head trained alone on text, before any X-adapter exists.

Some PLMs ship without an MLM head (the packaged MiniLM-L6 is a bare ``BertModel``). Training a fresh
head *together with* the adapters lets every arm of an experiment learn its own head, and a young head
collapses to the corpus's most frequent answer before the adapters can matter. So a first stage trains
the head alone (body frozen, no experts) on a text corpus until its loss flattens; the result is saved
once and loaded identically by every adaptation run (``--head DIR``), and probed as the text-only row.

Stopping rule: every ``window`` steps the mean loss of the last window is compared with the window
before; training stops when it improved by less than ``min_improvement`` (relative), or at ``max_steps``.
Resumable like adaptation: the checkpoint holds the head, optimizer, step and loss history, and the
batch and masking of step s are pure functions of (seed, s).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Callable

import torch

from ...errors import CacheMismatchError, InputError, XmodalError
from ...progress import Progress
from ..model.masking import mask_tokens
from ..model.modules import _atomic_write_bytes, plm_fingerprint
from ..model.plm import load_mlm, masked_lm_logits
from .common import EpochPerm, corpus_digest, load_checkpoint_file
from .corpus import read_corpus_rows

HEAD_WEIGHTS = "head.safetensors"
HEAD_META = "head.json"
HEAD_CHECKPOINT = "head_checkpoint.pt"
# what fixes the trajectory of steps (the stopping rule -- max_steps, window, min_improvement -- may change
# on resume: the steps taken are the same, only where they stop differs)
_RESUME_KEYS = ("plm", "batch_size", "lr", "mask_ratio", "max_length", "seed", "max_texts")


@dataclass
class HeadArgs:
    plm: str = "minilm"
    corpus: list[str] = field(default_factory=list)
    out: str = "xadapter-head"
    max_steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    mask_ratio: float = 0.15
    max_length: int = 48
    seed: int = 0
    window: int = 100
    min_improvement: float = 0.01
    max_texts: int | None = None
    save_every: int = 200
    resume: bool = False
    progress: bool = True
    stop_after: int | None = None     # stop after N steps in this invocation (checkpoint kept; continue with resume)


def _fingerprint(args: HeadArgs) -> dict:
    d = {k: getattr(args, k) for k in _RESUME_KEYS}
    d["corpus_sha256"] = corpus_digest(args.corpus)
    return d


def plateaued(losses: list[float], window: int, min_improvement: float) -> bool:
    """True when the last ``window`` losses' mean improved on the window before by less than ``min_improvement``."""
    if window < 1 or len(losses) < 2 * window or len(losses) % window:
        return False
    last = sum(losses[-window:]) / window
    prev = sum(losses[-2 * window: -window]) / window
    return (prev - last) < min_improvement * abs(prev)


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def train_head(args: HeadArgs, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) the text-only MLM head; writes ``head.safetensors`` + ``head.json`` to ``args.out``."""
    from safetensors.torch import save

    out = Path(args.out)
    if (out / HEAD_META).is_file() and not args.resume:
        raise XmodalError(f"{out} already holds a trained text-only head", hint="reuse it with --head "
                          f"{out}, pass --resume to continue an unfinished one, or choose another --out")
    torch.manual_seed(args.seed)
    model, tokenizer, new_head, plm_path = load_mlm(args.plm)
    if tokenizer.mask_token_id is None:
        raise XmodalError(f"the tokenizer of {args.plm} has no mask token; MLM needs one")
    for p in model.parameters():
        p.requires_grad_(False)
    named = dict(model.named_parameters())
    for n in new_head:
        named[n].requires_grad_(True)
    params = [named[n] for n in new_head]
    texts = read_corpus_rows(args.corpus, args.max_texts).texts
    losses: list[float] = []
    step, reason = 0, None
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0) if params else None
    ckpt_path = out / HEAD_CHECKPOINT
    if ckpt_path.is_file():
        if not args.resume:
            raise XmodalError(f"{out} holds an unfinished head run", hint="pass --resume to continue it, "
                              "or choose another --out")
        ckpt = load_checkpoint_file(ckpt_path, {"step", "args", "head", "optimizer", "losses"})
        if ckpt["args"] != _fingerprint(args):
            raise XmodalError("cannot resume the head run: its settings or corpus changed",
                              hint=f"rerun with the original settings, or choose another --out than {out}")
        with torch.no_grad():
            for n, v in ckpt["head"].items():
                named[n].copy_(v)
        optimizer.load_state_dict(ckpt["optimizer"])
        step, losses = int(ckpt["step"]), [float(x) for x in ckpt["losses"]]
        log(f"resumed the head run at step {step}")
    if not new_head:
        reason = "the PLM ships with a pretrained MLM head: nothing to train (the text-only base is the PLM itself)"
        log(reason)
    model.train()
    model.base_model.eval()   # no dropout in the frozen body: the head sees the features it will see later
    perm = EpochPerm(len(texts), args.seed)
    bar = Progress(args.max_steps, "text-only head", enabled=args.progress and bool(new_head), initial=step)
    t0 = time.time()

    def checkpoint(s: int) -> None:
        state = {"step": s, "args": _fingerprint(args), "losses": torch.tensor(losses),
                 "head": {n: named[n].detach().clone() for n in new_head}, "optimizer": optimizer.state_dict()}
        buf = io.BytesIO()
        torch.save(state, buf)
        _atomic_write_bytes(ckpt_path, buf.getvalue())

    end = args.max_steps if args.stop_after is None else min(args.max_steps, step + args.stop_after)
    while new_head and step < end and reason is None:
        rows = perm.rows(step, args.batch_size)
        enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=args.max_length,
                        return_tensors="pt")
        gen = torch.Generator().manual_seed(args.seed * 7_368_787 + step * 104_729)
        ids, labels, _ = mask_tokens(enc["input_ids"], enc["attention_mask"], tokenizer, args.mask_ratio, gen)
        torch.manual_seed(args.seed * 1_000_003 + step)
        batch = {**enc, "input_ids": ids}
        logits = masked_lm_logits(model, batch, labels)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[labels != -100])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1, note=f"loss {losses[-1]:.3f}")
        if not args.progress and step % args.window == 0:
            log(f"text-only head: step {step}, mean loss of the last {args.window} steps "
                f"{sum(losses[-args.window:]) / args.window:.4f}")
        if plateaued(losses, args.window, args.min_improvement):
            reason = (f"loss flattened: mean of steps {step - args.window + 1}-{step} improved on the previous "
                      f"{args.window} steps by less than {100 * args.min_improvement:g} %")
        elif args.save_every and step % args.save_every == 0:
            checkpoint(step)
    bar.close()
    if reason is None and step < args.max_steps:
        checkpoint(step)
        log(f"text-only head: stopped at step {step} of at most {args.max_steps}; continue with --resume")
        return {"out": str(out), "steps": step, "finished": False, "stopped": None}
    if reason is None:
        reason = f"reached --max-steps {args.max_steps} before the loss flattened"
    tensors = {n: named[n].detach().cpu().contiguous() for n in new_head}
    w = args.window
    curve = [round(sum(losses[i: i + w]) / len(losses[i: i + w]), 4) for i in range(0, len(losses), w)]
    meta = {"plm": args.plm, "plm_path": str(plm_path), "plm_fingerprint": plm_fingerprint(model),
            "head_params": sorted(new_head), "tensor_sha256": _tensor_digest(tensors), "steps": step,
            "stopped": reason, "loss_per_window": curve, "window": w, "settings": asdict(args),
            "corpus_sha256": _fingerprint(args)["corpus_sha256"], "seconds": round(time.time() - t0, 1)}
    _atomic_write_bytes(out / HEAD_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    _atomic_write_bytes(out / HEAD_META, json.dumps(meta, indent=2).encode())
    if ckpt_path.is_file():
        ckpt_path.unlink()
    log(f"text-only head: {step} steps, {reason}; saved to {out}")
    return {**meta, "out": str(out), "finished": True}


def load_head(model, directory: str | Path) -> list[str]:
    """Copy a saved text-only head into ``model`` (verified: same PLM weights, intact tensors) -> its parameter names."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / HEAD_META
    if not meta_path.is_file():
        raise InputError(f"{directory} is not a text-only head folder (no {HEAD_META})",
                         hint="build one with `xmodal xadapter head --corpus FILE --out DIR`")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(directory / HEAD_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the text-only head in {directory} ({exc})",
                         hint=f"rebuild it with `xmodal xadapter head --out {directory}`") from None
    if _tensor_digest(tensors) != meta.get("tensor_sha256"):
        raise CacheMismatchError(f"the head weights in {directory} do not match the digest in {HEAD_META} "
                                 "(modified or truncated)", hint=f"rebuild it with `xmodal xadapter head --out {directory}`")
    if meta.get("plm_fingerprint") != plm_fingerprint(model):
        raise CacheMismatchError(f"the text-only head in {directory} was trained on another PLM "
                                 f"({meta.get('plm')}, fingerprint {meta.get('plm_fingerprint')})",
                                 hint="use the same --plm as the head, or build a head for this PLM")
    named = dict(model.named_parameters())
    missing = [n for n in tensors if n not in named]
    if missing:
        raise CacheMismatchError(f"the head in {directory} has parameters this model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, v in tensors.items():
            named[n].copy_(v.to(named[n].device, named[n].dtype))
    return sorted(tensors)


__all__ = ["HeadArgs", "train_head", "load_head", "plateaued"]
