"""Micro-batching: concurrent requests of the same shape share one UNet batch.

Requests wait in one FIFO queue. The worker takes the oldest request, gathers every queued
request with the same `BatchShape` (up to `max_batch` images, and up to `max_adapters` distinct
adapters: 1 keeps every batch to one adapter), waits at most `max_wait_s` after the oldest one
arrived for more to join, and runs the whole group in ONE call of `run_batch` on a single
dedicated thread (the accelerator is used by one batch at a time). Each request names its
adapter (`BASE` for the base model); `run_batch` gets one name per image, so each image's rows
run with its own adapter only. While a batch runs, new requests queue up and form the next
batch, so batches grow with load. A full queue refuses new work at once (`QueueFull`) instead
of letting callers hang.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from dreambooth_trainer.generate import ImageRequest

log = logging.getLogger(__name__)
R = TypeVar("R")
# The adapter name of a request for the base model (peft's name for "no adapter on this row").
BASE = "__base__"


class QueueFull(RuntimeError):
    """The queue holds `max_queue` requests already; the caller should retry later."""


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no more work."""


@dataclass(frozen=True)
class BatchShape:
    """What must match for requests to share a UNet batch."""

    steps: int
    guidance: float
    width: int
    height: int


@dataclass(eq=False)
class PendingJob(Generic[R]):
    shape: BatchShape
    requests: list[ImageRequest]
    future: asyncio.Future
    adapter: str = BASE
    enqueued: float = field(default_factory=time.monotonic)


def take_batch(pending: list[PendingJob], shape: BatchShape, max_batch: int, max_adapters: int = 1) -> list[PendingJob]:
    """Jobs of `shape`, oldest first, while their images fit in `max_batch` and their adapters in
    `max_adapters` distinct names (the first job always goes)."""
    batch: list[PendingJob] = []
    adapters: set[str] = set()
    images = 0
    for job in pending:
        if job.shape != shape or job.future.done():
            continue
        if batch and images + len(job.requests) > max_batch:
            break
        if job.adapter not in adapters and len(adapters) >= max_adapters:
            continue  # a later job of an adapter already in the batch may still join
        batch.append(job)
        adapters.add(job.adapter)
        images += len(job.requests)
    return batch


class MicroBatcher(Generic[R]):
    """Groups queued requests into batches and runs them one at a time on a worker thread.

    `run_batch(shape, requests, adapters)` returns one result per request, in order; it is called
    with at most `max_batch` requests and one adapter name per request. `on_batch(n)` and
    `on_queue_depth(n)` feed metrics.
    """

    def __init__(
        self,
        run_batch: Callable[[BatchShape, list[ImageRequest], list[str]], list[R]],
        max_batch: int = 8,
        max_queue: int = 64,
        max_wait_s: float = 0.02,
        max_adapters: int = 1,
        on_batch: Callable[[int], None] = lambda n: None,
        on_queue_depth: Callable[[int], None] = lambda n: None,
    ):
        if max_batch < 1 or max_queue < 1 or max_adapters < 1:
            raise ValueError("max_batch, max_queue and max_adapters must be at least 1")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_adapters = max_adapters
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.on_queue_depth = on_queue_depth
        self.pending: list[PendingJob] = []
        self.arrived = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.worker: asyncio.Task | None = None
        self.closed = False

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self.work(), name="micro-batcher")

    def run_blocking(self, action: Callable[[], R]) -> "asyncio.Future[R]":
        """Run `action` on the generation thread (loading, warm-up) so nothing overlaps a batch."""
        return asyncio.get_running_loop().run_in_executor(self.executor, action)

    async def submit(self, shape: BatchShape, requests: list[ImageRequest], adapter: str = BASE) -> list[R]:
        """Queue the requests (all for `adapter`); results in order. Raises QueueFull when full."""
        if self.closed:
            raise BatcherClosed("the server is shutting down")
        if len(self.pending) >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} requests waiting)")
        job = PendingJob(shape, list(requests), asyncio.get_running_loop().create_future(), adapter)
        self.pending.append(job)
        self.on_queue_depth(len(self.pending))
        self.arrived.set()
        try:
            return await job.future
        finally:
            if job in self.pending:  # the caller went away before its batch started
                self.pending.remove(job)
                self.on_queue_depth(len(self.pending))

    async def work(self) -> None:
        while True:
            while not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
            batch = await self.gather()
            if batch:
                await self.execute(batch)

    async def gather(self) -> list[PendingJob]:
        """Wait (bounded) for the oldest job's batch to fill, then take it off the queue."""
        oldest = self.pending[0]
        deadline = oldest.enqueued + self.max_wait_s
        while True:
            batch = take_batch(self.pending, oldest.shape, self.max_batch, self.max_adapters)
            images = sum(len(job.requests) for job in batch)
            remaining = deadline - time.monotonic()
            if not batch or images >= self.max_batch or remaining <= 0:
                break
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                pass
            if oldest.future.done():  # cancelled while waiting: start over with the next one
                break
        taken = set(map(id, batch))
        self.pending = [job for job in self.pending if id(job) not in taken and not job.future.done()]
        self.on_queue_depth(len(self.pending))
        return batch

    async def execute(self, batch: list[PendingJob]) -> None:
        shape = batch[0].shape
        requests = [request for job in batch for request in job.requests]
        adapters = [job.adapter for job in batch for _ in job.requests]

        def run_all() -> list[R]:
            results: list[R] = []
            for start in range(0, len(requests), self.max_batch):
                chunk = requests[start:start + self.max_batch]
                results.extend(self.run_batch(shape, chunk, adapters[start:start + self.max_batch]))
                self.on_batch(len(chunk))
            return results

        try:
            results = await self.run_blocking(run_all)
        except Exception as error:  # one failed batch fails its callers, never the worker
            log.exception("batch failed", extra={"images": len(requests), "shape": str(shape)})
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        start = 0
        for job in batch:
            end = start + len(job.requests)
            if not job.future.done():
                job.future.set_result(results[start:end])
            start = end

    async def close(self) -> None:
        self.closed = True
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass
        for job in self.pending:
            if not job.future.done():
                job.future.set_exception(BatcherClosed("the server is shutting down"))
        self.pending.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
