"""Weights load in the background: alive at once, ready only after loading AND a warm-up image."""
from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient


def wait_ready_in(client: TestClient, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.02)


def images_generated(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("dreambooth_images_generated_total "):
            return float(line.split()[1])
    raise AssertionError("no dreambooth_images_generated_total in /metrics")


def test_not_ready_until_loaded_and_warmed_up() -> None:
    from dreambooth_trainer.models import load_pipeline
    from dreambooth_serving.app import ServerSettings, create_app

    release = threading.Event()

    def slow_load() -> object:
        assert release.wait(60), "test never released the model"
        return load_pipeline("tiny")

    app = create_app(ServerSettings(device="cpu"), load=slow_load)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        loading = client.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        refused = client.post("/v1/generate", json={"prompt": "a dog", "steps": 1})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert images_generated(client) == 0
        release.set()
        wait_ready_in(client)
        assert client.get("/readyz").json()["status"] == "ready"
        assert images_generated(client) == 1  # the warm-up image came before readiness
        assert client.post("/v1/generate", json={"prompt": "a dog", "steps": 1}).status_code == 200


def test_a_model_that_cannot_load_is_reported_not_ready() -> None:
    from dreambooth_serving.app import ServerSettings, create_app

    app = create_app(ServerSettings(model="/nonexistent/final", device="cpu"))
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        status = client.get("/readyz").json()
        assert "/nonexistent/final" in status["detail"]
        assert client.get("/healthz").status_code == 503  # liveness fails: the pod restarts
