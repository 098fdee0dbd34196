"""Micro-batching: concurrent requests of the same shape share one UNet batch.

Requests wait in one FIFO queue. The worker takes the oldest request, gathers every queued
request with the same `BatchShape` (up to `max_batch` images, and up to `max_adapters` distinct
adapters: 1 keeps every batch to one adapter), waits at most `max_wait_s` after the oldest one
arrived for more to join, and runs the whole group in ONE call of `run_batch` on a single
dedicated thread (the accelerator is used by one batch at a time). Each request names its
adapter (`BASE` for the base model); `run_batch` gets one name per image, so each image's rows
run with its own adapter only. While a batch runs, new requests queue up and form the next
batch, so batches grow with load.

The queue is bounded from the moment a request is admitted (`admit`), before anything is loaded
for it: a full queue refuses new work at once (`QueueFull`) instead of letting callers hang. A
request whose caller went away (its client disconnected, or its deadline passed) leaves the
queue at once; a running chunk all of whose requests were abandoned says so to `chunk_abandoned`,
which the runtime asks between denoising steps. `run_batch` may answer an exception for a row
(its adapter cannot be loaded): only that row's request fails. A batch that fails with an error
`retry_alone` accepts (out of memory) is run again one request at a time.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from dreambooth_trainer.generate import ImageRequest

log = logging.getLogger("dreambooth.serve")
R = TypeVar("R")
# The adapter name of a request for the base model (peft's name for "no adapter on this row").
BASE = "__base__"


class QueueFull(RuntimeError):
    """The queue holds `max_queue` requests already; the caller should retry later."""


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no more work."""


class DeadlineExceeded(TimeoutError):
    """The request was not drawn before its deadline; its work was dropped."""


class ChunkAbandoned(RuntimeError):
    """Raised by `run_batch` between denoising steps when `chunk_abandoned()`: the work stops."""


@dataclass(frozen=True)
class BatchShape:
    """What must match for requests to share a UNet batch (`kind` and `strength`: edits)."""

    steps: int
    guidance: float
    width: int
    height: int
    kind: str = "generate"
    strength: float = 1.0


@dataclass(eq=False)
class PendingJob(Generic[R]):
    shape: BatchShape
    requests: list[ImageRequest]
    future: asyncio.Future
    adapter: str = BASE
    enqueued: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() after which nobody waits for it

    @property
    def abandoned(self) -> bool:
        """Its caller went away (cancelled, or timed out); read from the generation thread too."""
        return self.future.cancelled() or (self.deadline is not None and time.monotonic() > self.deadline)


class Admission:
    """A place in the queue held for one request from admission until it is queued (or gone)."""

    def __init__(self, batcher: "MicroBatcher") -> None:
        self.batcher = batcher
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.batcher.reserved -= 1


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


@dataclass(frozen=True)
class Chunk:
    """At most `max_batch` rows of a batch, and the jobs they belong to."""

    start: int
    end: int
    jobs: tuple[PendingJob, ...]


def chunks(batch: list[PendingJob], max_batch: int) -> list[Chunk]:
    owners = [job for job in batch for _ in job.requests]
    return [Chunk(start, min(start + max_batch, len(owners)), tuple(dict.fromkeys(owners[start:start + max_batch])))
            for start in range(0, len(owners), max_batch)]


class MicroBatcher(Generic[R]):
    """Groups queued requests into batches and runs them one at a time on a worker thread.

    `run_batch(shape, requests, adapters)` returns one result per request, in order (an
    exception instance fails that request only); it is called with at most `max_batch` requests
    and one adapter name per request. `on_batch(n)` and `on_queue_depth(n)` feed metrics.
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
        retry_alone: Callable[[BaseException], bool] = lambda error: False,
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
        self.retry_alone = retry_alone
        self.pending: list[PendingJob] = []
        self.reserved = 0  # admitted requests not queued yet (their adapter is being fetched)
        self.taken = 0  # requests of the next batch, off the queue, waiting for the generation thread
        self.running: tuple[PendingJob, ...] = ()  # the jobs of the chunk on the generation thread
        self.arrived = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.worker: asyncio.Task | None = None
        self.closed = False

    @property
    def waiting(self) -> int:
        """Requests admitted and not started: what the queue's bound counts."""
        return len(self.pending) + self.reserved + self.taken

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self.work(), name="micro-batcher")

    def run_blocking(self, action: Callable[[], R]) -> "asyncio.Future[R]":
        """Run `action` on the generation thread (loading, warm-up) so nothing overlaps a batch."""
        return asyncio.get_running_loop().run_in_executor(self.executor, action)

    @contextmanager
    def admit(self) -> Iterator[Admission]:
        """Hold a place in the queue for one request (QueueFull, BatcherClosed): what is prepared
        for it inside the block (its adapter's weights) happens only for admitted requests."""
        if self.closed:
            raise BatcherClosed("the server is shutting down")
        if self.waiting >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} requests waiting)")
        self.reserved += 1
        self.on_queue_depth(self.waiting)
        admission = Admission(self)
        try:
            yield admission
        finally:
            admission.release()
            self.on_queue_depth(self.waiting)

    def chunk_abandoned(self) -> bool:
        """Whether every request of the running chunk was abandoned (asked between steps)."""
        return bool(self.running) and all(job.abandoned for job in self.running)

    async def submit(self, shape: BatchShape, requests: list[ImageRequest], adapter: str = BASE,
                     admission: Admission | None = None, deadline: float | None = None) -> list[R]:
        """Queue the requests (all for `adapter`); results in order. Without an `admission`,
        QueueFull when full; DeadlineExceeded once `deadline` (time.monotonic()) passes."""
        if self.closed:
            raise BatcherClosed("the server is shutting down")
        if admission is None and self.waiting >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} requests waiting)")
        job = PendingJob(shape, list(requests), asyncio.get_running_loop().create_future(), adapter, deadline=deadline)
        self.pending.append(job)
        if admission is not None:
            admission.release()
        self.on_queue_depth(self.waiting)
        self.arrived.set()
        try:
            if deadline is None:
                return await job.future
            return await asyncio.wait_for(job.future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded("the request was not drawn before its deadline; its work was dropped") from None
        finally:
            if job in self.pending:  # the caller went away before its batch started
                self.pending.remove(job)
                self.on_queue_depth(self.waiting)

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
        self.on_queue_depth(self.waiting)
        return [job for job in batch if not job.abandoned]

    def run_jobs(self, jobs: list[PendingJob]) -> list[Any]:
        """Every row of `jobs`, chunk by chunk, on the generation thread; None for the rows of a
        chunk whose callers all went away before it started."""
        self.taken = 0
        self.on_queue_depth(self.waiting)
        shape = jobs[0].shape
        requests = [request for job in jobs for request in job.requests]
        adapters = [job.adapter for job in jobs for _ in job.requests]
        results: list[Any] = []
        for chunk in chunks(jobs, self.max_batch):
            if all(job.abandoned for job in chunk.jobs):
                results.extend([None] * (chunk.end - chunk.start))
                continue
            self.running = chunk.jobs
            try:
                results.extend(self.run_batch(shape, requests[chunk.start:chunk.end], adapters[chunk.start:chunk.end]))
            except ChunkAbandoned:
                results.extend([None] * (chunk.end - chunk.start))
                log.info("batch stopped: every caller went away", extra={"images": chunk.end - chunk.start})
                continue
            finally:
                self.running = ()
            self.on_batch(chunk.end - chunk.start)
        return results

    async def execute(self, batch: list[PendingJob]) -> None:
        self.taken = len(batch)
        try:
            results = await self.run_blocking(lambda: self.run_jobs(batch))
        except Exception as error:  # one failed batch fails its callers, never the worker
            self.taken = 0
            if len(batch) > 1 and self.retry_alone(error):
                log.warning("batch failed; running its requests one by one",
                            extra={"requests": len(batch), "error": type(error).__name__})
                for job in batch:
                    await self.execute([job])
                return
            if not self.retry_alone(error):
                log.exception("batch failed", extra={"images": sum(len(job.requests) for job in batch), "shape": str(batch[0].shape)})
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        start = 0
        for job in batch:
            rows = results[start:start + len(job.requests)]
            start += len(job.requests)
            if job.future.done():
                continue
            failure = next((row for row in rows if isinstance(row, BaseException)), None)
            if failure is not None:
                job.future.set_exception(failure)
            elif any(row is None for row in rows):
                job.future.set_exception(DeadlineExceeded("the request was dropped: nobody waited for it any more"))
            else:
                job.future.set_result(rows)

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
