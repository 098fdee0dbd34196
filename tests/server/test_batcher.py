"""The micro-batcher on its own: grouping, the bounded wait, the queue bound, failures."""
from __future__ import annotations

import asyncio
import threading

import pytest

from dreambooth_serving.batcher import BatchShape, MicroBatcher, QueueFull, take_batch
from dreambooth_trainer.generate import ImageRequest

SMALL = BatchShape(steps=2, guidance=7.5, width=32, height=32)
LARGE = BatchShape(steps=2, guidance=7.5, width=64, height=64)


def requests(*seeds: int) -> list[ImageRequest]:
    return [ImageRequest("a dog", "", seed) for seed in seeds]


def test_take_batch_keeps_shapes_apart_and_fills_up_to_max_batch() -> None:
    loop = asyncio.new_event_loop()
    try:
        from dreambooth_serving.batcher import PendingJob

        jobs = [
            PendingJob(SMALL, requests(1, 2), loop.create_future()),
            PendingJob(LARGE, requests(3), loop.create_future()),
            PendingJob(SMALL, requests(4, 5, 6), loop.create_future()),
            PendingJob(SMALL, requests(7), loop.create_future()),
        ]
        assert take_batch(jobs, SMALL, 8) == [jobs[0], jobs[2], jobs[3]]
        assert take_batch(jobs, SMALL, 4) == [jobs[0]]  # the next job would overflow the batch
        assert take_batch(jobs, LARGE, 8) == [jobs[1]]
        assert take_batch(jobs, SMALL, 1) == [jobs[0]]  # the oldest always goes, split later
    finally:
        loop.close()


def test_concurrent_requests_share_batches_and_get_their_own_results() -> None:
    batches: list[list[int]] = []

    def run_batch(shape: BatchShape, chunk: list[ImageRequest], adapters: list[str]) -> list[int]:
        batches.append([request.seed for request in chunk])
        return [request.seed * 10 for request in chunk]

    async def scenario() -> list[list[int]]:
        batcher = MicroBatcher(run_batch, max_batch=4, max_wait_s=0.5)
        batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit(SMALL, requests(seed)) for seed in range(6)),
                batcher.submit(LARGE, requests(100, 101)),
            )
        finally:
            await batcher.close()

    results = asyncio.run(scenario())
    assert results == [[0], [10], [20], [30], [40], [50], [1000, 1010]]
    assert sorted(len(batch) for batch in batches) == [2, 2, 4]  # 4 + 2 small, 2 large
    assert all(len(batch) <= 4 for batch in batches)


def test_a_full_queue_refuses_at_once() -> None:
    started, release = threading.Event(), threading.Event()

    def run_batch(shape: BatchShape, chunk: list[ImageRequest], adapters: list[str]) -> list[int]:
        started.set()
        release.wait(10)
        return [0] * len(chunk)

    async def scenario() -> None:
        batcher = MicroBatcher(run_batch, max_batch=1, max_queue=2, max_wait_s=0)
        batcher.start()
        try:
            running = asyncio.ensure_future(batcher.submit(SMALL, requests(0)))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            waiting = [asyncio.ensure_future(batcher.submit(SMALL, requests(seed))) for seed in (1, 2)]
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFull):
                await batcher.submit(SMALL, requests(3))
            release.set()
            assert await asyncio.gather(running, *waiting) == [[0], [0], [0]]
        finally:
            release.set()
            await batcher.close()

    asyncio.run(scenario())


def test_a_failing_batch_fails_its_callers_and_the_worker_goes_on() -> None:
    def run_batch(shape: BatchShape, chunk: list[ImageRequest], adapters: list[str]) -> list[int]:
        if shape == LARGE:
            raise RuntimeError("out of memory")
        return [1] * len(chunk)

    async def scenario() -> None:
        batcher = MicroBatcher(run_batch, max_batch=4, max_wait_s=0)
        batcher.start()
        try:
            with pytest.raises(RuntimeError, match="out of memory"):
                await batcher.submit(LARGE, requests(1))
            assert await batcher.submit(SMALL, requests(2, 3)) == [1, 1]
        finally:
            await batcher.close()

    asyncio.run(scenario())
