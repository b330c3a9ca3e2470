"""CLIP-LoRA: low-rank adapters inside both towers (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of
Vision-Language Models", CVPR-W 2024). Written from the paper; the adapters are built with ``peft``.

    W' = W + (α/r)·B·A        on q, k, v of every attention layer of both encoders (r = 2, α = 1,
                              dropout 0.25 on the adapter input; B starts at zero, so fitting starts at CLIP)
    logits = logit_scale · f'·t'_c     f' = image tower with adapters, t'_c = text tower with adapters on
                                       "a photo of a {class}."

Where the adapters go per backbone kind, and what is cached below them, is in ``_lora_towers.py`` (and
docs/fewshot.md). Published schedule (``preset="paper"``): AdamW lr 2e-4, weight decay 1e-2, betas
(0.9, 0.999), batch 32, 500 × shots iterations, cosine; a fresh random crop/flip per iteration.
``preset="cpu"``: 150 iterations over ``views`` = 2 cached random crop/flip views per support image. The
model is scored on validation after every pass over the support set (and at the start, where it *is*
the zero-shot model) and the best pass (accuracy, then log-loss) is kept.

Scoring needs the images (``image_scores``): the image tower changed, so cached features no longer
apply. The fitted state is the adapter weights only (PEFT's state dict) and the (C, D) class embeddings;
the backbone's weights are never copied into it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..featureset import FeatureSet
from ._common import adamw, batches, check_fit_inputs, cpu_generator, require_fitted, seeded
from ._distributed import shard, sum_gradients
from ._lora_towers import LoraTowers, lora_towers
from ._prompts import better, report_epoch, resolve_preset
from .base import FewShotMethod, register

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"iterations": "500-x-shots", "batch_size": 32, "lr": 2e-4, "views": 0},
    "cpu": {"iterations": 150, "batch_size": 32, "lr": 2e-4, "views": 2},
}
PROMPT = "a photo of a {}."


@register("clip-lora")
class ClipLoRA(FewShotMethod):
    """CLIP-LoRA (module docstring). ``encoders``: "both" (default), "image" or "text". ``views`` = 0 draws
    a fresh augmentation for every iteration (nothing cached above the pixels: the published recipe)."""

    training_free = False
    needs_backbone = True
    needs_images = True

    def __init__(self, seed: int = 0, device: str = "cpu", logit_scale: float = 100.0, *, preset: str = "cpu",
                 rank: int = 2, alpha: float = 1.0, dropout: float = 0.25, encoders: str = "both",
                 iterations: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 views: int | None = None, weight_decay: float = 1e-2, eval_batch: int = 64) -> None:
        super().__init__(seed=seed, device=device, logit_scale=logit_scale)
        self.preset, self.rank, self.alpha, self.dropout, self.encoders = preset, rank, alpha, dropout, encoders
        self.iterations, self.batch_size, self.lr, self.views = iterations, batch_size, lr, views
        self.weight_decay, self.eval_batch = weight_decay, eval_batch

    # ------------------------------------------------------------------------------------------ towers

    def _build(self, state: dict[str, torch.Tensor] | None = None) -> LoraTowers:
        """A private adapted copy of the bound backbone's towers (adapters fresh, or loaded from ``state``)."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        backbone = getattr(self, "_backbone", None)
        if backbone is None:
            raise RuntimeError("clip-lora trains inside the towers: call bind_backbone(backbone, pixels) first")
        if self.encoders not in ("both", "image", "text"):
            raise ValueError(f"encoders must be 'both', 'image' or 'text', got {self.encoders!r}")
        towers = lora_towers(backbone)
        roots: dict[str, tuple[torch.nn.Module, list[str]]] = {}
        if self.encoders in ("both", "image"):
            roots["image"] = (towers.image_root(), towers.image_targets)
        if self.encoders in ("both", "text"):
            root = towers.text_root()
            if "image" in roots and roots["image"][0] is root:
                roots["image"] = (root, roots["image"][1] + towers.text_targets)
            else:
                roots["text"] = (root, towers.text_targets)
        for module in (towers.image_root(), towers.text_root()):
            module.requires_grad_(False).eval()
        with seeded(self.seed):  # PEFT draws the A matrices from the global RNG
            for key, (root, targets) in roots.items():
                cfg = LoraConfig(r=int(self.rank), lora_alpha=float(self.alpha), lora_dropout=float(self.dropout),
                                 target_modules=list(targets))
                inject_adapter_in_model(cfg, root)
                if state is not None:
                    part = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == key}
                    set_peft_model_state_dict(root, part)
        towers.roots = roots
        return towers

    @staticmethod
    def _adapter_state(towers: LoraTowers) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {f"{key}.{k}": v.detach().cpu().clone() for key, (root, _) in towers.roots.items()
                for k, v in get_peft_model_state_dict(root).items()}

    @staticmethod
    def _train_mode(towers: LoraTowers, on: bool) -> None:
        """Only the adapters' dropout switches; the frozen towers stay in eval mode (batch-norm statistics)."""
        for root, _ in towers.roots.values():
            for name, module in root.named_modules():
                if name.endswith("lora_dropout") or ".lora_dropout." in name:
                    module.train(on)

    def _text(self, towers: LoraTowers, classnames: list[str]) -> torch.Tensor:
        tower = towers.text()
        ids, mask = tower.tokenize([PROMPT.format(c.replace("_", " ")) for c in classnames])
        return tower.encode(tower.embedding()(ids).float(), ids, mask)

    def _schedule(self, support: FeatureSet) -> dict[str, Any]:
        sched = resolve_preset(PRESETS, self.preset, {"iterations": self.iterations, "batch_size": self.batch_size,
                                                      "lr": self.lr, "views": self.views})
        if sched["iterations"] == "500-x-shots":
            sched["iterations"] = 500 * int(torch.bincount(support.labels).max())
        return sched

    def _features(self, towers: LoraTowers, act: torch.Tensor, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return torch.cat([towers.upper(act[i:i + self.eval_batch]) for i in range(0, len(act), self.eval_batch)])

    def _lower(self, towers: LoraTowers, pixels: torch.Tensor) -> torch.Tensor:
        dev = getattr(self._backbone, "device", "cpu")
        with torch.no_grad():
            return torch.cat([towers.lower(pixels[i:i + self.eval_batch].to(dev))
                              for i in range(0, len(pixels), self.eval_batch)])

    # ------------------------------------------------------------------------------------------ fit

    def fit(self, support: FeatureSet, val: FeatureSet, text_classifier: torch.Tensor) -> "ClipLoRA":
        check_fit_inputs(support, val, text_classifier)
        pixels = getattr(self, "_pixels", None)
        if pixels is None:
            raise UsageError("clip-lora trains on the episode's images but no image source was given",
                             hint="run it through xmodal fewshot/bench/fit or FewShotClassifier, or call "
                                  "bind_backbone(backbone, pixels=PixelSource(dataset, backbone))")
        sched = self._schedule(support)
        iters, bs, n_views = int(sched["iterations"]), int(sched["batch_size"]), int(sched["views"])
        towers = self._build()
        classnames = list(support.classnames)
        gen = cpu_generator(self.seed)
        # what is cached: the frozen computation below the first adapted layer, per view
        val_act = self._lower(towers, pixels(list(val.ids), view=None))
        cached = [self._lower(towers, pixels(list(support.ids), view=v)) for v in range(n_views)]
        y, yv = support.labels.long(), val.labels.long()
        params = [p for root, _ in towers.roots.values() for n, p in root.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        opt = adamw(params, lr=float(sched["lr"]), weight_decay=self.weight_decay)
        sched_lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, iters))

        def score() -> tuple[tuple[float, float], torch.Tensor]:
            self._train_mode(towers, False)
            with torch.no_grad():
                text = self._text(towers, classnames)
                logits = self.logit_scale * self._features(towers, val_act, False) @ text.T
                yd = yv.to(logits.device)
                result = (float((logits.argmax(-1) == yd).float().mean()), float(F.cross_entropy(logits, yd)))
            self._train_mode(towers, True)
            return result, text

        best, text = score()
        best_state, best_text, best_step, best_epoch = self._adapter_state(towers), text, 0, 0
        step, epoch, epochs = 0, 0, -(-iters // max(1, -(-len(support) // bs)))
        loss_value = float("nan")
        with seeded(self.seed):  # adapter dropout draws from the global RNG
            while step < iters:
                epoch += 1
                act_all = cached[(epoch - 1) % n_views] if n_views else None
                total, n = 0.0, 0
                for idx in batches(len(support), bs, gen):
                    if step >= iters:
                        break
                    part = shard(idx)  # data parallel: this process's slice, gradients summed below
                    if act_all is None:  # published recipe: a fresh augmentation every iteration
                        act = self._lower(towers, pixels([support.ids[i] for i in part.tolist()], view=step + 1))
                    else:
                        act = act_all[part]
                    feats = towers.upper(act)
                    text = self._text(towers, classnames)
                    logits = self.logit_scale * feats @ text.T
                    loss = F.cross_entropy(logits, y[part].to(logits.device), reduction="sum") / len(idx)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    sum_gradients(params)
                    opt.step()
                    sched_lr.step()
                    step += 1
                    total, n = total + float(loss.detach()) * len(idx), n + len(part)
                loss_value = total / max(n, 1)
                cur, text = score()
                report_epoch(self.name, epoch, epochs, loss_value, cur[0], opt.param_groups[0]["lr"])
                if self.on_epoch is not None:
                    self.on_epoch(epoch, epochs)
                if better(cur, best):
                    best, best_step, best_state, best_text = cur, step, self._adapter_state(towers), text
                    best_epoch = epoch
        self.lora_ = best_state
        self.text_ = best_text.detach().float().to(self.device)
        self._towers = None  # rebuilt from lora_ on first use (the best pass, not the last)
        self.selected_ = {"epoch": int(best_epoch), "iteration": int(best_step), "val_acc": float(best[0]),
                          "val_loss": float(best[1]), "iterations": iters, "batch_size": bs, "lr": float(sched["lr"]),
                          "views": n_views, "preset": self.preset, "lora_rank": int(self.rank),
                          "lora_alpha": float(self.alpha), "lora_dropout": float(self.dropout), "encoders": self.encoders, "kind": towers.kind,
                          "image_targets": len(towers.image_targets) if self.encoders in ("both", "image") else 0,
                          "text_targets": len(towers.text_targets) if self.encoders in ("both", "text") else 0,
                          "adapter_params": int(sum(v.numel() for v in best_state.values())),
                          "cached": towers.cached_below, "last_train_loss": loss_value,
                          "selection": "val accuracy, then log-loss (per pass over the support set)"}
        return self

    # ------------------------------------------------------------------------------------------ scoring

    def bind_backbone(self, backbone: Any, pixels: Any = None) -> "ClipLoRA":
        self._towers = None  # the adapted copy belongs to the backbone it was built from
        return super().bind_backbone(backbone, pixels)

    def image_scores(self, pixels: torch.Tensor) -> torch.Tensor:
        require_fitted(self, "lora_")
        towers = getattr(self, "_towers", None)
        if towers is None:
            towers = self._towers = self._build(self.lora_)
        self._train_mode(towers, False)
        with torch.no_grad():
            feats = self._features(towers, self._lower(towers, pixels), False)
            return (self.logit_scale * feats @ self.text_.to(feats.device).T).to(pixels.device)

    def decision_scores(self, features: torch.Tensor) -> torch.Tensor:
        raise UsageError("clip-lora adapts the image tower, so it scores images, not cached features",
                         hint="use image_scores(pixels) (FewShotClassifier and the harness do)")
