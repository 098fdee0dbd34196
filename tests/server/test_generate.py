"""POST /v1/generate on the tiny model: PNGs, seeds, several images, 422s, the token."""
from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.server.conftest import LiveServer

STEPS = 2


def generate(server: LiveServer, **body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/generate", json={"steps": STEPS, **body}, timeout=60)


def test_one_image_is_a_png_of_the_requested_size(live_server: LiveServer) -> None:
    response = generate(live_server, prompt="a photo of sks dog", seed=7, width=48, height=24)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "7"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (48, 24)


def test_omitted_size_is_the_models_and_omitted_seed_is_reported(live_server: LiveServer) -> None:
    response = generate(live_server, prompt="a dog")
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)
    assert int(response.headers["x-seed"]) >= 0


def test_same_seed_gives_the_same_bytes(live_server: LiveServer) -> None:
    first = generate(live_server, prompt="a dog on the moon", negative_prompt="blurry", seed=123)
    second = generate(live_server, prompt="a dog on the moon", negative_prompt="blurry", seed=123)
    other = generate(live_server, prompt="a dog on the moon", negative_prompt="blurry", seed=124)
    assert first.status_code == second.status_code == other.status_code == 200
    assert first.content == second.content
    assert first.content != other.content


def test_three_images_come_back_as_json_with_their_seeds(live_server: LiveServer) -> None:
    response = generate(live_server, prompt="a dog", num_images=3, seed=40)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert [item["seed"] for item in payload["images"]] == [40, 41, 42]
    pngs = [base64.b64decode(item["png_base64"]) for item in payload["images"]]
    assert len(set(pngs)) == 3
    assert all(Image.open(io.BytesIO(png)).size == (32, 32) for png in pngs)
    # image i of a multi-image request is the single image of seed + i
    assert generate(live_server, prompt="a dog", seed=41).content == pngs[1]


BAD_BODIES = [
    pytest.param(b"prompt=a dog", "body", id="not-json"),
    pytest.param(b'\xff\xfe{"prompt"', "body", id="not-utf8"),
    pytest.param(b'["a dog"]', "body", id="not-an-object"),
    pytest.param(b'{"negative_prompt": "x"}', "prompt", id="missing-prompt"),
    pytest.param(b'{"prompt": "a dog", "sampler": "euler"}', "sampler", id="unknown-field"),
    pytest.param(b'{"prompt": "a dog", "steps": "ten"}', "steps", id="wrong-type"),
    pytest.param(b'{"prompt": "a dog", "steps": 151}', "steps", id="too-many-steps"),
    pytest.param(b'{"prompt": "a dog", "num_images": 9}', "num_images", id="too-many-images"),
    pytest.param(b'{"prompt": "a dog", "guidance_scale": 30.5}', "guidance_scale", id="guidance-out-of-range"),
    pytest.param(b'{"prompt": "a dog", "width": 100}', "width", id="width-not-multiple-of-8"),
    pytest.param(b'{"prompt": "a dog", "height": 1032}', "height", id="height-too-big"),
    pytest.param(b'{"prompt": "a dog", "seed": -1}', "seed", id="negative-seed"),
    pytest.param(b'{"prompt": "a dog", "guidance_scale": NaN}', "guidance_scale", id="nan"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
def test_bad_bodies_are_422_naming_the_field(live_server: LiveServer, body: bytes, field: str) -> None:
    response = httpx.post(
        f"{live_server.url}/v1/generate", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 422, response.text
    locations = [error["loc"] for error in response.json()["detail"]]
    if field == "body":
        assert all(loc[0] == "body" for loc in locations)
    else:
        assert ["body", field] in locations, locations


def test_the_web_page_and_docs_are_served(live_server: LiveServer) -> None:
    page = httpx.get(live_server.url + "/", timeout=10)
    assert page.status_code == 200 and 'id="generate"' in page.text
    assert httpx.get(live_server.url + "/docs", timeout=10).status_code == 200
    spec = httpx.get(live_server.url + "/openapi.json", timeout=10).json()
    assert "/v1/generate" in spec["paths"]


def test_bearer_token_is_required_when_set() -> None:
    from fastapi.testclient import TestClient

    from dreambooth_serving.app import ServerSettings, create_app

    from .test_readiness import wait_ready_in

    app = create_app(ServerSettings(device="cpu", api_token="s3cret"))
    body = {"prompt": "a dog", "steps": 1, "seed": 1}
    with TestClient(app, base_url="http://localhost") as client:
        wait_ready_in(client)
        assert client.get("/healthz").status_code == 200  # probes stay open
        missing = client.post("/v1/generate", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/v1/generate", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = client.post("/v1/generate", json=body, headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200 and right.headers["content-type"] == "image/png"
        # The second header: what passes the Kubernetes API server's proxy, which keeps Authorization.
        proxied = client.post("/v1/generate", json=body, headers={"X-Dreambooth-Token": "s3cret"})
        assert proxied.status_code == 200 and proxied.headers["content-type"] == "image/png"
        assert client.get("/v1/models", headers={"X-Dreambooth-Token": "s3cret"}).status_code == 200
        assert client.get("/v1/models", headers={"X-Dreambooth-Token": "nope"}).status_code == 401


def test_token_comes_from_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from dreambooth_serving.settings import api_token_from_env

    monkeypatch.delenv("DREAMBOOTH_API_TOKEN", raising=False)
    assert api_token_from_env() is None
    monkeypatch.setenv("DREAMBOOTH_API_TOKEN", "")
    assert api_token_from_env() is None
    monkeypatch.setenv("DREAMBOOTH_API_TOKEN", "abc")
    assert api_token_from_env() == "abc"


def test_a_full_queue_answers_429_at_once() -> None:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from dreambooth_serving.app import ServerSettings, create_app

    from .test_readiness import wait_ready_in

    app = create_app(ServerSettings(device="cpu", max_batch=1, max_queue=1, max_wait_s=0))
    runtime = app.state.runtime
    generate_for_real, hold, entered = runtime.run_batch, threading.Event(), threading.Event()
    hold.set()

    def held_batch(shape: object, requests: list, adapters: list) -> list:
        entered.set()
        assert hold.wait(30)
        return generate_for_real(shape, requests, adapters)

    runtime.run_batch = held_batch  # the batcher picks it up when the app starts
    body = {"prompt": "a dog", "steps": 1}
    with TestClient(app, base_url="http://localhost") as client, ThreadPoolExecutor(2) as pool:
        wait_ready_in(client)
        hold.clear()
        entered.clear()
        running = pool.submit(client.post, "/v1/generate", json=body)
        assert entered.wait(30)
        queued = pool.submit(client.post, "/v1/generate", json=body)
        deadline = time.monotonic() + 30
        while "dreambooth_queue_depth 1.0" not in client.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = client.post("/v1/generate", json=body)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        hold.set()
        assert running.result().status_code == 200
        assert queued.result().status_code == 200
