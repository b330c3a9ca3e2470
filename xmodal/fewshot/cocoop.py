"""CoCoOp: image-conditioned prompt context (Zhou et al., "Conditional Prompt Learning for Vision-Language
Models", CVPR 2022). Written from the paper.

    π(f)        = MetaNet(f)  = Linear(D, D/16) → ReLU → Linear(D/16, W)     (f: the image feature)
    prompt_c(f) = [start] (v_1 + π(f)) … (v_M + π(f)) [class c tokens] "." [end]
    logits_c(f) = logit_scale · f·TextEncoder(prompt_c(f))

The context vectors and the meta-net are trained; both towers are frozen (the text tower is
back-propagated through). Every image has its own prompts, so the text tower runs once per (image, class)
pair at training *and* at prediction time: scoring needs the backbone (``bind_backbone`` after loading).
The image features come from the harness's cache (augmented views as the crop/flip augmentation).
Published schedule (``preset="paper"``): 4 vectors initialised from "a photo of a", SGD lr 0.002, momentum
0.9, weight decay 5e-4, batch 1, 10 epochs, one warm-up epoch at 1e-5, cosine. ``preset="cpu"``: batch 4
and 5 epochs. The epoch (0 = initial state) with the best validation accuracy (ties: lower log-loss) is kept.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..featureset import FeatureSet
from ._common import batches, check_features, check_fit_inputs, cpu_generator, epoch_features, require_fitted
from ._distributed import shard, sum_gradients
from ._prompts import PromptTemplate, better, init_context, report_epoch, resolve_preset, sgd_warmup_cosine
from .base import register
from .coop import CoOp

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 10, "batch_size": 1, "lr": 0.002},
    "cpu": {"epochs": 5, "batch_size": 4, "lr": 0.002},
}


def meta_net(dim: int, width: int, generator: torch.Generator) -> nn.Sequential:
    """The published meta-net: Linear(D, D/16) → ReLU → Linear(D/16, W), seeded."""
    hidden = max(1, dim // 16)
    net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, width))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            bound = 1.0 / layer.in_features ** 0.5  # nn.Linear's default range, from the method's generator
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    return net


@register("cocoop")
class CoCoOp(CoOp):
    """CoCoOp (module docstring). ``eval_batch``: images per text-tower pass at prediction time."""

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *, preset: str = "cpu",
                 n_ctx: int = 4, ctx_init: str | None = "a photo of a", epochs: int | None = None,
                 batch_size: int | None = None, lr: float | None = None, momentum: float = 0.9,
                 weight_decay: float = 5e-4, warmup_epochs: int = 1, warmup_lr: float = 1e-5,
                 eval_batch: int = 32, class_specific: bool = False) -> None:
        if class_specific:
            raise ValueError("cocoop conditions one unified context on the image; class_specific is CoOp's option")
        super().__init__(seed=seed, device=device, logit_scale=logit_scale, preset=preset, n_ctx=n_ctx,
                         ctx_init=ctx_init, class_specific=False, epochs=epochs, batch_size=batch_size, lr=lr,
                         momentum=momentum, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                         warmup_lr=warmup_lr)
        self.eval_batch = eval_batch

    def _schedule(self, support: FeatureSet) -> dict[str, Any]:
        return resolve_preset(PRESETS, self.preset, {"epochs": self.epochs, "batch_size": self.batch_size,
                                                     "lr": self.lr})

    def _logits(self, tower, template: PromptTemplate, ctx: torch.Tensor, net: nn.Module,
                f: torch.Tensor) -> torch.Tensor:
        """(B, D) features -> (B, C): one prompt set per image."""
        shifted = ctx[None] + net(f)[:, None, :]                                     # (B, M, W)
        c = template.ids.shape[0]
        prompts = template.splice(shifted[:, None].expand(-1, c, -1, -1))            # (B, C, T, W)
        b, _, t, w = prompts.shape
        ids = template.ids.repeat(b, 1)
        mask = template.mask.repeat(b, 1)
        text = tower.encode(prompts.reshape(b * c, t, w), ids, mask).reshape(b, c, -1)
        return self.logit_scale * torch.einsum("bd,bcd->bc", f, text)

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "CoCoOp":
        check_fit_inputs(support, val, text_classifier)
        tower = self._tower()
        sched = self._schedule(support)
        epochs, bs = int(sched["epochs"]), int(sched["batch_size"])
        template = PromptTemplate.build(tower, list(support.classnames), self.n_ctx)
        dev = template.embeds.device
        gen = cpu_generator(self.seed)
        ctx = init_context(tower, self.n_ctx, self.ctx_init, (), gen).to(dev).requires_grad_(True)
        net = meta_net(support.dim, tower.width, gen).to(dev)
        steps = -(-len(support) // bs)
        opt, set_epoch = sgd_warmup_cosine([ctx, *net.parameters()], float(sched["lr"]), self.momentum,
                                           self.weight_decay, self.warmup_lr, self.warmup_epochs, epochs, steps)
        y = support.labels.long().to(dev)
        fv, yv = val.features.float().to(dev), val.labels.long().to(dev)

        def score() -> tuple[float, float]:
            with torch.no_grad():
                logits = torch.cat([self._logits(tower, template, ctx, net, fv[i:i + self.eval_batch])
                                    for i in range(0, len(fv), self.eval_batch)])
                return float((logits.argmax(-1) == yv).float().mean()), float(F.cross_entropy(logits, yv))

        def snapshot() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return ctx.detach().clone(), {k: v.detach().clone() for k, v in net.state_dict().items()}

        best, best_epoch, best_state = score(), 0, snapshot()
        loss_value = float("nan")
        for epoch in range(1, epochs + 1):
            lr_now = set_epoch(epoch - 1)
            x_all = epoch_features(support, epoch - 1).to(dev)
            total, n = 0.0, 0
            for idx in batches(len(support), bs, gen):
                part = shard(idx)  # data parallel: this process's slice, gradients summed below
                loss = F.cross_entropy(self._logits(tower, template, ctx, net, x_all[part]), y[part],
                                       reduction="sum") / len(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sum_gradients([ctx, *net.parameters()])
                opt.step()
                total, n = total + float(loss.detach()) * len(idx), n + len(part)
            loss_value = total / max(n, 1)
            cur = score()
            report_epoch(self.name, epoch, epochs, loss_value, cur[0], lr_now)
            if self.on_epoch is not None:
                self.on_epoch(epoch, epochs)
            if better(cur, best):
                best, best_epoch, best_state = cur, epoch, snapshot()
        net.load_state_dict(best_state[1])
        self.ctx_ = best_state[0].to(self.device)
        self.meta_net_ = net.requires_grad_(False).to(self.device)
        self.template_ids_, self.template_mask_ = template.ids.to(self.device), template.mask.to(self.device)
        self.selected_ = {"epoch": int(best_epoch), "val_acc": float(best[0]), "val_loss": float(best[1]),
                          "epochs": epochs, "batch_size": bs, "lr": float(sched["lr"]), "preset": self.preset,
                          "n_ctx": int(self.n_ctx), "ctx_init": self.ctx_init or "random",
                          "meta_net": f"{support.dim}-{max(1, support.dim // 16)}-{tower.width}",
                          "last_train_loss": loss_value,
                          "cached": "image features (and augmented views); the text tower runs per (image, class)",
                          "selection": "val accuracy, then log-loss"}
        return self

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        require_fitted(self, "meta_net_")
        check_features(features, self.meta_net_[0].in_features)
        tower = self._tower()
        embeds = tower.embed(self.template_ids_.to(tower.device))
        template = PromptTemplate(ids=self.template_ids_.to(tower.device), mask=self.template_mask_.to(tower.device),
                                  embeds=embeds, start=tower.prefix_len, n_ctx=int(self.n_ctx))
        f = features.float().to(tower.device)
        net, ctx = self.meta_net_.to(tower.device), self.ctx_.to(tower.device)
        with torch.no_grad():
            scores = torch.cat([self._logits(tower, template, ctx, net, f[i:i + self.eval_batch])
                                for i in range(0, len(f), self.eval_batch)]) if len(f) else torch.empty(0, len(embeds))
        return scores.to(features.device)
