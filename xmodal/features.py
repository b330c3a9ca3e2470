"""Cached feature extraction: the single place that runs an image tower over data.

Every embedding is cached on disk under a key made of everything that determines it: backbone
fingerprint, dataset name, split, the exact sample ids (and, for files, their sizes and mtimes),
the preprocessing / augmentation pipeline, the number of augmented views and their seed, and the
numeric precision. A changed key never reuses stale features; writes are atomic.
"""
from __future__ import annotations

import json
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .backbones.base import VisionLanguageBackbone
from .backbones.transforms import describe
from .cache import atomic_path, stable_hash
from .data.base import ImageDataset, Sample
from .errors import CorruptImageError, DatasetError
from .featureset import FeatureSet

DEFAULT_CACHE_DIR = os.environ.get("XMODAL_CACHE", ".xmodal-cache")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class ExtractOptions:
    """How to run the tower (does not change the result, except ``dtype``, which is part of the key)."""

    cache_dir: str | Path = DEFAULT_CACHE_DIR
    batch_size: int = 64
    device: str | None = None
    dtype: str | torch.dtype | None = None  # bf16/fp16 autocast on GPU; fp32 on CPU
    num_workers: int = 0
    skip_corrupt: bool = False
    progress: bool = True
    decode: str = "pil"  # "pil" (CPU workers) or "tensor" (torchvision decode on the model's device)


class _Rows(Dataset):
    """Decode + transform one sample; augmented views are seeded by (seed, view, sample id)."""

    def __init__(self, dataset: ImageDataset, samples: list[Sample], transform: Callable,
                 seed: int | None, skip_corrupt: bool) -> None:
        self.dataset, self.samples, self.transform = dataset, samples, transform
        self.seed, self.skip_corrupt = seed, skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        sample = self.samples[i]
        if self.transform is None:  # tensor-decode path: hand over the encoded file
            from torchvision.io import read_file

            if sample.path is None:
                raise ValueError("decode='tensor' needs file-backed images; use decode='pil' for in-memory datasets")
            try:
                return (i, (read_file(sample.path), sample.path), None)
            except RuntimeError as exc:
                if self.skip_corrupt:
                    return (i, None, f"{sample.path}: {exc}")
                raise CorruptImageError(f"cannot read image {sample.path}: {exc}") from exc
        try:
            img = self.dataset.load_image(sample)
        except CorruptImageError as exc:
            if self.skip_corrupt:
                return (i, None, str(exc))
            raise
        if self.seed is None:
            return (i, self.transform(img), None)
        # torchvision's random transforms draw from the global generator: seed it per sample, then put
        # the caller's random state back so extraction (or a cache hit) never shifts later draws
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + zlib.crc32(sample.id.encode())) % (2**63))
            return (i, self.transform(img), None)


def _collate(batch):
    kept = [(i, x) for i, x, _ in batch if x is not None]
    errors = [e for _, x, e in batch if x is None]
    if not kept:
        return torch.empty(0, dtype=torch.long), None, errors
    idx, xs = zip(*kept)
    return torch.tensor(idx), (list(xs) if isinstance(xs[0], tuple) else torch.stack(xs)), errors


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
        dtype = DTYPES[dtype]
    if dtype != torch.float32 and device.type == "cpu":
        warnings.warn(f"{dtype} requested on CPU; using float32", stacklevel=3)
        return torch.float32
    return dtype


def _sample_signature(samples: list[Sample]) -> list:
    """Ids plus, for files, (size, mtime): editing an image in place invalidates the cache."""
    sig = []
    for s in samples:
        if s.path is not None:
            try:
                st = os.stat(s.path)
                sig.append((s.id, s.label, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                sig.append((s.id, s.label, None, None))
        else:
            sig.append((s.id, s.label))
    return sig


def _run_tower(backbone: VisionLanguageBackbone, dataset: ImageDataset, samples: list[Sample],
               transform: Callable, fn: Callable[[torch.Tensor], torch.Tensor], opts: ExtractOptions,
               seed: int | None, desc: str) -> tuple[list[int], torch.Tensor]:
    device = backbone.device
    dtype = _resolve_dtype(opts.dtype, device)
    if opts.decode == "tensor":
        if seed is not None:
            raise ValueError("augmented views need decode='pil' (the random crops run on PIL images)")
        transform = None
    elif opts.decode != "pil":
        raise ValueError(f"decode must be 'pil' or 'tensor', got {opts.decode!r}")
    loader = DataLoader(_Rows(dataset, samples, transform, seed, opts.skip_corrupt), batch_size=opts.batch_size,
                        shuffle=False, num_workers=opts.num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        generator=torch.Generator().manual_seed(0))  # its base seed never draws from the caller's RNG
    kept: list[int] = []
    outputs: list[torch.Tensor] = []
    skipped: list[str] = []
    bar = tqdm(total=len(samples), desc=desc, unit="img", disable=not opts.progress, leave=False)
    with torch.inference_mode():
        for idx, pixels, errors in loader:
            skipped.extend(errors)
            if pixels is not None:
                if isinstance(pixels, list):  # encoded files from the tensor-decode path
                    from .tensor_decode import decode_batch, preprocess_batch

                    images = decode_batch([b for b, _ in pixels], [p for _, p in pixels], device)
                    pixels = preprocess_batch(images, backbone.image_size, backbone.mean, backbone.std)
                pixels = pixels.to(device, non_blocking=True)
                pixels = pixels.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    out = fn(pixels)
                outputs.append(out.float().cpu())
                kept.extend(idx.tolist())
            bar.update(len(idx) + len(errors))
    bar.close()
    for msg in skipped:
        warnings.warn(f"skipped unreadable image: {msg}", stacklevel=2)
    if not outputs:
        raise DatasetError(f"no readable images among {len(samples)} samples of {dataset.name}")
    return kept, torch.cat(outputs)


def _cached(path: Path, compute: Callable[[], tuple[list[str], dict[str, torch.Tensor]]],
            meta: dict) -> tuple[list[str], dict[str, torch.Tensor], bool]:
    """Load ``path`` if present, else compute and write it atomically. Returns (ids, tensors, hit)."""
    side = path.with_suffix(".json")
    if path.is_file():
        try:
            tensors = load_file(str(path))
            with open(side) as fh:
                ids = json.load(fh)["ids"]
            if any(t.shape[0] != len(ids) for t in tensors.values()):
                raise ValueError(f"{len(ids)} ids for {[tuple(t.shape) for t in tensors.values()]} rows")
            return ids, tensors, True
        except Exception as exc:  # a damaged cache entry is recomputed, never trusted
            warnings.warn(f"ignoring unreadable feature cache {path}: {exc!r}", stacklevel=3)
    ids, tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # tensors first, then the id list; a failure in either leaves no entry behind
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        with atomic_path(side) as tmp:
            tmp.write_text(json.dumps({"ids": ids, "meta": meta}))
    except BaseException:
        for p in (path, side):
            p.unlink(missing_ok=True)
        raise
    return ids, tensors, False


def _key_meta(backbone: VisionLanguageBackbone, dataset: ImageDataset, split: str, samples: list[Sample],
              pipeline: str, kind: str, dtype: torch.dtype, skip_corrupt: bool = False, **extra) -> dict:
    meta = {
        "kind": kind, "backbone": backbone.spec, "fingerprint": backbone.fingerprint(), "dataset": dataset.cache_id,
        "split": split, "samples": stable_hash(_sample_signature(samples), 32), "n": len(samples),
        "pipeline": pipeline, "dtype": str(dtype), **extra,
    }
    # only added when set, so entries written before these keys existed stay valid
    content = dataset.content_key(split)
    if content is not None:  # in-memory arrays: ids and labels alone do not identify the pixels
        meta["content"] = content
    if skip_corrupt:  # an entry that may lack images is never reused by a strict run
        meta["skip_corrupt"] = True
    return meta


def _pipeline(backbone: VisionLanguageBackbone, decode: str) -> str:
    if decode == "tensor":
        from .tensor_decode import pipeline_description

        return pipeline_description(backbone.image_size, backbone.mean, backbone.std)
    return describe(backbone.preprocess)


def extract_features(backbone: VisionLanguageBackbone, dataset: ImageDataset, split: str, *,
                     samples: list[Sample] | None = None, augment_views: int = 0, augment_seed: int = 0,
                     cache_dir: str | Path = DEFAULT_CACHE_DIR, batch_size: int = 64, device: str | None = None,
                     dtype: str | torch.dtype | None = None, num_workers: int = 0, skip_corrupt: bool = False,
                     progress: bool = True, decode: str = "pil") -> FeatureSet:
    """Embeddings of ``samples`` (default: the whole split), plus ``augment_views`` augmented views.

    Eval features use ``backbone.preprocess``; views use ``backbone.augment_preprocess()`` with a seed per
    (augment_seed, view, sample id), so they are reproducible and independent of batching or workers.
    ``decode="tensor"`` decodes JPEGs with torchvision on the backbone's device (batched nvJPEG on GPU)
    for the eval features; it is a distinct preprocessing pipeline with its own cache key.
    """
    opts = ExtractOptions(cache_dir, batch_size, device, dtype, num_workers, skip_corrupt, progress, decode)
    if device is not None:
        backbone.to(device)
    samples = dataset.samples(split) if samples is None else samples
    if not samples:
        raise DatasetError(f"no samples to embed in {dataset.name}/{split}")
    dt = _resolve_dtype(dtype, backbone.device)
    root = Path(cache_dir) / "features"
    by_index = {i: s for i, s in enumerate(samples)}

    def embed(transform, seed, desc):
        def compute():
            kept, out = _run_tower(backbone, dataset, samples, transform, backbone.encode_images, opts, seed, desc)
            return [by_index[i].id for i in kept], {"x": out}
        return compute

    meta = _key_meta(backbone, dataset, split, samples, _pipeline(backbone, decode), "eval", dt, skip_corrupt)
    ids, tensors, _ = _cached(root / f"{stable_hash(meta)}.safetensors",
                              embed(backbone.preprocess, None, f"embed {dataset.name}/{split}"), meta)
    feats = tensors["x"]
    views = None
    if augment_views > 0:
        opts.decode = "pil"  # random crops run on PIL images
        aug = backbone.augment_preprocess()
        per_view = []
        for v in range(augment_views):
            # same key fields as the eval entry (sample signature computed once), other pipeline and view
            vmeta = {**meta, "kind": "augment", "pipeline": describe(aug), "view": v, "augment_seed": augment_seed}
            vids, vt, _ = _cached(root / f"{stable_hash(vmeta)}.safetensors",
                                  embed(aug, augment_seed * 1000 + v, f"view {v + 1}/{augment_views}"), vmeta)
            if vids != ids:  # only possible when corrupt images were skipped
                raise DatasetError("augmented views and eval features cover different images; "
                                   "remove the unreadable files instead of skipping them")
            per_view.append(vt["x"])
        views = torch.stack(per_view)
    id_to_label = {s.id: s.label for s in samples}
    return FeatureSet(features=feats, labels=torch.tensor([id_to_label[i] for i in ids], dtype=torch.long),
                      ids=ids, classnames=list(dataset.classnames), views=views,
                      meta={**meta, "augment_views": augment_views, "augment_seed": augment_seed,
                            "stand_in": backbone.is_stand_in})


def extract_tokens(backbone: VisionLanguageBackbone, dataset: ImageDataset, split: str, *,
                   samples: list[Sample] | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                   batch_size: int = 64, device: str | None = None, dtype: str | torch.dtype | None = None,
                   num_workers: int = 0, skip_corrupt: bool = False, progress: bool = True,
                   token_dtype: torch.dtype = torch.float16) -> tuple[list[str], torch.Tensor]:
    """Patch/spatial tokens (N, T, token_dim) of ``samples`` (for the X-adapter V-expert), cached."""
    opts = ExtractOptions(cache_dir, batch_size, device, dtype, num_workers, skip_corrupt, progress)
    if device is not None:
        backbone.to(device)
    samples = dataset.samples(split) if samples is None else samples
    dt = _resolve_dtype(dtype, backbone.device)
    meta = _key_meta(backbone, dataset, split, samples, describe(backbone.preprocess), "tokens", dt, skip_corrupt,
                     token_dtype=str(token_dtype))
    by_index = {i: s for i, s in enumerate(samples)}

    def compute():
        kept, out = _run_tower(backbone, dataset, samples, backbone.preprocess, backbone.image_tokens, opts, None,
                               f"tokens {dataset.name}/{split}")
        return [by_index[i].id for i in kept], {"x": out.to(token_dtype)}

    ids, tensors, _ = _cached(Path(cache_dir) / "features" / f"{stable_hash(meta)}.safetensors", compute, meta)
    return ids, tensors["x"]
