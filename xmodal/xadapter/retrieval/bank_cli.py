"""``xmodal xadapter bank``: build a retrieval bank and print a summary (with IVF recall vs exact)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ...cli_util import resolve_device

if TYPE_CHECKING:  # names for the annotations only: the command imports torch and the bank when it runs
    import torch

    from .bank import RetrievalBank


def measure_recall(bank: RetrievalBank, queries: torch.Tensor, k: int) -> dict:
    """Recall@k of ``bank``'s index against brute-force exact search, plus both search times."""
    import torch
    from .bank import exact_topk, recall_at_k

    k = min(k, len(bank))
    queries = torch.nn.functional.normalize(queries.float().cpu(), dim=-1)
    t0 = time.perf_counter()
    _, approx = bank.search(queries, k)
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, exact = exact_topk(bank.all_embeddings(), queries, k)
    t_exact = time.perf_counter() - t0
    return {"queries": int(queries.shape[0]), "k": k, "recall": round(recall_at_k(approx, exact), 4),
            "index_seconds": round(t_index, 4), "exact_seconds": round(t_exact, 4)}


def _text_queries(dataset, limit: int, seed: int) -> list[str]:
    import torch

    classnames = list(getattr(dataset, "classnames", []) or [])
    templates = list(getattr(dataset, "templates", []) or []) or ["a photo of a {}."]
    texts = [t.format(c.replace("_", " ")) for c in classnames for t in templates]
    if len(texts) > limit:
        gen = torch.Generator().manual_seed(seed)
        texts = [texts[i] for i in torch.randperm(len(texts), generator=gen)[:limit].tolist()]
    return texts


def _image_queries(bank: RetrievalBank, backbone, dataset, limit: int, seed: int, **extract) -> tuple[torch.Tensor, str]:
    """Embeddings of up to ``limit`` images of another split of ``dataset`` (held out from the pool), or,
    when there is none, of a sample of the pool itself (self-queries: an optimistic recall)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    split = bank.meta.get("split")
    others = [s for s in ("test", "val", "train") if dataset is not None and s != split and s in dataset.splits()]
    if backbone is not None and others:
        from ...features import extract_features

        samples = dataset.samples(others[0])
        pick = sorted(torch.randperm(len(samples), generator=gen)[:limit].tolist())
        fs = extract_features(backbone, dataset, others[0], samples=[samples[i] for i in pick], progress=False, **extract)
        return fs.features, f"held-out {others[0]} images"
    rows = torch.randperm(len(bank), generator=gen)[: min(limit, len(bank))]
    return bank.embeddings(rows), "pool images, self-queries, optimistic"


def bank_summary(bank: RetrievalBank, backbone=None, dataset=None, *, recall_k: int = 4,
                 recall_queries: int = 256, seed: int = 0, **extract) -> dict:
    """What `xmodal xadapter bank` prints: size, dims, index, files, and for IVF the recall@k vs exact
    search on text queries (class prompts of ``dataset``) and image queries (held-out images of another
    split, else a sample of the pool). ``extract`` goes to `extract_features` (cache_dir, device, ...)."""
    import torch

    meta = bank.meta
    out = {
        "out": str(bank.directory),
        "backbone": meta.get("backbone"), "fingerprint": meta.get("fingerprint"), "stand_in": meta.get("stand_in"),
        "dataset": meta.get("dataset"), "split": meta.get("split"),
        "size": len(bank), "dim": bank.dim,
        "tokens": [bank.num_tokens, bank.token_dim] if bank.has_tokens else None,
        "index": bank.index_kind, "nlist": meta.get("nlist"), "nprobe": meta.get("nprobe"),
        "bytes": sum(int(f.get("bytes", 0)) for f in meta.get("files", {}).values()) + len(json.dumps(meta)),
        "recall": None,
    }
    if bank.index_kind != "exact" and recall_queries > 0:
        recall: dict = {"note": "recall@k of the index vs brute-force exact search"}
        queries, source = _image_queries(bank, backbone, dataset, recall_queries, seed, **extract)
        recall["image"] = {**measure_recall(bank, queries, recall_k), "source": source}
        if backbone is not None and dataset is not None:
            texts = _text_queries(dataset, recall_queries, seed)
            if texts:
                with torch.inference_mode():
                    q = torch.cat([backbone.encode_texts(texts[s : s + 256]).float().cpu()
                                   for s in range(0, len(texts), 256)])
                recall["text"] = {**measure_recall(bank, q, recall_k), "source": "class prompts"}
        out["recall"] = recall
    return out


def _print_human(summary: dict, seconds: float) -> None:
    typer.echo(f"retrieval bank -> {summary['out']}  ({seconds:.1f}s)")
    stand_in = "  (offline stand-in, not CLIP)" if summary.get("stand_in") else ""
    typer.echo(f"  backbone  {summary['backbone']}{stand_in}")
    typer.echo(f"  pool      {summary['dataset']} / {summary['split']}: {summary['size']} images, dim {summary['dim']}")
    tok = summary["tokens"]
    typer.echo(f"  tokens    {tok[0]} x {tok[1]} per image (fp16)" if tok else "  tokens    none (--no-tokens)")
    extra = f", nlist {summary['nlist']}, nprobe {summary['nprobe']}" if summary["index"] == "ivf" else ""
    typer.echo(f"  index     {summary['index']} inner product{extra}; {summary['bytes'] / 1e6:.2f} MB on disk")
    for name in ("text", "image"):
        r = (summary.get("recall") or {}).get(name)
        if r:
            typer.echo(f"  recall@{r['k']} vs exact, {r['queries']} {name} queries ({r['source']}): {r['recall']:.3f}")


def register_bank(xadapter_app: typer.Typer) -> None:
    """Add the ``bank`` command to the ``xmodal xadapter`` command group."""

    @xadapter_app.command("bank")
    def bank_command(
        backbone: str = typer.Option(..., "--backbone", help="backbone spec, e.g. openclip:ViT-B-16/openai, bridge:lite0-minilm, tiny:clip"),
        data: str = typer.Option(..., "--data", help="dataset spec of the image pool, e.g. imagefolder:/data/coco"),
        split: str = typer.Option("train", "--split", help="split of the dataset to index"),
        out: Path = typer.Option(..., "--out", help="bank directory (bank.json, embeddings.safetensors, index.faiss)"),
        index: str = typer.Option("exact", "--index", help="exact (IndexFlatIP) or ivf (IndexIVFFlat, inner product)"),
        nlist: Optional[int] = typer.Option(None, "--nlist", help="IVF lists (default ~4*sqrt(N), at most N/39)"),
        nprobe: int = typer.Option(8, "--nprobe", help="IVF lists probed per query"),
        no_tokens: bool = typer.Option(False, "--no-tokens", help="store pooled embeddings only, no image tokens"),
        batch_size: int = typer.Option(64, "--batch-size"),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)"),
        cache_dir: Path = typer.Option(Path(".xmodal-cache"), "--cache-dir", envvar="XMODAL_CACHE", help="feature cache directory (env XMODAL_CACHE)"),
        recall_k: int = typer.Option(4, "--recall-k", help="k for the IVF recall check"),
        recall_queries: int = typer.Option(256, "--recall-queries", help="queries per kind for the IVF recall check (0: skip)"),
        json_out: bool = typer.Option(False, "--json", help="print exactly one JSON document"),
    ) -> None:
        """Build a retrieval bank (image pool for X-adapter retrieval) and print a summary."""
        from ...backbones import load_backbone
        from .bank import RetrievalBank
        from ...data import load_dataset

        start = time.perf_counter()
        dev = resolve_device(device or "auto")
        bb = load_backbone(backbone, device=dev)
        ds = load_dataset(data)
        bank = RetrievalBank.build(bb, ds, out, split=split, index=index, nlist=nlist, nprobe=nprobe,
                                   with_tokens=not no_tokens, batch_size=batch_size, device=dev,
                                   cache_dir=cache_dir, dataset_spec=data, progress=not json_out)
        built = time.perf_counter() - start
        summary = bank_summary(bank, bb, ds, recall_k=recall_k, recall_queries=recall_queries,
                               cache_dir=cache_dir, batch_size=batch_size, device=dev)
        summary["build_seconds"] = round(built, 2)
        if json_out:
            typer.echo(json.dumps(summary))
        else:
            _print_human(summary, built)


__all__ = ["register_bank", "bank_summary", "measure_recall"]
