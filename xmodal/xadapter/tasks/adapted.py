"""One way to assemble "PLM + X-adapter + CLIP context" for inference (colour probe, fill-mask).

``load_adapted_mlm`` loads the masked-LM, fills in a saved adapter (checking that it was trained on
this very PLM), switches the requested experts on and builds the ``ContextBuilder`` that retrieves
images from the bank for the V-expert and encodes text for the T-expert.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import XmodalError


@dataclass
class AdaptedMLM:
    """A masked LM ready for inference; ``builder`` is None when no expert is active."""

    model: torch.nn.Module
    tokenizer: object
    builder: object = None
    active: tuple[str, ...] = ()
    backbone_spec: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    warnings: list[str] = field(default_factory=list)


def resolve_device(name: str | None) -> torch.device:
    from .glue import _device

    return _device(name or "auto")


def load_adapted_mlm(plm: str, xadapter: str | None = None, backbone: str | None = None, bank: str | None = None,
                     experts: str | None = None, device: str | torch.device | None = "auto", visual: str = "real",
                     force: bool = False, log=print, head: str | None = None,
                     paired_images: bool = False) -> AdaptedMLM:
    """PLM (+ adapter) + context builder. Refuses a PLM without a trained MLM head.

    ``head``: a text-only head folder (``xmodal xadapter head``) for a PLM shipped without one — the
    text-only base, probed without any adapter. ``paired_images``: the caller feeds the V-expert its own
    images (``builder.paired``), so no retrieval bank is required."""
    from ..retrieval.context import DEFAULT_BACKBONE, ContextBuilder, load_bank
    from ..model.modules import get_xadapter, load_xadapter, read_xadapter_meta
    from ..model.plm import load_mlm

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model, tokenizer, new_head, _ = load_mlm(plm)
    builder, spec, active, notes = None, None, (), []
    if head:
        from .head import load_head

        new_head = sorted(set(new_head) - set(load_head(model, head)))
    if xadapter:
        meta = read_xadapter_meta(xadapter)
        stack = load_xadapter(model, xadapter, force=force, log=notes.append)
        missing = sorted(set(new_head) - set(stack.head_param_names))
        if experts is not None:
            stack.set_experts(experts)
        if stack.active_experts:
            from ...backbones import load_backbone

            spec = backbone or meta["config"].get("backbone") or DEFAULT_BACKBONE
            bb = load_backbone(spec, device=str(dev))
            needs_bank = "v" in stack.active_experts and visual != "zero" and not (paired_images and not bank)
            if needs_bank and not bank:
                raise XmodalError("the V-expert needs --bank DIR (images to retrieve); or use --experts t / none",
                                  hint="build a bank with `xmodal xadapter bank` and pass it as --bank DIR")
            bank_obj = load_bank(bank, bb) if needs_bank else None
            builder = ContextBuilder(stack.config, bb, bank_obj, device=dev, visual=visual)
        active = get_xadapter(model).active_experts
    else:
        missing = new_head
        if experts not in (None, "none"):
            notes.append("--experts ignored: no --xadapter given (plain PLM)")
    if missing:
        raise XmodalError(f"{plm} has no trained MLM head ({len(missing)} head parameters would be random); "
                          "use it through an X-adapter trained with `xmodal xadapter train` (which trains a head "
                          "for such PLMs) via --xadapter DIR, or use a PLM that ships an MLM head",
                          hint="pass --xadapter DIR (from `xmodal xadapter train`)")
    for note in notes:
        log(note)
    model.to(dev).eval()
    return AdaptedMLM(model, tokenizer, builder, tuple(active), spec, dev, notes)


__all__ = ["AdaptedMLM", "load_adapted_mlm", "resolve_device"]
