"""Errors the SDKs can act on: a batch out of memory is tried request by request, a request that
cannot fit alone is refused with a status the OpenAI SDK does not retry, anything unexpected
answers in the path's JSON shape (never plain text), a request over the compute budget is refused
naming it, and the VAE decodes image by image."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import torch
from fastapi.testclient import TestClient

from tests.server.test_readiness import wait_ready_in


@dataclass
class Faults:
    """What the denoiser does wrong: run out of memory above `max_rows` rows, or raise `error`."""

    max_rows: int | None = None
    error: Exception | None = None
    batches: list[int] = field(default_factory=list)

    def __call__(self, _module: object, args: tuple, kwargs: dict) -> None:
        rows = (args[0] if args else kwargs["sample"]).shape[0]
        self.batches.append(rows)
        if self.error is not None:
            raise self.error
        if self.max_rows is not None and rows > self.max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


FAULTS = Faults()


def faulty_tiny() -> object:
    from dreambooth_serving.runtime import ready_for_serving
    from dreambooth_trainer.models import load_pipeline

    pipeline = ready_for_serving(load_pipeline("tiny"), "cpu")
    pipeline.unet.register_forward_pre_hook(FAULTS, with_kwargs=True)
    return pipeline


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    from dreambooth_serving.app import ServerSettings, create_app

    app = create_app(ServerSettings(device="cpu", max_wait_s=0.2, max_pixel_steps=4 * 32 * 32 * 10), load=faulty_tiny)
    with TestClient(app, base_url="http://localhost") as running:
        wait_ready_in(running)
        yield running


@pytest.fixture(autouse=True)
def no_faults() -> Iterator[None]:
    yield
    FAULTS.max_rows, FAULTS.error = None, None
    FAULTS.batches.clear()


def test_a_batch_out_of_memory_is_tried_request_by_request(client: TestClient) -> None:
    FAULTS.max_rows = 2  # one image with guidance: [uncond; cond]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda seed: client.post("/v1/generate", json={"prompt": "a dog", "steps": 2, "seed": seed}), (1, 2)))
    assert [answer.status_code for answer in answers] == [200, 200], [answer.text for answer in answers]
    assert 4 in FAULTS.batches, "the two requests were batched first"


def test_a_request_that_cannot_fit_alone_is_not_retried_by_the_sdk(client: TestClient) -> None:
    FAULTS.max_rows = 2
    refused = client.post("/v1/images/generations", json={"prompt": "a dog", "n": 2, "steps": 2})
    assert refused.status_code == 400, refused.text  # the SDK retries 408, 409, 429 and 5xx only
    error = refused.json()["error"]
    assert error["code"] == "insufficient_device_memory" and "fewer images" in error["message"]
    native = client.post("/v1/generate", json={"prompt": "a dog", "num_images": 2, "steps": 2})
    assert native.status_code == 422 and native.json()["detail"][0]["type"] == "out_of_memory"
    FAULTS.max_rows = None
    assert client.post("/v1/generate", json={"prompt": "a dog", "steps": 2}).status_code == 200, "the server goes on"


def test_an_unexpected_error_answers_json_in_the_paths_shape(client: TestClient) -> None:
    FAULTS.error = ValueError("kernel failed reading /srv/secret/weights.bin")
    openai = client.post("/v1/images/generations", json={"prompt": "a dog", "steps": 2})
    assert openai.status_code == 500 and openai.headers["content-type"] == "application/json"
    error = openai.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error" and "ValueError" in error["message"]
    native = client.post("/v1/generate", json={"prompt": "a dog", "steps": 2})
    assert native.status_code == 500 and "ValueError" in native.json()["detail"]
    assert "/srv/secret" not in openai.text + native.text


def test_a_request_over_the_compute_budget_is_refused_naming_it(client: TestClient) -> None:
    over = client.post("/v1/images/generations", json={"prompt": "a dog", "n": 4, "steps": 11, "size": "32x32"})
    assert over.status_code == 400 and over.json()["error"]["param"] == "n", over.text
    assert "--max-pixel-steps" in over.json()["error"]["message"]
    native = client.post("/v1/generate", json={"prompt": "a dog", "num_images": 4, "steps": 11})
    assert native.status_code == 422 and native.json()["detail"][0]["loc"] == ["body", "num_images"]
    assert not FAULTS.batches, "nothing was drawn for them"
    assert client.post("/v1/images/generations", json={"prompt": "a dog", "n": 4, "steps": 10, "size": "32x32"}).status_code == 200


def test_the_vae_decodes_image_by_image(client: TestClient) -> None:
    assert client.app.state.runtime.pipeline.vae.use_slicing
