"""Micro-batching: images from concurrent requests share one forward pass.

Requests put their items on a bounded asyncio queue and await futures. One worker task takes the
first waiting item, gathers more until ``max_batch`` items or ``max_wait_ms`` have passed, and runs
the batch function in its own single-thread executor, so the event loop keeps accepting requests
(and decoding the next uploads) while the model runs, and the model never runs two batches at once.
A full queue is refused at once (``QueueFullError``) instead of letting latency grow without bound.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(Exception):
    """The server is at capacity; the client should retry later."""


@dataclass
class BatchStats:
    """Counters for ``/healthz``: how many batches ran and how large they were."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    busy_seconds: float = 0.0

    def add(self, n: int, seconds: float) -> None:
        self.batches += 1
        self.items += n
        self.largest = max(self.largest, n)
        self.busy_seconds += seconds


@dataclass
class MicroBatcher(Generic[T, R]):
    """``await submit(items)`` -> ``fn(batch)`` results for those items, batched with other callers.

    ``fn`` maps a list of items to a same-length sequence of results; it runs off the event loop.
    """

    fn: Callable[[list[T]], Sequence[R]]
    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the worker on the running loop (the app's lifespan calls this)."""
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xmodal-batch")
        self._task = asyncio.create_task(self._run(), name="xmodal-micro-batcher")

    async def stop(self) -> None:
        """Cancel the worker, fail whatever still waits, and release the executor."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(QueueFullError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._executor = None

    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue all ``items`` (or none of them, raising ``QueueFullError``) and wait for their results."""
        if self._queue is None or self._task is None or self._task.done():
            raise QueueFullError("the batcher is not running")
        if self._queue.qsize() + len(items) > self.max_queue:
            raise QueueFullError(f"{self._queue.qsize()} images are waiting (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, fut in zip(items, futures):  # no await in between: all or nothing
            self._queue.put_nowait((item, fut))
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_ms / 1000.0
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # callers that gave up are skipped
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
            except Exception as exc:  # a failing batch fails its callers, never the worker
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:
                self.stats.add(len(live), time.perf_counter() - t0)
            for (_, fut), result in zip(live, results):
                if not fut.done():
                    fut.set_result(result)
