"""CoOp: learned prompt context (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022).
Written from the paper.

    prompt_c = [start] v_1 … v_M [class c tokens] "." [end]        (class token at the end)
    t_c      = TextEncoder(prompt_c),   logits = logit_scale · f·t_c / ‖t_c‖

Only the M context vectors are trained (unified: shared by all classes; ``class_specific=True``: one set
per class); the text tower is frozen but back-propagated through; the image tower is frozen, so the
harness's cached image features (and augmented views) are the training inputs. Published schedule
(``preset="paper"``): 16 vectors, N(0, 0.02²) init, SGD lr 0.002, momentum 0.9, weight decay 5e-4,
batch 32, one warm-up epoch at 1e-5, cosine; 200 epochs at 8–16 shots, 100 at 2–4, 50 at 1.
``preset="cpu"`` keeps all of it but caps the epochs (see ``PRESETS``). The epoch (0 = the initial
context) with the best validation accuracy (ties: lower log-loss) is kept.

After fitting the class embeddings are fixed, so scoring needs no backbone: the fitted state is the context
tensor and the (C, D) text classifier it produces.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..featureset import FeatureSet
from ._common import batches, check_features, check_fit_inputs, cpu_generator, epoch_features, require_fitted
from ._distributed import shard, sum_gradients
from ._prompts import PromptTemplate, better, init_context, report_epoch, resolve_preset, sgd_warmup_cosine
from .base import FewShotMethod, register
from .towers import TextTower, freeze, text_tower

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": "by-shots", "batch_size": 32, "lr": 0.002},
    "cpu": {"epochs": 30, "batch_size": 32, "lr": 0.002},
}


def published_epochs(shots: int) -> int:
    """CoOp's epochs by shot count: 50 (1 shot), 100 (2–4), 200 (8 or more)."""
    return 50 if shots <= 1 else (100 if shots <= 4 else 200)


@register("coop")
class CoOp(FewShotMethod):
    """CoOp (module docstring). ``epochs``, ``batch_size``, ``lr``: None = the preset's value."""

    training_free = False
    needs_backbone = True

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *, preset: str = "cpu",
                 n_ctx: int = 16, ctx_init: str | None = None, class_specific: bool = False,
                 epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 momentum: float = 0.9, weight_decay: float = 5e-4, warmup_epochs: int = 1,
                 warmup_lr: float = 1e-5) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.preset, self.n_ctx, self.ctx_init, self.class_specific = preset, n_ctx, ctx_init, class_specific
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.warmup_epochs, self.warmup_lr = warmup_epochs, warmup_lr

    # ------------------------------------------------------------------------------------------ pieces

    def _tower(self) -> TextTower:
        backbone = getattr(self, "_backbone", None)
        if backbone is None:
            raise RuntimeError(f"{type(self).__name__} trains in the text tower: call bind_backbone(backbone) first")
        freeze(backbone)
        return text_tower(backbone)

    def _schedule(self, support: FeatureSet) -> dict[str, Any]:
        sched = resolve_preset(PRESETS, self.preset,
                               {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr})
        if sched["epochs"] == "by-shots":
            shots = int(torch.bincount(support.labels).max())
            sched["epochs"] = published_epochs(shots)
        return sched

    def _class_text(self, tower: TextTower, template: PromptTemplate, ctx: torch.Tensor) -> torch.Tensor:
        return tower.encode(template.splice(ctx.to(template.embeds)), template.ids, template.mask)

    # ------------------------------------------------------------------------------------------ fit

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "CoOp":
        check_fit_inputs(support, val, text_classifier)
        tower = self._tower()
        sched = self._schedule(support)
        epochs, bs = int(sched["epochs"]), int(sched["batch_size"])
        c = text_classifier.shape[0]
        template = PromptTemplate.build(tower, list(support.classnames), self.n_ctx)
        gen = cpu_generator(self.seed)
        lead = (c,) if self.class_specific else ()
        ctx = init_context(tower, self.n_ctx, self.ctx_init, lead, gen).to(template.embeds.device)
        ctx.requires_grad_(True)
        steps = -(-len(support) // bs)
        opt, set_epoch = sgd_warmup_cosine([ctx], float(sched["lr"]), self.momentum, self.weight_decay,
                                           self.warmup_lr, self.warmup_epochs, epochs, steps)
        y = support.labels.long()
        fv, yv = val.features.float(), val.labels.long()
        dev = template.embeds.device

        def score() -> tuple[tuple[float, float], torch.Tensor]:
            with torch.no_grad():
                text = self._class_text(tower, template, ctx)
                logits = self.logit_scale * fv.to(dev) @ text.T
                yd = yv.to(dev)
                return (float((logits.argmax(-1) == yd).float().mean()), float(F.cross_entropy(logits, yd))), text

        best, text = score()
        best_epoch, best_ctx, best_text = 0, ctx.detach().clone(), text
        loss_value = float("nan")
        for epoch in range(1, epochs + 1):
            lr_now = set_epoch(epoch - 1)
            x_all = epoch_features(support, epoch - 1).to(dev)
            total, n = 0.0, 0
            for idx in batches(len(support), bs, gen):
                part = shard(idx)  # data parallel: this process's slice, gradients summed below
                text = self._class_text(tower, template, ctx)
                logits = self.logit_scale * x_all[part] @ text.T
                loss = F.cross_entropy(logits, y[part].to(dev), reduction="sum") / len(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sum_gradients([ctx])
                opt.step()
                total, n = total + float(loss.detach()) * len(idx), n + len(part)
            loss_value = total / max(n, 1)
            cur, text = score()
            report_epoch(self.name, epoch, epochs, loss_value, cur[0], lr_now)
            if self.on_epoch is not None:
                self.on_epoch(epoch, epochs)
            if better(cur, best):
                best, best_epoch, best_ctx, best_text = cur, epoch, ctx.detach().clone(), text
        self.ctx_, self.text_ = best_ctx.to(self.device), best_text.float().to(self.device)
        self.selected_ = {"epoch": int(best_epoch), "val_acc": float(best[0]), "val_loss": float(best[1]),
                          "epochs": epochs, "batch_size": bs, "lr": float(sched["lr"]), "preset": self.preset,
                          "n_ctx": int(self.n_ctx), "ctx_init": self.ctx_init or "random",
                          "context": "class-specific" if self.class_specific else "unified",
                          "class_token": "end", "last_train_loss": loss_value,
                          "cached": "image features (and augmented views); the text tower runs every step",
                          "selection": "val accuracy, then log-loss"}
        return self

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        require_fitted(self, "text_")
        check_features(features, self.text_.shape[1])
        with torch.no_grad():
            return (self.logit_scale * features.float().to(self.device) @ self.text_.T).to(features.device)
