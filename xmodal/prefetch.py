"""In-process loading that hides decoding behind the tower: the next batches are decoded and transformed in
threads while the image tower runs on the current one.

Why threads, not loader processes, on CPU: the tower already takes every core, PIL's decode and resize and
the tensor ops release the GIL, and a thread shares memory (no pickling of 64 x 3 x 224 x 224 floats per
batch, no fork). Why the last two steps are done per batch: ``ToTensor`` + ``Normalize`` on a stacked uint8
batch become one table lookup per pixel, the table made by the very same element-wise operations on the 256
possible bytes, so the pixels are bit-identical at a fraction of the cost.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision import transforms as T

Row = tuple[int, Any, "str | None"]  # (index, decoded item or None, error message or None)
Batch = tuple[torch.Tensor, "torch.Tensor | None", list[str]]  # (kept indices, pixels, error messages)


def split_transform(transform: Callable) -> tuple[Callable, Callable[[list], torch.Tensor]]:
    """(per-image part, batch finisher) of ``transform``. A ``Compose`` ending in ``ToTensor(), Normalize()``
    keeps its PIL steps per image and finishes whole batches of uint8 arrays; anything else runs whole per
    image and is stacked."""
    steps = list(getattr(transform, "transforms", []))
    if not (isinstance(transform, T.Compose) and len(steps) >= 2 and type(steps[-2]) is T.ToTensor
            and type(steps[-1]) is T.Normalize):
        return transform, torch.stack
    head, normalize = T.Compose(steps[:-2]), steps[-1]

    def per_image(img: Any) -> Any:
        img = head(img)
        if getattr(img, "mode", None) == "RGB":  # 8-bit, 3 channels: what the batch finisher's table is for
            return np.asarray(img)
        return T.ToTensor()(img)  # any other mode: ToTensor's own conversion for this image

    # ToTensor then Normalize map each byte v of channel c to ((v / 255) - mean_c) / std_c in float32: the
    # same operations on the 256 possible bytes give a per-channel table, and one lookup per pixel replaces
    # five passes over the batch with bit-identical results
    dtype = torch.get_default_dtype()
    levels = torch.arange(256, dtype=dtype).div(255)[None, :, None].expand(len(normalize.mean), 256, 1).contiguous()
    table = normalize(levels.clone())[:, :, 0].numpy()  # (channels, 256)

    def finish(items: list) -> torch.Tensor:
        if all(isinstance(x, np.ndarray) for x in items) and len({x.shape for x in items}) == 1 \
                and items[0].ndim == 3 and items[0].shape[2] == table.shape[0]:
            batch = np.stack(items)  # (N, H, W, C) uint8
            out = np.empty((batch.shape[0], batch.shape[3], batch.shape[1], batch.shape[2]), dtype=table.dtype)
            for c in range(table.shape[0]):
                np.take(table[c], batch[..., c], out=out[:, c])
            return torch.from_numpy(out)
        return torch.stack([normalize(T.ToTensor()(x)) if isinstance(x, np.ndarray) else normalize(x)
                            for x in items])

    return per_image, finish


def auto_decode_threads(n: int, batch_size: int, world: int = 1) -> int:
    """Threads that prepare upcoming batches: none when there is a single batch (nothing to overlap) or a
    single core (``world`` processes share the cores); else one per 8 cores (decode is about an eighth of
    the tower's work), at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, cores // max(1, world))
    if cores < 2 or n <= batch_size:
        return 0
    return max(1, cores // 8)


def prefetched_batches(rows: Callable[[int], Row], n: int, batch_size: int, threads: int,
                       finish: Callable[[list], torch.Tensor]) -> Iterator[Batch]:
    """Batches of rows ``0..n-1`` in order; with ``threads`` > 0, up to ``threads + 1`` batches are prepared
    ahead in worker threads while the caller works on the current one."""

    def make(lo: int) -> Batch:
        items = [rows(i) for i in range(lo, min(lo + batch_size, n))]
        kept = [(i, x) for i, x, _ in items if x is not None]
        errors = [e for _, x, e in items if x is None]
        if not kept:
            return torch.empty(0, dtype=torch.long), None, errors
        return torch.tensor([i for i, _ in kept]), finish([x for _, x in kept]), errors

    starts: Sequence[int] = range(0, n, batch_size)
    if threads <= 0:
        for lo in starts:
            yield make(lo)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="xmodal-decode")
    pending: deque[Future] = deque()
    upcoming = iter(starts)
    try:
        for lo in upcoming:
            pending.append(pool.submit(make, lo))
            if len(pending) > threads:
                break
        while pending:
            batch = pending.popleft().result()  # re-raises a decode error in the caller
            lo = next(upcoming, None)
            if lo is not None:
                pending.append(pool.submit(make, lo))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
