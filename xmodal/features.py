"""Cached feature extraction: the single place that runs an image tower over data.

Every embedding is cached on disk under a key made of everything that determines it: backbone
fingerprint, dataset name, split, the exact sample ids (and, for files, their sizes and mtimes),
the preprocessing / augmentation pipeline, the number of augmented views and their seed, and the
numeric precision. A changed key never reuses stale features; writes are atomic.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from .cache import DEFAULT_CACHE_DIR, atomic_path, stable_hash
from .data.base import ImageDataset, Sample
from .encoders.base import VisionLanguageBackbone
from .encoders.transforms import describe
from .errors import CorruptImageError, DatasetError, ResourceError, UsageError
from .featureset import FeatureSet
from .prefetch import auto_decode_threads, prefetched_batches, split_transform
from .jsonio import dumps, plain
from .progress import Progress
from .shards import Shard, current_shard, launched_world

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "int8": "int8"}


@dataclass
class ExtractOptions:
    """How to run the tower (does not change the result, except ``dtype``, which is part of the key)."""

    cache_dir: str | Path = DEFAULT_CACHE_DIR
    batch_size: int = 64
    device: str | None = None
    dtype: str | torch.dtype | None = None  # fp32 exact; bf16/fp16 autocast on GPU; bf16 compiled or int8 on CPU
    num_workers: int | None = None  # loader processes; None: none on CPU, sized to the cores on a GPU
    skip_corrupt: bool = False
    progress: bool = True
    decode: str = "pil"  # "pil" (CPU workers) or "tensor" (torchvision decode on the model's device)
    decode_threads: int | None = None  # in-process loading: threads preparing the next batches; None: auto


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
            if sample.path is None:
                raise UsageError("decode='tensor' needs file-backed images",
                                 hint="use decode='pil' for in-memory datasets")
            try:  # plain file read: torchvision.io.read_file hangs inside forked loader workers
                with open(sample.path, "rb") as fh:
                    data = bytearray(fh.read())
                blob = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
                return (i, (blob, sample.path), None)
            except OSError as exc:
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


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    """A torch dtype for the autocast paths, or ``"int8"`` (CPU, ONNX Runtime QDQ)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}", hint="use --dtype fp32, bf16, fp16 (GPU) or int8 (CPU)")
        dtype = DTYPES[dtype]
    if dtype == "int8":
        if device.type != "cpu":
            raise UsageError(f"--dtype int8 runs on CPU through ONNX Runtime, not on {device}",
                             hint="use --device cpu with --dtype int8, or --dtype bf16 on the GPU")
        return dtype
    if dtype == torch.float16 and device.type == "cpu":
        warnings.warn("float16 requested on CPU; using float32 (bf16 is the CPU half-precision mode)", stacklevel=3)
        return torch.float32
    return dtype


def auto_workers(n: int, batch_size: int, device: torch.device) -> int:
    """Loader processes: none on CPU, where the tower takes the cores and decoding runs in threads of this
    process that overlap it (``prefetch``; measured faster than a loader process on a 2-core machine, see
    docs/speed.md); on a GPU every core but one decodes. Small jobs stay in-process (forking costs more than
    it saves)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type != "cuda" or n < 2 * batch_size or cores < 2:
        return 0
    return min(16, cores - 1)


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
               seed: int | None, desc: str,
               reference: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[list[int], torch.Tensor, dict]:
    """Run ``fn`` over ``samples``; returns kept row indices, outputs, and (with ``reference``) the fidelity
    of ``fn`` against the exact tower on the first batch."""
    device = backbone.device
    dtype = _resolve_dtype(opts.dtype, device)
    autocast = isinstance(dtype, torch.dtype) and dtype != torch.float32 and device.type != "cpu"
    if opts.decode == "tensor":
        if seed is not None:
            raise UsageError("augmented views need decode='pil' (the random crops run on PIL images)",
                             hint="drop --augment-views or use the PIL decode path")
        transform = None
    elif opts.decode != "pil":
        raise UsageError(f"decode must be 'pil' or 'tensor', got {opts.decode!r}", hint="use decode='pil' or 'tensor'")
    workers = auto_workers(len(samples), opts.batch_size, device) if opts.num_workers is None else opts.num_workers
    loader: Iterable
    if workers == 0 and transform is not None:  # in-process: decode the next batches while the tower runs
        threads = opts.decode_threads
        if threads is None:
            threads = auto_decode_threads(len(samples), opts.batch_size, launched_world()[1])
        if seed is not None:  # augmented views seed the global generator per sample: one thread at a time
            threads = min(threads, 1)
        per_image, finish = split_transform(transform)
        rows = _Rows(dataset, samples, per_image, seed, opts.skip_corrupt)
        loader = prefetched_batches(rows.__getitem__, len(rows), opts.batch_size, threads, finish)
    else:
        loader = DataLoader(_Rows(dataset, samples, transform, seed, opts.skip_corrupt), batch_size=opts.batch_size,
                            shuffle=False, num_workers=workers, collate_fn=_collate,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if workers else None,  # its base seed never draws from the caller's RNG:
                            generator=torch.Generator().manual_seed(0))
    kept: list[int] = []
    outputs: list[torch.Tensor] = []
    skipped: list[str] = []
    fidelity: dict = {}
    bar = Progress(len(samples), desc, unit="img", enabled=opts.progress)
    with torch.inference_mode():
        for idx, pixels, errors in loader:
            skipped.extend(errors)
            if pixels is not None:
                if isinstance(pixels, list):  # encoded files from the tensor-decode path
                    from .tensor_decode import decode_batch, preprocess_batch

                    images = decode_batch([b for b, _ in pixels], [p for _, p in pixels], device)
                    pixels = preprocess_batch(images, backbone.image_size, backbone.mean, backbone.std)
                pixels = pixels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=dtype if autocast else torch.bfloat16, enabled=autocast):
                    out = fn(pixels)
                if reference is not None and not fidelity:
                    from .engines.onnx import compare

                    fidelity = compare(out, reference(pixels))
                outputs.append(out.float().cpu())
                kept.extend(idx.tolist())
            bar.update(len(idx) + len(errors))
    bar.close()
    for msg in skipped:
        warnings.warn(f"skipped unreadable image: {msg}", stacklevel=2)
    if not outputs:
        raise DatasetError(f"no readable images among {len(samples)} samples of {dataset.name}",
                           hint="check the dataset folder; every image failed to decode")
    return kept, torch.cat(outputs), fidelity


# ---------------------------------------------------------------------------------------------- cache entries
class _Unusable(Exception):
    """A cache entry that exists but cannot be trusted (the message says why)."""


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tensor_record(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype), "sha256": tensor_digest(v)}
            for k, v in sorted(tensors.items())}


def _ids_fit(ids: list[str], expected: list[str], subset_ok: bool) -> bool:
    """``ids`` are exactly ``expected`` or, where skipped images are allowed, an in-order subset of them."""
    if not subset_ok or len(ids) == len(expected):
        return ids == expected
    it = iter(expected)
    return all(any(i == e for e in it) for i in ids)


def _load_entry(path: Path, meta: dict, expected_ids: list[str]) -> tuple[list[str], dict[str, torch.Tensor], dict]:
    """Read an entry and check it against its record: the key it was written for, the sample ids the key
    names, shapes, dtypes and a content digest of every tensor. Raises `_Unusable` naming the first mismatch."""
    side = path.with_suffix(".json")
    try:
        record = json.loads(side.read_text())
        tensors = load_file(str(path))
    except Exception as exc:
        raise _Unusable(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("ids"), list):
        raise _Unusable("its record has no id list")
    if record.get("meta") != plain(meta):
        raise _Unusable("its record was written for another key (backbone, data, samples or options)")
    expected = record.get("tensors")
    if not isinstance(expected, dict):
        raise _Unusable("its record has no tensor digests (written by an older xmodal)")
    if set(expected) != set(tensors):
        raise _Unusable(f"tensors {sorted(tensors)} do not match the recorded {sorted(expected)}")
    ids = record["ids"]
    if not _ids_fit(ids, expected_ids, bool(meta.get("skip_corrupt"))):
        raise _Unusable("its id list is not the samples its key names")
    for name, t in tensors.items():
        want = expected[name]
        if list(t.shape) != want.get("shape") or str(t.dtype) != want.get("dtype"):
            raise _Unusable(f"tensor {name!r} is {str(t.dtype)} {list(t.shape)}, recorded "
                            f"{want.get('dtype')} {want.get('shape')}")
        if t.shape[0] != len(ids):
            raise _Unusable(f"{len(ids)} ids for {t.shape[0]} rows of {name!r}")
        if tensor_digest(t) != want.get("sha256"):
            raise _Unusable(f"tensor {name!r} does not match its recorded SHA-256 (contents replaced)")
    return ids, tensors, record.get("info", {})


def _write_entry(path: Path, ids: list[str], tensors: dict[str, torch.Tensor], meta: dict, info: dict) -> None:
    """Tensors first, then the record naming them; a failure in either leaves no entry behind."""
    side = path.with_suffix(".json")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        with atomic_path(side) as tmp:
            tmp.write_text(dumps({"ids": ids, "meta": meta, "tensors": _tensor_record(tensors), "info": info}))
    except BaseException:
        for p in (path, side):
            p.unlink(missing_ok=True)
        raise


def _try_load(path: Path, meta: dict, expected_ids: list[str],
              what: str = "feature cache") -> tuple[list[str], dict, dict] | None:
    if not path.is_file():
        return None
    try:
        return _load_entry(path, meta, expected_ids)
    except _Unusable as exc:  # a damaged or mismatched entry is recomputed, never trusted
        warnings.warn(f"recomputing {what} entry {path}: {exc}", stacklevel=4)
        return None


def _merge_info(infos: list[dict]) -> dict:
    """Shard infos -> one: the same engine, fidelity pooled over the shards' probe batches."""
    infos = [i for i in infos if i]
    if not infos:
        return {}
    out = dict(infos[0])
    fids = [i["fidelity"] for i in infos if i.get("fidelity")]
    if fids:
        n = sum(f["n"] for f in fids)
        out["fidelity"] = {"cos_mean": sum(f["cos_mean"] * f["n"] for f in fids) / n,
                           "cos_min": min(f["cos_min"] for f in fids),
                           "max_abs_diff": max(f["max_abs_diff"] for f in fids), "n": n}
    return out


Compute = Callable[[int, int], tuple[list[str], dict[str, torch.Tensor], dict]]


def _cached(path: Path, compute: Compute, meta: dict, sample_ids: list[str], batch_size: int,
            shard: Shard | None = None) -> tuple[list[str], dict[str, torch.Tensor], dict, bool]:
    """Load ``path`` if present and verified, else compute rows [0, n) and write it atomically.

    ``compute(lo, hi)`` embeds samples[lo:hi]. With a ``shard``, each rank computes its block of whole
    batches into its own shard file (atomic, verified, reused by a rerun), and rank 0 merges them into
    the same entry one process would write. Returns (ids, tensors, info, hit).
    """
    n = len(sample_ids)
    hit = _try_load(path, meta, sample_ids)
    if hit is not None:
        return (*hit, True)
    if shard is None:
        ids, tensors, info = compute(0, n)
        _write_entry(path, ids, tensors, meta, info)
        return ids, tensors, info, False
    folder = path.parent / "shards" / path.stem

    def shard_path(rank: int) -> Path:
        return folder / f"rank{rank}-of{shard.world}-b{batch_size}.safetensors"

    def shard_meta(rank: int) -> dict:
        lo, hi = Shard(rank, shard.world).batch_range(n, batch_size)
        return {**meta, "shard": [rank, shard.world, batch_size, lo, hi]}

    def shard_ids(rank: int) -> list[str]:
        lo, hi = Shard(rank, shard.world).batch_range(n, batch_size)
        return sample_ids[lo:hi]

    mine = shard_path(shard.rank)
    if _try_load(mine, shard_meta(shard.rank), shard_ids(shard.rank), "feature shard") is None:  # reuse finished
        lo, hi = shard.batch_range(n, batch_size)
        ids, tensors, info = compute(lo, hi) if hi > lo else ([], {}, {})
        if ids:
            _write_entry(mine, ids, tensors, shard_meta(shard.rank), info)
        else:  # an empty block (more ranks than batches): an empty marker so rank 0 knows it is done
            _write_entry(mine, [], {"x": torch.zeros(0)}, shard_meta(shard.rank), {})
    shard.barrier()
    if shard.is_main:
        parts = []
        for rank in range(shard.world):
            loaded = _try_load(shard_path(rank), shard_meta(rank), shard_ids(rank), "feature shard")
            if loaded is None:
                raise ResourceError(f"feature shard of rank {rank} is missing under {folder}",
                                    hint="with several nodes, --cache-dir must be on a filesystem all nodes share")
            parts.append(loaded)
        parts = [p for p in parts if p[0]]
        ids = [i for p in parts for i in p[0]]
        tensors = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        _write_entry(path, ids, tensors, meta, _merge_info([p[2] for p in parts]))
        shutil.rmtree(folder, ignore_errors=True)
    shard.barrier()
    loaded = _try_load(path, meta, sample_ids)
    if loaded is None:
        raise ResourceError(f"merged feature entry {path} is not readable on rank {shard.rank}",
                            hint="with several nodes, --cache-dir must be on a filesystem all nodes share")
    return (*loaded, False)


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


def _dtype_key(dtype: torch.dtype | str, device: torch.device, calib: list[Sample]) -> dict:
    """Key fields of the numeric mode. fp32 keeps the historical key (both exact engines share it)."""
    if dtype == "int8":
        from .engines.int8 import INT8_RECIPE

        return {"dtype": "int8", "int8": INT8_RECIPE, "calibration": _calibration_id(calib)}
    if dtype == torch.bfloat16 and device.type == "cpu":
        return {"dtype": str(dtype), "bf16": "cpu-autocast"}
    return {"dtype": str(dtype)}


def _tower(backbone: VisionLanguageBackbone, tower: str, dtype: torch.dtype | str, dataset: ImageDataset,
           calib: list[Sample], cache_dir: str | Path) -> tuple[Callable, Callable | None, dict]:
    """(function to run, exact reference for the fidelity probe or None, info recorded with the entry)."""
    exact = backbone.encode_images if tower == "image" else backbone.image_tokens
    if dtype == "int8":
        from .engines.int8 import int8_tower

        def calib_pixels() -> torch.Tensor:
            return torch.stack([backbone.preprocess(dataset.load_image(s)) for s in calib])

        run = int8_tower(backbone, tower, cache_dir, calib_pixels, _calibration_id(calib))
        return run, exact, {"engine": "onnx-int8"}
    if dtype == torch.bfloat16 and backbone.device.type == "cpu":
        from .engines.bf16 import bf16_tower

        run = bf16_tower(backbone, tower)
        return run, exact, {"engine": run.describe()}
    return exact, None, {"engine": backbone.active_engine(tower)}


def _calibration_samples(dataset: ImageDataset, samples: list[Sample], k: int = 64) -> list[Sample]:
    """Images that calibrate the int8 activation ranges: ``k`` evenly spaced images of the dataset's train
    split (so every split of a dataset is embedded by the same quantised model), else of ``samples``.
    Labels are never read."""
    pool = dataset.samples("train") if "train" in dataset.splits() else samples
    step = max(1, len(pool) // k)
    return pool[::step][:k]


def _calibration_id(calib: list[Sample]) -> str:
    return stable_hash(_sample_signature(calib), 24)


def _report_fidelity(info: dict, what: str, progress: bool) -> None:
    fid = info.get("fidelity")
    if fid and progress:
        sys.stderr.write(f"{what}: {info.get('engine')} vs exact fp32 on {fid['n']} images: cosine mean "
                         f"{fid['cos_mean']:.5f} / min {fid['cos_min']:.5f}\n")


def extract_features(backbone: VisionLanguageBackbone, dataset: ImageDataset, split: str, *,
                     samples: list[Sample] | None = None, augment_views: int = 0, augment_seed: int = 0,
                     cache_dir: str | Path = DEFAULT_CACHE_DIR, batch_size: int = 64, device: str | None = None,
                     dtype: str | torch.dtype | None = None, num_workers: int | None = None,
                     skip_corrupt: bool = False, progress: bool = True, decode: str = "pil",
                     shard: bool | None = None, decode_threads: int | None = None) -> FeatureSet:
    """Embeddings of ``samples`` (default: the whole split), plus ``augment_views`` augmented views.

    Eval features use ``backbone.preprocess``; views use ``backbone.augment_preprocess()`` with a seed per
    (augment_seed, view, sample id), so they are reproducible and independent of batching or workers.
    ``decode="tensor"`` decodes JPEGs with torchvision on the backbone's device (batched nvJPEG on GPU)
    for the eval features; it is a distinct preprocessing pipeline with its own cache key.
    ``dtype``: fp32 (exact, default), bf16 (GPU autocast; on CPU autocast + torch.compile), fp16 (GPU),
    int8 (CPU, ONNX Runtime static QDQ with the first layers in fp32); the reduced modes have their own
    cache keys and record their fidelity against fp32. ``num_workers``: loader processes (``None``: none on
    CPU, every core but one on a GPU); without them, ``decode_threads`` threads (``None``: one per 8 cores
    when there is more than one batch) decode the next batches while the tower runs, 0 decodes between tower
    calls. Neither changes a number. Under ``accelerate launch`` / ``torchrun`` each rank embeds a shard and rank 0
    merges them (``shard=False`` turns that off).
    """
    opts = ExtractOptions(cache_dir, batch_size, device, dtype, num_workers, skip_corrupt, progress, decode,
                          decode_threads)
    ranks = current_shard(shard)
    if device is not None:
        backbone.to(device)
    elif ranks is not None and backbone.device.type == "cuda" and backbone.device.index is None:
        backbone.to(f"cuda:{ranks.local_rank}")  # one GPU per rank on each node
    samples = dataset.samples(split) if samples is None else samples
    if not samples:
        raise DatasetError(f"no samples to embed in {dataset.name}/{split}", hint="check the split name and folder")
    dt = _resolve_dtype(dtype, backbone.device)
    root = Path(cache_dir) / "features"
    calib = _calibration_samples(dataset, samples) if dt == "int8" else []
    sample_ids = [s.id for s in samples]

    def embed(transform, seed, desc):
        def compute(lo: int, hi: int):
            fn, ref, info = _tower(backbone, "image", dt, dataset, calib, cache_dir)
            part = samples[lo:hi]
            kept, out, fidelity = _run_tower(backbone, dataset, part, transform, fn, opts, seed, desc, ref)
            if fidelity:
                info = {**info, "fidelity": fidelity}
            return [part[i].id for i in kept], {"x": out}, info
        return compute

    meta = _key_meta(backbone, dataset, split, samples, _pipeline(backbone, decode), "eval", dt, skip_corrupt)
    meta.update(_dtype_key(dt, backbone.device, calib))
    ids, tensors, info, _ = _cached(root / f"{stable_hash(meta)}.safetensors",
                                    embed(backbone.preprocess, None, f"embed {dataset.name}/{split}"), meta,
                                    sample_ids, batch_size, ranks)
    _report_fidelity(info, f"{dataset.name}/{split}", progress)
    feats = tensors["x"]
    views = None
    if augment_views > 0:
        opts.decode = "pil"  # random crops run on PIL images
        aug = backbone.augment_preprocess()
        per_view = []
        for v in range(augment_views):
            # same key fields as the eval entry (sample signature computed once), other pipeline and view
            vmeta = {**meta, "kind": "augment", "pipeline": describe(aug), "view": v, "augment_seed": augment_seed}
            vids, vt, _, _ = _cached(root / f"{stable_hash(vmeta)}.safetensors",
                                     embed(aug, augment_seed * 1000 + v, f"view {v + 1}/{augment_views}"), vmeta,
                                     sample_ids, batch_size, ranks)
            if vids != ids:  # only possible when corrupt images were skipped
                raise DatasetError("augmented views and eval features cover different images",
                                   hint="remove the unreadable files instead of skipping them")
            per_view.append(vt["x"])
        views = torch.stack(per_view)
    id_to_label = {s.id: s.label for s in samples}
    return FeatureSet(features=feats, labels=torch.tensor([id_to_label[i] for i in ids], dtype=torch.long),
                      ids=ids, classnames=list(dataset.classnames), views=views,
                      meta={**meta, "augment_views": augment_views, "augment_seed": augment_seed,
                            "stand_in": backbone.is_stand_in, "engine": info.get("engine"),
                            "fidelity": info.get("fidelity")})


def extract_tokens(backbone: VisionLanguageBackbone, dataset: ImageDataset, split: str, *,
                   samples: list[Sample] | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                   batch_size: int = 64, device: str | None = None, dtype: str | torch.dtype | None = None,
                   num_workers: int | None = None, skip_corrupt: bool = False, progress: bool = True,
                   token_dtype: torch.dtype = torch.float16, shard: bool | None = None,
                   decode_threads: int | None = None) -> tuple[list[str], torch.Tensor]:
    """Patch/spatial tokens (N, T, token_dim) of ``samples`` (for the X-adapter V-expert), cached; sharded
    under a multi-process launcher like `extract_features`."""
    opts = ExtractOptions(cache_dir, batch_size, device, dtype, num_workers, skip_corrupt, progress,
                          decode_threads=decode_threads)
    ranks = current_shard(shard)
    if device is not None:
        backbone.to(device)
    elif ranks is not None and backbone.device.type == "cuda" and backbone.device.index is None:
        backbone.to(f"cuda:{ranks.local_rank}")
    samples = dataset.samples(split) if samples is None else samples
    if not samples:
        raise DatasetError(f"no samples to embed in {dataset.name}/{split}", hint="check the split name and folder")
    dt = _resolve_dtype(dtype, backbone.device)
    meta = _key_meta(backbone, dataset, split, samples, describe(backbone.preprocess), "tokens", dt, skip_corrupt,
                     token_dtype=str(token_dtype))
    calib = _calibration_samples(dataset, samples) if dt == "int8" else []
    meta.update(_dtype_key(dt, backbone.device, calib))

    def compute(lo: int, hi: int):
        fn, ref, info = _tower(backbone, "tokens", dt, dataset, calib, cache_dir)
        part = samples[lo:hi]
        kept, out, fidelity = _run_tower(backbone, dataset, part, backbone.preprocess, fn, opts, None,
                                         f"tokens {dataset.name}/{split}", ref)
        if fidelity:
            info = {**info, "fidelity": fidelity}
        return [part[i].id for i in kept], {"x": out.to(token_dtype)}, info

    ids, tensors, info, _ = _cached(Path(cache_dir) / "features" / f"{stable_hash(meta)}.safetensors", compute,
                                    meta, [s.id for s in samples], batch_size, ranks)
    _report_fidelity(info, f"tokens {dataset.name}/{split}", progress)
    return ids, tensors["x"]
