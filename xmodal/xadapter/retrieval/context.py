"""Build the per-batch CLIP context (X_V from retrieved images, X_T from the CLIP text tower)."""
from __future__ import annotations

from pathlib import Path

import torch

from ...errors import XmodalError
from ..model.config import XAdapterConfig
from ..model.modules import XContext

DEFAULT_BACKBONE = "bridge:lite0-minilm"
# What the V-expert receives: the retrieved images ("real"), images of other classes in place of each
# retrieved one ("shuffled", a control that keeps the input distribution but breaks the text-image link),
# or all-zero features ("zero", a control with the same modules and no visual information).
VISUAL_MODES = ("real", "shuffled", "zero")


def row_classes(bank) -> list[str]:
    """Class of every bank row, read from its sample id (``<split>/<class>/<file>`` for ImageFolder pools)."""
    out = []
    for sid in bank.ids:
        parts = str(sid).split("/")
        if len(parts) < 2:
            raise XmodalError(f"bank sample id {sid!r} names no class; the shuffled control needs an ImageFolder-style "
                              "pool (<split>/<class>/<file> ids)", hint="build the bank from an imagefolder: dataset")
        out.append(parts[-2])
    return out


def shuffle_map(classes: list[str], seed: int = 0) -> torch.Tensor:
    """Row -> row of another class: classes are moved along one random cycle (so no class maps to itself),
    the j-th image of class c becomes the j-th image (mod its size) of the next class on the cycle."""
    names = sorted(set(classes))
    if len(names) < 2:
        raise XmodalError("the shuffled control needs a pool with at least two classes")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    nxt = {names[order[i]]: names[order[(i + 1) % len(order)]] for i in range(len(order))}
    rows: dict[str, list[int]] = {}
    for r, c in enumerate(classes):
        rows.setdefault(c, []).append(r)
    pos = {r: j for c in rows for j, r in enumerate(rows[c])}
    return torch.tensor([rows[nxt[c]][pos[r] % len(rows[nxt[c]])] for r, c in enumerate(classes)], dtype=torch.long)


def load_bank(directory: str | Path, backbone=None):
    """``RetrievalBank.load(directory, backbone)`` (raises CacheMismatchError on a fingerprint mismatch)."""
    try:
        from .bank import RetrievalBank
    except ImportError as exc:  # pragma: no cover - the bank module ships with xmodal
        raise XmodalError("the retrieval bank module (xmodal.xadapter.bank) is not available") from exc
    if not Path(directory).is_dir():
        raise XmodalError(f"retrieval bank folder {directory} does not exist; build one with `xmodal xadapter bank`")
    return RetrievalBank.load(directory, backbone=backbone)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Turn an inference-mode tensor into a normal one (usable in autograd graphs)."""
    with torch.inference_mode(False):
        return t.detach().clone()


def _pad_cat(groups: list[list[torch.Tensor]], masks: list[list[torch.Tensor]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate each example's segment features along tokens, then pad examples to one width."""
    feats = [torch.cat(g, 0) for g in groups]
    mks = [torch.cat(m, 0) for m in masks]
    width = max(f.shape[0] for f in feats)
    dim = feats[0].shape[-1]
    out = torch.zeros(len(feats), width, dim, dtype=feats[0].dtype, device=device)
    mask = torch.zeros(len(feats), width, dtype=torch.bool, device=device)
    for i, (f, m) in enumerate(zip(feats, mks)):
        out[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = m
    return out, mask


class ContextBuilder:
    """texts -> ``XContext`` for one batch.

    Each example is one text or a tuple of texts (sentence pairs): every segment retrieves its own
    ``k`` images and gets its own CLIP text features; an example's segments are concatenated.
    """

    def __init__(self, config: XAdapterConfig, backbone=None, bank=None, device="cpu", visual: str = "real",
                 shuffle_seed: int = 0, paired=None, paired_retrieved: bool = False,
                 cache_queries: bool = False) -> None:
        if visual not in VISUAL_MODES:
            raise XmodalError(f"unknown visual input {visual!r}; use one of {', '.join(VISUAL_MODES)}")
        self.config, self.backbone, self.bank = config, backbone, bank
        self.device = torch.device(device)
        self.visual, self.shuffle_seed = visual, shuffle_seed
        self._shuffle: torch.Tensor | None = None
        self.last_rows: torch.Tensor | None = None      # bank rows retrieved for the last batch (before shuffling)
        self.last_fed_rows: torch.Tensor | None = None  # bank rows whose features were fed to the V-expert
        # paired images (a ``PairedImages``): examples that name their own images see those; with
        # ``paired_retrieved`` the k retrieved images are appended
        self.paired, self.paired_retrieved = paired, paired_retrieved
        # query text -> retrieved bank rows, so a text seen again is not embedded and searched again
        self._query_rows: dict[str, torch.Tensor] | None = {} if cache_queries else None

    def build(self, texts, experts: tuple[str, ...] = ("v", "t"), images=None) -> XContext:
        """``images``: per example, the paths of its paired images (needs ``paired``); None = retrieval only."""
        examples = [tuple(t for t in ([x] if isinstance(x, str) else x) if t is not None) for x in texts]
        flat = [t for ex in examples for t in ex]
        owner = [i for i, ex in enumerate(examples) for _ in ex]
        ctx = XContext()
        if not flat:
            return ctx
        if images is not None and self.paired is not None and "v" in experts:
            ctx.visual, ctx.visual_mask = self._paired_visual(flat, owner, len(examples), images)
            if "t" in experts:
                ctx.text, ctx.text_mask = self._group(self.text_features(flat), owner, len(examples))
            return ctx
        # With both experts on pooled features, the retrieval query and the T-expert input are the same
        # CLIP text embedding: encode each text once.
        shared = None
        if ("v" in experts and "t" in experts and self.config.feature_source == "pooled" and self.visual != "zero"
                and self.backbone is not None and self.bank is not None):
            shared = self.backbone.encode_texts(flat)
        if "v" in experts:
            ctx.visual, ctx.visual_mask = self._group(self.visual_features(flat, shared), owner, len(examples))
        if "t" in experts:
            ctx.text, ctx.text_mask = self._group(self.text_features(flat, shared), owner, len(examples))
        return ctx

    def _paired_visual(self, flat, owner, n, images) -> tuple[torch.Tensor, torch.Tensor]:
        feats, mask = self.paired.features(images, self.visual)
        if self.paired_retrieved or not bool(mask.any(1).all()):
            # examples without their own image fall back to retrieval (all of them with paired_retrieved)
            if self.bank is not None or self.visual == "zero":
                rf, rm = self._group(self.visual_features(flat), owner, n)
                if not self.paired_retrieved:
                    rm = rm & ~mask.any(1, keepdim=True).to(rm.device)
                feats = torch.cat([feats.to(rf.device), rf], 1)
                mask = torch.cat([mask.to(rm.device), rm], 1)
        return feats.to(self.device), mask.to(self.device)

    def _search(self, texts: list[str]) -> torch.Tensor:
        """Bank rows of the k images retrieved for each text (cached per text when ``cache_queries``)."""
        if self._query_rows is None:
            return self.bank.search_texts(self.backbone, texts, self.config.k)[1]
        todo = sorted({t for t in texts if t not in self._query_rows})
        if todo:
            rows = self.bank.search_texts(self.backbone, todo, self.config.k)[1].cpu()
            self._query_rows.update(zip(todo, rows))
        return torch.stack([self._query_rows[t] for t in texts])

    def _group(self, fm: tuple[torch.Tensor, torch.Tensor], owner: list[int], n: int):
        feats, mask = fm
        groups: list[list[torch.Tensor]] = [[] for _ in range(n)]
        masks: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for row, ex in enumerate(owner):
            groups[ex].append(feats[row])
            masks[ex].append(mask[row])
        return _pad_cat(groups, masks, self.device)

    def visual_features(self, texts: list[str], query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """k retrieved images per text; ``query`` = the texts' CLIP embeddings when already computed."""
        if self.visual == "zero":
            dim = self.config.clip_dim
            per = 1 if self.config.feature_source == "pooled" else max(1, int(getattr(self.bank, "num_tokens", 0) or 1))
            feats = torch.zeros(len(texts), self.config.k * per, dim, device=self.device)
            self.last_rows = self.last_fed_rows = None
            return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=self.device)
        if self.bank is None or self.backbone is None:
            raise XmodalError("the V-expert needs retrieved images: pass --bank DIR (and --backbone SPEC), "
                              "or switch it off with --experts t")
        if query is None:
            idx = self._search(list(texts))
        else:
            from .bank import check_backbone

            check_backbone(self.bank.meta, self.backbone, self.bank.directory)
            _, idx = self.bank.search(query.float().cpu(), self.config.k)
        self.last_rows = idx.detach().cpu()
        if self.visual == "shuffled":
            if self._shuffle is None:
                self._shuffle = shuffle_map(row_classes(self.bank), self.shuffle_seed)
            idx = self._shuffle[idx.cpu()].to(idx.device)
        self.last_fed_rows = idx.detach().cpu()
        if self.config.feature_source == "pooled":
            feats = self.bank.embeddings(idx)                                  # (N, k, D)
        else:
            toks = self.bank.tokens(idx)                                       # (N, k, T, d)
            feats = toks.reshape(toks.shape[0], -1, toks.shape[-1])
        feats = _plain(feats).float().to(self.device)
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=self.device)

    def text_features(self, texts: list[str], pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP text features for the T-expert; ``pooled`` = the texts' embeddings when already computed."""
        if self.backbone is None:
            raise XmodalError("the T-expert needs the CLIP text tower: pass --backbone SPEC")
        if self.config.feature_source == "pooled":
            emb = self.backbone.encode_texts(texts) if pooled is None else pooled
            feats = _plain(emb).float()[:, None, :]
            mask = torch.ones(feats.shape[:2], dtype=torch.bool)
        else:
            states, mask = self.backbone.text_tokens(texts)
            feats, mask = _plain(states).float(), _plain(mask).bool()
        return feats.to(self.device), mask.to(self.device)


def check_bank_backbone(bank, backbone) -> None:
    meta = getattr(bank, "meta", {}) or {}
    fp = meta.get("fingerprint")
    if fp is not None and fp != backbone.fingerprint():
        from ...errors import CacheMismatchError

        raise CacheMismatchError(f"the bank was built with backbone {meta.get('backbone')} (fingerprint {fp}); "
                                 f"this run uses {backbone.spec} ({backbone.fingerprint()}). Rebuild the bank or "
                                 "pass the matching --backbone")
