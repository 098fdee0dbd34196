"""Weights load in the background: alive at once, ready only after loading AND a warm-up image."""
from __future__ import annotations

import threading
import time

import pytest
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
    with TestClient(app, base_url="http://localhost") as client:
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


def test_a_model_that_cannot_load_is_reported_not_ready_without_its_path(caplog: pytest.LogCaptureFixture) -> None:
    from dreambooth_serving.app import ServerSettings, create_app

    app = create_app(ServerSettings(model="/nonexistent/secret-team/final", device="cpu"))
    with TestClient(app, base_url="http://localhost") as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ready, alive = client.get("/readyz"), client.get("/healthz")
        refused = client.post("/v1/images/generations", json={"prompt": "a dog"})
    assert alive.status_code == 503  # liveness fails: the pod restarts
    assert ready.json() == alive.json() == {"status": "failed", "error": "UserInputError"}
    for answer in (ready, alive, refused):  # state and error class only: no path, no URI
        assert "secret-team" not in answer.text and "nonexistent" not in answer.text, answer.text
    logged = [record for record in caplog.records if record.getMessage() == "model failed to load"]
    assert logged and "/nonexistent/secret-team/final" in logged[0].error  # the path goes to the log
