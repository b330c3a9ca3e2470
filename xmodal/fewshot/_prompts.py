"""Shared parts of the prompt-learning methods (CoOp, CoCoOp): prompt templates with learnable context
slots, the published optimiser schedule (SGD, constant warm-up, cosine), schedule presets, epoch progress.

What is cached: the image tower is frozen in prompt learning, so the harness's cached image features (and
their augmented views, used as the random-crop/flip augmentation of the published recipe) are all these
methods see of the images; only the text tower runs, with gradients, on every step.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from .towers import TextTower

log = logging.getLogger("xmodal.fewshot")

PLACEHOLDER = "X"


@dataclass
class PromptTemplate:
    """Tokenized ``"X X … X <classname>."`` for every class: the X slots are replaced by learned vectors.

    ids, mask  (C, T) token ids and real-token mask of the template
    embeds     (C, T, W) frozen token embeddings of the template
    start      index of the first context slot (after any start token)
    n_ctx      number of context slots
    """

    ids: torch.Tensor
    mask: torch.Tensor
    embeds: torch.Tensor
    start: int
    n_ctx: int

    @classmethod
    def build(cls, tower: TextTower, classnames: list[str], n_ctx: int) -> "PromptTemplate":
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be ≥ 1, got {n_ctx}")
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        texts = [f"{prefix} {name.replace('_', ' ')}." for name in classnames]
        ids, mask = tower.tokenize(texts)
        start = tower.prefix_len
        probe, _ = tower.tokenize([prefix])
        slot = probe[0, start]
        if not bool((ids[:, start:start + n_ctx] == slot).all()):
            raise ValueError(f"the {type(tower).__name__} tokenizer does not give one token per context slot")
        return cls(ids=ids, mask=mask, embeds=tower.embed(ids), start=start, n_ctx=n_ctx)

    def splice(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx (n_ctx, W), (C, n_ctx, W) or (B, C, n_ctx, W) -> prompt embeddings (…, C, T, W)."""
        base = self.embeds
        if ctx.ndim == 2:
            ctx = ctx.expand(base.shape[0], -1, -1)
        if ctx.ndim == 4:
            base = base.expand(ctx.shape[0], -1, -1, -1)
        return torch.cat([base[..., :self.start, :], ctx, base[..., self.start + self.n_ctx:, :]], dim=-2)


def init_context(tower: TextTower, n_ctx: int, init: str | None, shape_lead: tuple[int, ...],
                 generator: torch.Generator) -> torch.Tensor:
    """Context vectors: the token embeddings of ``init`` (e.g. "a photo of a"; its word count must equal
    n_ctx) or N(0, 0.02²) random vectors as published."""
    width = tower.width
    if init:
        ids, _ = tower.tokenize([init])
        vecs = tower.embed(ids)[0, tower.prefix_len:tower.prefix_len + n_ctx]
        words = len(init.split())
        if words != n_ctx:
            raise ValueError(f"ctx_init {init!r} has {words} words but n_ctx is {n_ctx}")
        return vecs.expand(*shape_lead, n_ctx, width).clone().cpu()
    return torch.randn(*shape_lead, n_ctx, width, generator=generator) * 0.02


def sgd_warmup_cosine(params, lr: float, momentum: float, weight_decay: float, warmup_lr: float, warmup_epochs: int,
                      epochs: int, steps_per_epoch: int):
    """The published schedule: SGD; ``warmup_epochs`` at the constant ``warmup_lr``; then cosine from ``lr`` to 0
    over the remaining epochs (per epoch, as the published trainer steps it)."""
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def lr_at(epoch: int) -> float:  # epoch counted from 0
        if epoch < warmup_epochs:
            return warmup_lr
        span = max(1, epochs - warmup_epochs)
        return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / span))

    def set_epoch(epoch: int) -> float:
        value = lr_at(epoch)
        for group in opt.param_groups:
            group["lr"] = value
        return value

    return opt, set_epoch


def resolve_preset(presets: dict[str, dict[str, Any]], preset: str, given: dict[str, Any]) -> dict[str, Any]:
    """The preset's schedule with every explicitly given (non-None) value on top."""
    if preset not in presets:
        raise ValueError(f"preset must be one of {', '.join(map(repr, presets))}, got {preset!r}")
    return {**presets[preset], **{k: v for k, v in given.items() if v is not None}}


def report_epoch(method: str, epoch: int, epochs: int, loss: float, val_acc: float, lr: float) -> None:
    """Progress per epoch (logger ``xmodal.fewshot``, INFO)."""
    log.info("%s epoch %d/%d loss %.4f val_acc %.4f lr %.2e", method, epoch, epochs, loss, val_acc, lr)


def better(cur: tuple[float, float], best: tuple[float, float]) -> bool:
    """Validation accuracy, then lower log-loss (the earlier epoch wins exact ties)."""
    return cur[0] > best[0] or (cur[0] == best[0] and cur[1] < best[1])
