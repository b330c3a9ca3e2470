"""Retrieval bank for the X-adapter: the image pool that texts retrieve images from (papers.md A.5).

A bank is a directory holding, for every image of a pool (a dataset split):

  bank.json               meta: backbone spec + fingerprint, dim, token shape, size, dataset, split,
                          index kind/nlist/nprobe, build id, creation time, file checksums
  embeddings.safetensors  ``embeddings`` (N, D) float32, L2-normalised pooled image embeddings, and
                          (unless built with ``with_tokens=False``) ``tokens`` (N, T, token_dim) float16
  index.faiss             a FAISS inner-product index over the embeddings: exact (``IndexFlatIP``)
                          or IVF (``IndexIVFFlat``, inner product)

Retrieval is cosine similarity between an L2-normalised query (normally the CLIP text embedding of
the *masked* input text, see A.5 "leakage caution") and the pool's L2-normalised image embeddings.

Every file is written to a temporary name and moved into place with ``os.replace`` only after all of
them were written, ``bank.json`` last; ``bank.json`` names the build id stored inside the embeddings
file and the SHA-256 of the index file, so a build killed at any point never leaves a bank that
loads: either the old bank is intact, or loading fails with a message that says to rebuild.

Image features come from `xmodal.features` (the single place that runs an image tower over data);
this module only stores, indexes and searches them.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import struct
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from ...errors import CacheMismatchError, ShapeError, XmodalError
from ...filemode import apply_umask

FORMAT_VERSION = 1
META_FILE = "bank.json"
ARRAYS_FILE = "embeddings.safetensors"
INDEX_FILE = "index.faiss"
INDEX_KINDS = ("exact", "ivf")
_ST_DTYPES = {"F32": np.float32, "F16": np.float16}


class RetrievalBankError(XmodalError):
    """A retrieval bank is missing, incomplete, inconsistent, or used in a way it does not support."""


class BankNotFoundError(RetrievalBankError, FileNotFoundError):
    """No (complete) retrieval bank at the given directory."""


def _build_hint(directory: Path | str) -> str:
    return (
        f"Build one with `xmodal xadapter bank --backbone SPEC --data DATASET_SPEC --out {directory}` "
        "or `RetrievalBank.build(backbone, dataset, out_dir)`."
    )


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def default_nlist(n: int) -> int:
    """IVF list count for ``n`` vectors: about 4·sqrt(n), capped at n/39 so that k-means training
    sees at least 39 points per centroid (FAISS's own warning threshold); at least 1."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def exact_topk(pool: torch.Tensor, query: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force inner-product top-k of ``query`` (N, D) against ``pool`` (M, D), in float32."""
    pool = pool.float()
    scores, indices = [], []
    for start in range(0, query.shape[0], chunk):
        s, i = (query[start : start + chunk].float().to(pool.device) @ pool.T).topk(k, dim=1)
        scores.append(s)
        indices.append(i)
    if not scores:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(scores), torch.cat(indices)


def recall_at_k(approx_indices: torch.Tensor, exact_indices: torch.Tensor) -> float:
    """Mean fraction of each query's exact top-k neighbours found by the approximate search.

    Both are (N, k) index tensors (the approximate one may have more columns than the exact one,
    for recall k@k' variants). Returns a float in [0, 1]; 1.0 for N = 0.
    """
    approx = torch.as_tensor(approx_indices).long().cpu()
    exact = torch.as_tensor(exact_indices).long().cpu()
    if approx.ndim != 2 or exact.ndim != 2 or approx.shape[0] != exact.shape[0]:
        raise ShapeError(f"recall_at_k needs two (N, k) index tensors with the same N, got "
                         f"{tuple(approx.shape)} and {tuple(exact.shape)}")
    if approx.shape[0] == 0 or exact.shape[1] == 0:
        return 1.0
    hits = (approx[:, :, None] == exact[:, None, :]).any(1)  # (N, k_exact): exact neighbour found?
    return float(hits.float().mean())


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise RetrievalBankError(f"{path} is truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise RetrievalBankError(f"{path} is not a safetensors file (header length {length})")
        header = json.loads(fh.read(length))
    return header, 8 + length


def _memmap_tensor(path: Path, header: dict, data_start: int, key: str) -> np.memmap:
    info = header[key]
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise RetrievalBankError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize != end - begin:
        raise RetrievalBankError(f"{path}: tensor {key!r} size does not match its shape {shape}")
    if end == begin:
        return np.zeros(shape, dtype=dtype)  # np.memmap cannot map zero bytes
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _stage(path: Path, write: Callable[[Path], None], staged: list[Path]) -> Path:
    """Write ``path``'s new content to a temporary sibling (fsynced) and remember it in ``staged``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staged.append(tmp)
    write(tmp)
    apply_umask(tmp)   # safetensors writes 0600; the bank gets the mode any file the user creates gets
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    return tmp


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _gpu_id(device: Any) -> int | None:
    """The CUDA device id to put a FAISS index on, or None to stay on CPU."""
    if device is None:
        return None
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    try:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= 0:
            return None
    except Exception:  # pragma: no cover - CPU builds without the GPU symbols
        return None
    return dev.index or 0


def _set_nprobe(index: Any, nprobe: int) -> None:
    if hasattr(faiss, "GpuParameterSpace") and "Gpu" in type(index).__name__:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe


def _as_index_kind(index: str) -> str:
    kind = str(index).lower()
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {index!r}; choose one of {', '.join(INDEX_KINDS)}")
    return kind


# ----------------------------------------------------------------------------------------------
# the bank
# ----------------------------------------------------------------------------------------------
class RetrievalBank:
    """A searchable pool of image embeddings (and image tokens) for text-to-image retrieval.

    Build with `RetrievalBank.build` (from a backbone and a dataset split) or
    `RetrievalBank.from_embeddings` (from precomputed vectors); open an existing one with
    `RetrievalBank.load`. Attributes: ``meta`` (dict, see module doc), ``ids`` (sample ids of the
    pool, row order), ``directory``.
    """

    def __init__(self, directory: Path, meta: dict, embeddings: torch.Tensor, tokens: np.ndarray | None,
                 ids: list[str], index: Any, gpu_resources: Any = None) -> None:
        self.directory = Path(directory)
        self.meta = meta
        self.ids = ids
        self._embeddings = embeddings  # (N, D) float32, CPU
        self._tokens = tokens  # (N, T, Dt) float16 memmap, or None
        self._index = index
        self._gpu_resources = gpu_resources  # must outlive a GPU index
        self._nprobe = int(meta.get("nprobe") or 1)

    # ----- properties ---------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.meta["size"])

    def __repr__(self) -> str:
        extra = f", nlist={self.meta['nlist']}, nprobe={self.nprobe}" if self.index_kind == "ivf" else ""
        return (f"RetrievalBank({str(self.directory)!r}, size={len(self)}, dim={self.dim}, "
                f"index={self.index_kind!r}{extra}, tokens={self.has_tokens})")

    @property
    def size(self) -> int:
        return len(self)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def token_dim(self) -> int | None:
        return self.meta.get("token_dim")

    @property
    def num_tokens(self) -> int | None:
        return self.meta.get("num_tokens")

    @property
    def has_tokens(self) -> bool:
        return self._tokens is not None

    @property
    def index_kind(self) -> str:
        return self.meta["index"]

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    @property
    def nprobe(self) -> int:
        """IVF lists probed per query (ignored by the exact index). Settable."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        value = int(value)
        if value < 1:
            raise ValueError(f"nprobe must be >= 1, got {value}")
        self._nprobe = value
        _set_nprobe(self._index, value)

    # ----- building -----------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        backbone,
        dataset,
        out_dir: str | os.PathLike,
        *,
        split: str = "train",
        index: str = "exact",
        nlist: int | None = None,
        nprobe: int = 8,
        with_tokens: bool = True,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        cache_dir: str | os.PathLike = ".xmodal-cache",
        samples: Sequence | None = None,
        num_workers: int = 0,
        skip_corrupt: bool = False,
        dataset_spec: str | None = None,
        progress: bool = True,
    ) -> "RetrievalBank":
        """Embed every image of ``dataset``'s ``split`` (or the given ``samples``) with ``backbone``
        through `xmodal.features` (cached), then index and store them in ``out_dir``.

        ``dataset_spec`` is recorded in the meta (defaults to ``dataset.spec`` or ``dataset.name``).
        """
        kind = _as_index_kind(index)
        from ...features import extract_features, extract_tokens

        common = dict(samples=samples, cache_dir=cache_dir, batch_size=batch_size, device=device,
                      dtype=dtype, num_workers=num_workers, skip_corrupt=skip_corrupt, progress=progress)
        fs = extract_features(backbone, dataset, split, **common)
        tokens = None
        if with_tokens:
            token_ids, tokens = extract_tokens(backbone, dataset, split, token_dtype=torch.float16, **common)
            if list(token_ids) != list(fs.ids):
                row = {sid: r for r, sid in enumerate(token_ids)}
                missing = [sid for sid in fs.ids if sid not in row]
                if missing:
                    raise RetrievalBankError(
                        f"{len(missing)} images have embeddings but no tokens (e.g. {missing[:3]}); "
                        "feature and token extraction disagree on the sample list")
                tokens = tokens[torch.tensor([row[sid] for sid in fs.ids], dtype=torch.long)]
        meta = {
            "backbone": getattr(backbone, "spec", None),
            "fingerprint": backbone.fingerprint(),
            "stand_in": bool(getattr(backbone, "is_stand_in", False)),
            "dataset": dataset_spec or getattr(dataset, "spec", None) or getattr(dataset, "name", type(dataset).__name__),
            "split": split,
        }
        target_device = device if device is not None else getattr(backbone, "device", None)
        from ...shards import current_shard

        ranks = current_shard()  # under torchrun / accelerate: extraction was sharded, rank 0 writes the bank
        if ranks is not None and not ranks.is_main:
            ranks.barrier()
            return cls.load(out_dir, device=target_device)
        bank = cls.from_embeddings(fs.features, out_dir, ids=list(fs.ids), tokens=tokens, index=kind,
                                   nlist=nlist, nprobe=nprobe, meta=meta, device=target_device)
        if ranks is not None:
            ranks.barrier()
        return bank

    @classmethod
    def from_embeddings(
        cls,
        embeddings: torch.Tensor,
        out_dir: str | os.PathLike,
        *,
        ids: Sequence[str] | None = None,
        tokens: torch.Tensor | None = None,
        index: str = "exact",
        nlist: int | None = None,
        nprobe: int = 8,
        device: str | torch.device | None = None,
        meta: dict | None = None,
    ) -> "RetrievalBank":
        """Index and store precomputed (N, D) image embeddings (L2-normalised here) and optional
        (N, T, token_dim) tokens. ``meta`` adds provenance (backbone, fingerprint, dataset, split)."""
        kind = _as_index_kind(index)
        emb = torch.as_tensor(embeddings).detach().float().cpu()
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ShapeError(f"bank embeddings must be a non-empty (N, D) tensor, got {tuple(emb.shape)}")
        if not torch.isfinite(emb).all():
            raise ShapeError("bank embeddings contain NaN or infinite values")
        emb = F.normalize(emb, dim=-1).contiguous()
        n, d = emb.shape
        ids = [f"#{i}" for i in range(n)] if ids is None else [str(i) for i in ids]
        if len(ids) != n:
            raise ShapeError(f"{len(ids)} ids for {n} embeddings")
        if tokens is not None:
            tokens = torch.as_tensor(tokens).detach()
            if tokens.ndim != 3 or tokens.shape[0] != n:
                raise ShapeError(f"tokens must be ({n}, T, token_dim), got {tuple(tokens.shape)}")
            tokens = tokens.to("cpu", torch.float16).contiguous()
        nprobe = int(nprobe)
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")

        gpu_id = _gpu_id(device)
        res = faiss.StandardGpuResources() if gpu_id is not None else None
        x = emb.numpy()
        if kind == "exact":
            cpu_index = faiss.IndexFlatIP(d)
            nlist = None
            work = faiss.index_cpu_to_gpu(res, gpu_id, cpu_index) if res is not None else cpu_index
            work.add(x)
        else:
            nlist = default_nlist(n) if nlist is None else int(nlist)
            if not 1 <= nlist <= n:
                raise ValueError(f"nlist must be between 1 and the pool size {n}, got {nlist}")
            if 39 * nlist > n:
                warnings.warn(f"nlist={nlist} gives fewer than 39 training points per IVF list for "
                              f"{n} vectors; k-means may be poor (default for this size: {default_nlist(n)})",
                              stacklevel=2)
            quantizer = faiss.IndexFlatIP(d)
            cpu_index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            work = faiss.index_cpu_to_gpu(res, gpu_id, cpu_index) if res is not None else cpu_index
            work.train(x)
            work.add(x)
            _set_nprobe(work, nprobe)
        to_save = faiss.index_gpu_to_cpu(work) if res is not None else work
        if kind == "ivf":
            _set_nprobe(to_save, nprobe)

        full_meta = {
            "format": FORMAT_VERSION,
            "backbone": None, "fingerprint": None, "stand_in": None, "dataset": None, "split": None,
            **(meta or {}),
            "dim": d,
            "size": n,
            "with_tokens": tokens is not None,
            "num_tokens": int(tokens.shape[1]) if tokens is not None else None,
            "token_dim": int(tokens.shape[2]) if tokens is not None else None,
            "index": kind,
            "metric": "inner_product",
            "normalised": True,
            "nlist": nlist,
            "nprobe": nprobe if kind == "ivf" else None,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _write_bank(Path(out_dir), full_meta, emb, tokens, ids, to_save)
        return cls.load(out_dir, device=device)

    # ----- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike, backbone=None, *, device: str | torch.device | None = None) -> "RetrievalBank":
        """Open a bank. With ``backbone``, its fingerprint must match the bank's
        (`CacheMismatchError` otherwise). ``device`` (default: the backbone's) = cuda puts the FAISS
        index on the GPU when GPU FAISS is installed."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not directory.is_dir():
            raise BankNotFoundError(f"no retrieval bank at {directory}: the directory does not exist. {_build_hint(directory)}")
        if not meta_path.is_file():
            raise BankNotFoundError(f"no retrieval bank at {directory}: {META_FILE} is missing "
                                    f"(never built, or the build did not finish). {_build_hint(directory)}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise RetrievalBankError(f"cannot read {meta_path}: {exc}. Rebuild the bank. {_build_hint(directory)}") from exc
        if meta.get("format") != FORMAT_VERSION:
            raise RetrievalBankError(f"{meta_path} has bank format {meta.get('format')!r}; this xmodal reads "
                                     f"format {FORMAT_VERSION}. Rebuild the bank. {_build_hint(directory)}")
        if backbone is not None:
            check_backbone(meta, backbone, directory)
            if device is None:
                device = getattr(backbone, "device", None)
        for name in (ARRAYS_FILE, INDEX_FILE):
            if not (directory / name).is_file():
                raise BankNotFoundError(f"retrieval bank at {directory} is incomplete: {name} is missing. "
                                        f"Rebuild it. {_build_hint(directory)}")
        files = meta.get("files", {})

        # arrays: embeddings read into memory, tokens memory-mapped
        arrays_path = directory / ARRAYS_FILE
        header, data_start = _read_safetensors_header(arrays_path)
        build_id = header.get("__metadata__", {}).get("build_id")
        if build_id != meta.get("build_id"):
            raise RetrievalBankError(
                f"retrieval bank at {directory} is inconsistent: {ARRAYS_FILE} belongs to build {build_id}, "
                f"{META_FILE} to build {meta.get('build_id')} (an interrupted build?). Rebuild it. {_build_hint(directory)}")
        n, d = int(meta["size"]), int(meta["dim"])
        emb = torch.from_numpy(np.array(_memmap_tensor(arrays_path, header, data_start, "embeddings"), dtype=np.float32))
        if tuple(emb.shape) != (n, d):
            raise RetrievalBankError(f"{arrays_path}: embeddings shape {tuple(emb.shape)} != ({n}, {d}) in {META_FILE}")
        tokens = None
        if meta.get("with_tokens"):
            if "tokens" not in header:
                raise RetrievalBankError(f"{arrays_path} has no tokens although {META_FILE} says it should. Rebuild it.")
            tokens = _memmap_tensor(arrays_path, header, data_start, "tokens")
            if tokens.shape[0] != n:
                raise RetrievalBankError(f"{arrays_path}: tokens have {tokens.shape[0]} rows, expected {n}")
        ids = json.loads(header.get("__metadata__", {}).get("ids", "null")) or meta.get("ids")
        if not isinstance(ids, list) or len(ids) != n:
            raise RetrievalBankError(f"{arrays_path}: sample ids missing or not {n} long. Rebuild it.")

        # index: checksum, then deserialise from the same bytes
        index_bytes = (directory / INDEX_FILE).read_bytes()
        digest = hashlib.sha256(index_bytes).hexdigest()
        if digest != files.get(INDEX_FILE, {}).get("sha256"):
            raise RetrievalBankError(
                f"retrieval bank at {directory} is inconsistent: {INDEX_FILE} does not match the checksum in "
                f"{META_FILE} (an interrupted build, or files copied from another bank?). Rebuild it. {_build_hint(directory)}")
        index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
        if index.ntotal != n or index.d != d:
            raise RetrievalBankError(f"{directory / INDEX_FILE}: index holds {index.ntotal} vectors of dim {index.d}, "
                                     f"expected {n} of dim {d}")
        gpu_id = _gpu_id(device)
        res = None
        if gpu_id is not None:
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, gpu_id, index)
        bank = cls(directory, meta, emb, tokens, ids, index, gpu_resources=res)
        if meta["index"] == "ivf":
            bank.nprobe = int(meta.get("nprobe") or 1)
        return bank

    # ----- searching ----------------------------------------------------------------------
    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` pool images for each (N, D) query by cosine similarity (queries are
        L2-normalised here). Returns (N, k) float32 scores, best first, and (N, k) int64 row
        indices into the pool, both on the query's device.

        With an IVF index, a query whose probed lists hold fewer than ``k`` vectors falls back to
        exact search, so indices are always valid rows.
        """
        k = int(k)
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be between 1 and the bank size {len(self)}, got {k}")
        query = torch.as_tensor(query)
        if query.ndim != 2 or query.shape[1] != self.dim:
            raise ShapeError(f"queries must be (N, {self.dim}), got {tuple(query.shape)}")
        out_device = query.device
        q = F.normalize(query.detach().float(), dim=-1).cpu().contiguous()
        if q.shape[0] == 0:
            return torch.empty(0, k, device=out_device), torch.empty(0, k, dtype=torch.long, device=out_device)
        scores_np, idx_np = self._index.search(q.numpy(), k)
        scores = torch.from_numpy(np.ascontiguousarray(scores_np, dtype=np.float32))
        indices = torch.from_numpy(np.ascontiguousarray(idx_np)).long()
        short = (indices < 0).any(1)
        if bool(short.any()):
            s, i = exact_topk(self._embeddings, q[short], k)
            scores[short], indices[short] = s, i
        return scores.to(out_device), indices.to(out_device)

    def search_texts(self, backbone, texts: Sequence[str], k: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed ``texts`` with ``backbone``'s text tower (must be the bank's backbone) and search.

        For MLM, pass the *masked* text (A.5 leakage caution)."""
        check_backbone(self.meta, backbone, self.directory)
        texts = list(texts)
        if not texts:
            return self.search(torch.empty(0, self.dim), k)
        parts = [backbone.encode_texts(texts[s : s + batch_size]).float().cpu() for s in range(0, len(texts), batch_size)]
        scores, indices = self.search(torch.cat(parts), k)
        device = getattr(backbone, "device", None) or torch.device("cpu")
        return scores.to(device), indices.to(device)

    def _rows(self, indices: torch.Tensor) -> torch.Tensor:
        indices = torch.as_tensor(indices)
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ShapeError(f"indices must be an integer tensor, got {indices.dtype}")
        flat = indices.reshape(-1).long().cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= len(self)):
            raise IndexError(f"bank indices must lie in [0, {len(self)}); got range "
                             f"[{int(flat.min())}, {int(flat.max())}]")
        return flat

    def embeddings(self, indices: torch.Tensor) -> torch.Tensor:
        """Pooled image embeddings of the given rows: (..., ) indices -> (..., D) float32, on the
        indices' device. Typically (N, k) -> (N, k, D)."""
        indices = torch.as_tensor(indices)
        flat = self._rows(indices)
        return self._embeddings[flat].reshape(*indices.shape, self.dim).to(indices.device)

    def tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Image tokens of the given rows: (N, k) -> (N, k, T, token_dim) float32 (stored fp16),
        on the indices' device."""
        if self._tokens is None:
            raise RetrievalBankError(
                f"retrieval bank at {self.directory} was built without image tokens (with_tokens=False / "
                "--no-tokens); rebuild it without --no-tokens, or use bank.embeddings(...) (pooled vectors)")
        indices = torch.as_tensor(indices)
        flat = self._rows(indices).numpy()
        t, dt = self._tokens.shape[1:]
        rows = np.asarray(self._tokens[flat], dtype=np.float32)
        return torch.from_numpy(rows).reshape(*indices.shape, t, dt).to(indices.device)

    def all_embeddings(self) -> torch.Tensor:
        """The whole (N, D) float32 embedding matrix (CPU; do not modify)."""
        return self._embeddings


def check_backbone(meta: dict, backbone, directory: Path | str) -> None:
    """Raise `CacheMismatchError` unless ``backbone``'s fingerprint is the one the bank was built with."""
    got = backbone.fingerprint()
    want = meta.get("fingerprint")
    if got != want:
        raise CacheMismatchError(
            f"retrieval bank at {directory} was built with backbone {meta.get('backbone')!r} "
            f"(fingerprint {want}), but the given backbone {getattr(backbone, 'spec', '?')!r} has fingerprint "
            f"{got}. Load it with the same backbone, or rebuild the bank with "
            f"`xmodal xadapter bank --backbone {getattr(backbone, 'spec', 'SPEC')} ... --out {directory}`.")


def _write_bank(out_dir: Path, meta: dict, emb: torch.Tensor, tokens: torch.Tensor | None,
                ids: list[str], index: Any) -> None:
    """Stage all three files under temporary names, then move them into place, ``bank.json`` last."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    build_id = uuid.uuid4().hex
    staged: list[Path] = []
    try:
        tensors = {"embeddings": emb}
        if tokens is not None:
            tensors["tokens"] = tokens
        arrays_tmp = _stage(out_dir / ARRAYS_FILE, lambda p: save_file(
            tensors, str(p), metadata={"build_id": build_id, "format": "xmodal-retrieval-bank",
                                       "ids": json.dumps(ids)}), staged)
        index_bytes = faiss.serialize_index(index).tobytes()
        index_tmp = _stage(out_dir / INDEX_FILE, lambda p: p.write_bytes(index_bytes), staged)
        meta = {**meta, "build_id": build_id, "files": {
            ARRAYS_FILE: {"bytes": arrays_tmp.stat().st_size},
            INDEX_FILE: {"bytes": len(index_bytes), "sha256": hashlib.sha256(index_bytes).hexdigest()},
        }}
        meta_tmp = _stage(out_dir / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"), staged)
        # commit: data files first, bank.json (which names this build) last
        os.replace(arrays_tmp, out_dir / ARRAYS_FILE)
        os.replace(index_tmp, out_dir / INDEX_FILE)
        os.replace(meta_tmp, out_dir / META_FILE)
        staged.clear()
        _fsync_dir(out_dir)
    finally:
        for tmp in staged:
            try:
                tmp.unlink()
            except OSError:
                pass


__all__ = [
    "RetrievalBank", "RetrievalBankError", "BankNotFoundError", "recall_at_k", "exact_topk",
    "default_nlist", "check_backbone",
]
