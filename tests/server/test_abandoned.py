"""No work for clients that left: a request whose client disconnects leaves the queue, a batch
nobody waits for any more stops between denoising steps, and a request past the server's
deadline is dropped (the OpenAI SDK gives up at 600 s and retries: each retry would add a copy)."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import httpx
import pytest

from tests.server.conftest import LiveServer

QUEUED = "dreambooth_queue_depth"
DRAWN = "dreambooth_images_generated_total"
BATCHES = "dreambooth_batch_images_count"


@pytest.fixture()
def server(live_server: LiveServer) -> LiveServer:
    return live_server


def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def open_request(url: str, body: dict) -> socket.socket:
    """A POST sent whole, its answer never read: the client can leave by closing the socket."""
    address = httpx.URL(url)
    sock = socket.create_connection((address.host, address.port), timeout=10)
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def hold_generation_thread(server: LiveServer) -> threading.Event:
    """Keep the one generation thread busy until the returned event is set."""
    release = threading.Event()
    server.app.state.runtime.batcher.executor.submit(release.wait, 60)
    return release


def test_queued_requests_whose_clients_left_are_not_drawn(server: LiveServer) -> None:
    """The first is the next batch, taken off the queue, waiting for the thread; the second waits in the queue."""
    before = server.metrics()
    release = hold_generation_thread(server)
    try:
        clients = [open_request(server.url, {"prompt": "nobody waits for this", "steps": 2, "seed": 1})]
        time.sleep(0.5)  # taken as the next batch (the batching window is 0.1 s)
        clients.append(open_request(server.url, {"prompt": "nobody waits for this", "steps": 2, "seed": 2}))
        until(lambda: server.metrics()[QUEUED] == 2, "the requests never queued")
        for client in clients:
            client.close()
        # The queued one leaves at once; the taken one counts until the thread gets to it (and skips it).
        until(lambda: server.metrics()[QUEUED] == 1, "the abandoned request stayed in the queue")
    finally:
        release.set()
    until(lambda: server.metrics()[QUEUED] == 0, "the taken request was never let go")
    kept = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a dog", "steps": 2, "seed": 2}, timeout=60)
    assert kept.status_code == 200
    after = server.metrics()
    assert after[DRAWN] - before[DRAWN] == 1 and after[BATCHES] - before[BATCHES] == 1, "only the request still waited for was drawn"


def test_a_running_batch_nobody_waits_for_stops_between_steps(server: LiveServer) -> None:
    from dreambooth_serving.family import denoiser

    steps: list[float] = []

    def slow_step(*_: object) -> None:
        steps.append(time.monotonic())
        time.sleep(0.05)

    hook = denoiser(server.app.state.runtime.pipeline).register_forward_pre_hook(slow_step)
    before = server.metrics()
    try:
        client = open_request(server.url, {"prompt": "nobody waits for this", "steps": 100, "seed": 3})
        until(lambda: len(steps) >= 2, "the batch never started")
        client.close()
        until(lambda: server.metrics()[QUEUED] == 0 and steps and time.monotonic() - steps[-1] > 0.5, "the batch kept going")
    finally:
        hook.remove()
    assert len(steps) < 30, f"{len(steps)} of 100 denoising steps ran for a client that had left"
    assert server.metrics()[DRAWN] == before[DRAWN], "no image was finished for it"
    assert httpx.post(f"{server.url}/v1/generate", json={"prompt": "a dog", "steps": 2}, timeout=60).status_code == 200


def test_a_request_past_the_deadline_is_dropped_and_answered(server: LiveServer) -> None:
    runtime = server.app.state.runtime
    settings = runtime.settings
    before = server.metrics()
    release = hold_generation_thread(server)
    runtime.settings = replace(settings, request_timeout_s=1.5)  # --request-timeout 1.5
    try:
        started = time.monotonic()
        late = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a dog", "steps": 2}, timeout=60)
        waited = time.monotonic() - started
    finally:
        runtime.settings = settings
        release.set()
    assert late.status_code == 503 and late.json()["error"]["code"] == "timeout" and late.headers["retry-after"]
    assert 1.2 < waited < 10, waited
    until(lambda: server.metrics()[QUEUED] == 0, "the late request stayed queued")
    time.sleep(0.3)
    assert server.metrics()[DRAWN] == before[DRAWN], "the dropped request was drawn anyway"
