"""Fill-mask with a PLM, with or without its X-adapter: what does the model say, and do the images change it?

    fill = FillMask("minilm", "runs/xa/xadapter", "runs/bank")
    fill("The banana is [MASK].")            # [{"token": "yellow", "score": 0.41}, ...]
    fill("The banana is [MASK].", compare=True)  # {"experts_on": [...], "experts_off": [...]}

The retrieval query (and the T-expert's input) is the text without the mask, as in the colour probe.
"""
from __future__ import annotations

import os

import torch

from ...errors import InputError

MASK_PLACEHOLDER = "[MASK]"


def _query(text: str) -> str:
    """The text the VLM sees: the prompt with the mask removed (no leakage of a guess)."""
    out = " ".join(text.replace(MASK_PLACEHOLDER, " ").split())
    return out.replace(" .", ".").replace(" ?", "?").replace(" ,", ",").strip()


class FillMask:
    """Top-k fillers of the one ``[MASK]`` in a text. Loads lazily on first use (no work in ``__init__``)."""

    def __init__(self, plm: str = "minilm", xadapter_dir: str | None = None, bank_dir: str | None = None, *,
                 backbone: str | None = None, experts: str | None = None, top_k: int = 5, device: str = "auto",
                 force: bool = False, head: str | None = None, images: list[str] | None = None) -> None:
        """``images``: files the V-expert sees instead of retrieved ones (paired input); ``head``: a text-only
        head folder, to query a PLM shipped without an MLM head as the text-only base."""
        self.plm, self.xadapter_dir, self.bank_dir = plm, xadapter_dir, bank_dir
        self.head, self.images = head, list(images or [])
        self.backbone, self.experts, self.top_k, self.device, self.force = backbone, experts, top_k, device, force
        self._adapted = None

    def load(self, log=print) -> "FillMask":
        from .adapted import load_adapted_mlm

        if self._adapted is None:
            self._adapted = load_adapted_mlm(self.plm, self.xadapter_dir, self.backbone, self.bank_dir, self.experts,
                                             self.device, force=self.force, log=log, head=self.head,
                                             paired_images=bool(self.images))
            a = self._adapted
            if self.images and a.builder is not None and "v" in a.active:
                from ..retrieval.paired import PairedImages

                for path in self.images:
                    if not os.path.isfile(path):
                        raise InputError(f"image {path} not found", hint="pass an existing image file to --image")
                a.builder.paired = PairedImages.embed(self.images, a.builder.backbone, a.builder.bank)
            elif self.images:
                raise InputError("--image needs an X-adapter with its V-expert on",
                                 hint="pass --xadapter DIR (trained with the V-expert) and leave --experts at v or v,t")
        return self

    @property
    def active_experts(self) -> tuple[str, ...]:
        return self.load()._adapted.active

    def _encode(self, text: str):
        tok = self._adapted.tokenizer
        if not isinstance(text, str) or text.count(MASK_PLACEHOLDER) + text.count(tok.mask_token or "\0") == 0:
            raise InputError(f"no {MASK_PLACEHOLDER} in {text!r}",
                             hint=f'put exactly one {MASK_PLACEHOLDER} where the word to predict goes, e.g. '
                                  f'"The banana is {MASK_PLACEHOLDER}."')
        prompt = text.replace(MASK_PLACEHOLDER, tok.mask_token)
        enc = tok([prompt], return_tensors="pt")
        n = int((enc["input_ids"] == tok.mask_token_id).sum())
        if n != 1:
            raise InputError(f"{text!r} holds {n} mask tokens after tokenisation; fill-mask predicts exactly one",
                             hint=f"use a single {MASK_PLACEHOLDER}")
        return enc, _query(text.replace(tok.mask_token, MASK_PLACEHOLDER))

    @torch.no_grad()
    def _topk(self, enc, query: str, experts: tuple[str, ...], k: int) -> list[dict]:
        from ..model.modules import get_xadapter, has_xadapter

        a = self._adapted
        model, tok = a.model, a.tokenizer
        enc = {key: v.to(a.device) for key, v in enc.items()}
        if has_xadapter(model):
            stack = get_xadapter(model)
            previous = stack.active_experts
            stack.set_experts(",".join(experts) or "none")
            try:
                if experts:
                    images = [tuple(a.builder.paired.paths)] if self.images and "v" in experts else None
                    with stack.context(a.builder.build([query], experts, images=images)):
                        logits = model(**enc).logits
                else:
                    logits = model(**enc).logits
            finally:
                stack.set_experts(",".join(previous) or "none")
        else:
            logits = model(**enc).logits
        pos = (enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0]
        probs = logits[0, pos].float().softmax(-1)
        scores, ids = probs.topk(min(k, probs.shape[-1]))
        out = []
        for score, i in zip(scores.tolist(), ids.tolist()):
            word = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)]).strip()
            out.append({"token": word, "id": int(i), "score": round(float(score), 6)})
        return out

    def __call__(self, text: str, top_k: int | None = None, compare: bool = False):
        """Top-k ``{"token", "id", "score"}`` (probabilities over the whole vocabulary) with the adapter's
        active experts; ``compare=True`` -> ``{"experts_on": [...], "experts_off": [...]}`` for the same weights."""
        self.load()
        k = top_k or self.top_k
        if k < 1:
            raise InputError(f"top-k must be >= 1, got {k}", hint="pass --top-k 5")
        enc, query = self._encode(text)
        on = self._topk(enc, query, self._adapted.active, k)
        if not compare:
            return on
        return {"experts_on": on, "experts_off": self._topk(enc, query, (), k), "query": query,
                "experts": list(self._adapted.active)}


__all__ = ["FillMask"]
