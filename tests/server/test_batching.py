"""Concurrent requests on the live server: fewer UNet batches than requests; a bounded load run."""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image

from tests.server.conftest import LiveServer

BATCHES = "dreambooth_batch_images_count"
BATCHED_IMAGES = "dreambooth_batch_images_sum"


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_eight_concurrent_requests_share_unet_batches(live_server: LiveServer) -> None:
    seeds = list(range(500, 508))
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        before = live_server.metrics()
        with ThreadPoolExecutor(len(seeds)) as pool:
            responses = list(pool.map(
                lambda seed: client.post("/v1/generate", json={"prompt": "a dog", "steps": 3, "seed": seed}), seeds
            ))
        after = live_server.metrics()
        assert all(r.status_code == 200 for r in responses)
        assert [int(r.headers["x-seed"]) for r in responses] == seeds
        batches = after[BATCHES] - before[BATCHES]
        assert after[BATCHED_IMAGES] - before[BATCHED_IMAGES] == len(seeds)
        assert 1 <= batches < len(seeds), f"{batches} UNet batches for {len(seeds)} requests"
        print(f"{len(seeds)} concurrent requests -> {batches:.0f} UNet batches")
        # each request got its own seed's image: the same as asking for that seed alone
        # (batched CPU kernels may round one pixel value differently, hence the tolerance)
        for seed, response in zip(seeds, responses):
            alone = client.post("/v1/generate", json={"prompt": "a dog", "steps": 3, "seed": seed})
            assert np.abs(pixels(alone.content) - pixels(response.content)).max() <= 2, seed
        assert len({r.content for r in responses}) == len(seeds)


def test_load_run_has_no_server_errors_and_bounded_memory(live_server: LiveServer) -> None:
    body = {"prompt": "a photo of sks dog", "steps": 1, "guidance_scale": 7.5}

    def run(count: int, offset: int) -> list[int]:
        with httpx.Client(base_url=live_server.url, timeout=120) as client, ThreadPoolExecutor(8) as pool:
            return list(pool.map(
                lambda i: client.post("/v1/generate", json={**body, "seed": offset + i}).status_code, range(count)
            ))

    run(40, 0)  # warm the allocator and the connection pool first
    before = rss_mib()
    codes = run(200, 1000)
    growth = rss_mib() - before
    print(f"RSS {before:.0f} MiB -> {before + growth:.0f} MiB over 200 requests at concurrency 8")
    assert not [code for code in codes if code >= 500]
    assert codes.count(200) == 200
    assert growth < 100, f"RSS grew {growth:.0f} MiB over 200 requests"
    metrics = live_server.metrics()
    assert metrics["dreambooth_queue_depth"] == 0
    assert metrics['dreambooth_http_requests_total{path="/v1/generate",status="200"}'] >= 240
