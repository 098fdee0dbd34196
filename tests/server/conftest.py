"""A real uvicorn server on a free loopback port, serving the tiny model on CPU.

One server for the whole tests/server run: loading and warm-up happen once, and the browser
and schemathesis talk to it over a real socket like any client would.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

READY_TIMEOUT_S = 120


@dataclass
class LiveServer:
    url: str
    app: object

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v",...}': value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples


def wait_ready(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    import torch
    import uvicorn

    from dreambooth_trainer.server import ServerSettings, create_app

    torch.set_num_threads(2)
    # A long-ish batching window makes the concurrency test deterministic on a busy 2-core box.
    app = create_app(ServerSettings(model="tiny", device="cpu", max_batch=8, max_queue=64, max_wait_s=0.1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    yield LiveServer(url, app)
    server.should_exit = True
    thread.join(timeout=30)
