"""Many subjects on one base model: per-request adapters, batches that never mix weights, the
registry file, and the bound on adapters kept on the device."""
from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server.conftest import TOKEN, SharedServer, write_registry

AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Batched CPU kernels may round one pixel value differently from a batch of one (see
# test_batching); another adapter changes pixels by tens, so this cannot hide a mix-up.
ROUNDING = 2


def draw(client: httpx.Client, model: str, seed: int, prompt: str = "a photo of sks dog") -> np.ndarray:
    response = client.post("/v1/images/generations", headers=AUTH,
                           json={"model": model, "prompt": prompt, "seed": seed, "steps": 3, "size": "32x32"})
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def distance(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_interleaved_requests_of_two_adapters_each_get_their_own_image(shared_server: SharedServer) -> None:
    orders = [(("rex", "mia")[index % 2], 300 + index // 2) for index in range(8)]  # rex, mia, rex, mia, ...
    with httpx.Client(base_url=shared_server.url, timeout=120) as client:
        before = shared_server.metrics()
        with ThreadPoolExecutor(len(orders)) as pool:
            together = list(pool.map(lambda order: draw(client, *order), orders))
        after = shared_server.metrics()
        batches = after["dreambooth_batch_images_count"] - before["dreambooth_batch_images_count"]
        assert batches < len(orders), f"{batches} batches for {len(orders)} concurrent requests: nothing was batched"
        for (model, seed), image in zip(orders, together):
            alone = draw(client, model, seed)
            assert distance(image, alone) <= ROUNDING, (model, seed)
        rex, mia, base = draw(client, "rex", 300), draw(client, "mia", 300), draw(client, "tiny", 300)
    assert distance(rex, mia) > 10 and distance(rex, base) > 10 and distance(mia, base) > 10


def test_models_lists_the_base_and_every_adapter(shared_server: SharedServer) -> None:
    listing = httpx.get(f"{shared_server.url}/v1/models", headers=AUTH, timeout=10).json()
    assert listing["object"] == "list"
    assert [model["id"] for model in listing["data"]] == ["tiny", "rex", "mia"]
    assert all(model["object"] == "model" and isinstance(model["created"], int) for model in listing["data"])


def test_registering_and_unregistering_takes_effect_without_a_restart(shared_server: SharedServer) -> None:
    with httpx.Client(base_url=shared_server.url, timeout=120) as client:
        unknown = client.post("/v1/images/generations", headers=AUTH, json={"model": "zed", "prompt": "a dog", "steps": 1})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        write_registry(shared_server.registry, {"mia": shared_server.loras["mia"], "zed": shared_server.loras["zed"]})
        zed = draw(client, "zed", 5)  # known at once: an unknown name makes the server read the registry again
        assert distance(zed, draw(client, "mia", 5)) > 10
        assert shared_server.metrics()["dreambooth_adapters_resident"] >= 2

        write_registry(shared_server.registry, {"mia": shared_server.loras["mia"]})
        deadline = time.monotonic() + 30
        while "zed" in [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]:
            assert time.monotonic() < deadline, "zed was never unregistered"
            time.sleep(0.1)
        gone = client.post("/v1/generate", headers=AUTH, json={"model": "zed", "prompt": "a dog", "steps": 1})
        assert gone.status_code == 404 and "zed" in gone.json()["detail"]
        while shared_server.metrics()["dreambooth_adapter_evictions_total"] < 1:
            assert time.monotonic() < deadline, "zed's weights stayed on the device"
            time.sleep(0.1)
        assert draw(client, "mia", 5) is not None  # the others keep serving


def test_native_api_picks_the_subject_too(shared_server: SharedServer) -> None:
    body = {"prompt": "a photo of sks dog", "steps": 3, "seed": 300, "width": 32, "height": 32}
    with httpx.Client(base_url=shared_server.url, timeout=120) as client:
        native = client.post("/v1/generate", headers=AUTH, json={**body, "model": "rex"})
        assert native.status_code == 200 and native.headers["content-type"] == "image/png"
        image = np.asarray(Image.open(io.BytesIO(native.content)), dtype=np.int16)
        assert distance(image, draw(client, "rex", 300)) <= ROUNDING


def test_the_device_keeps_at_most_the_configured_adapters(tmp_path) -> None:
    from dreambooth_serving.adapters import AdapterLimits, ResidentAdapters
    from dreambooth_trainer.tiny import tiny_pipeline

    from tests.server.conftest import write_random_lora

    files = {name: write_random_lora(tmp_path / name, seed) / "pytorch_lora_weights.safetensors"
             for seed, name in enumerate("abc", start=1)}
    pipeline = tiny_pipeline(seed=0)
    one_adapter = None
    resident = ResidentAdapters(pipeline, AdapterLimits(max_resident=2, max_bytes=10**9))
    for name in "abca":
        resident.ensure([name], files.__getitem__)
        one_adapter = one_adapter or resident.bytes
        assert len(resident.sizes) <= 2
    assert list(resident.sizes) == ["c", "a"]  # b was the least recently used when a came back
    by_bytes = ResidentAdapters(tiny_pipeline(seed=0), AdapterLimits(max_resident=10, max_bytes=one_adapter))
    for name in "ab":
        by_bytes.ensure([name], files.__getitem__)
    assert list(by_bytes.sizes) == ["b"]
    with pytest.raises(Exception, match="at most 2"):
        resident.ensure(list("abc"), files.__getitem__)


def test_rows_of_other_layer_kinds_keep_their_own_adapter_too(tmp_path: Path) -> None:
    """Convolution LoRA layers take peft's per-row path; Linear ones the gathered update."""
    from dreambooth_serving.adapters import AdapterLimits, ResidentAdapters
    from dreambooth_serving.adapters import lora_layers as resident_layers
    from dreambooth_serving.batcher import BASE
    from dreambooth_trainer.generate import ImageRequest, generate_images
    from dreambooth_trainer.tiny import tiny_pipeline

    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    def conv_and_linear_lora(name: str, seed: int) -> Path:
        unet = tiny_pipeline(seed=0).unet
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False))
        state = {f"unet.{key}": value.contiguous() for key, value in get_peft_model_state_dict(unet).items()}
        assert any("conv1" in key for key in state) and any("to_q" in key for key in state)
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        return tmp_path / f"{name}.safetensors"

    files = {name: conv_and_linear_lora(name, seed) for seed, name in enumerate("ab", start=1)}
    pipeline = tiny_pipeline(seed=0)
    resident = ResidentAdapters(pipeline, AdapterLimits())
    resident.ensure("ab", files.__getitem__)
    kinds = {type(layer.base_layer).__name__ for layer in resident_layers(pipeline)}
    assert kinds == {"Linear", "Conv2d"}, kinds
    models = ["a", "b", BASE, "a"]
    requests = [ImageRequest("a photo of sks dog", "", 40 + index) for index in range(len(models))]
    with resident.routing(models):
        together = generate_images(pipeline, requests, steps=2)
    for model, request, image in zip(models, requests, together):
        with resident.routing([model]):
            alone = generate_images(pipeline, [request], steps=2)[0]
        assert distance(np.asarray(image, dtype=np.int16), np.asarray(alone, dtype=np.int16)) <= ROUNDING, model
    with resident.routing(["b"]):
        other = generate_images(pipeline, [requests[0]], steps=2)[0]
    assert distance(np.asarray(together[0], dtype=np.int16), np.asarray(other, dtype=np.int16)) > 10


def test_an_adapter_that_cannot_load_fails_only_its_own_requests(shared_server: SharedServer, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    write_registry(shared_server.registry, {"mia": shared_server.loras["mia"], "broken": broken})
    try:
        with httpx.Client(base_url=shared_server.url, timeout=120) as client, ThreadPoolExecutor(4) as pool:
            body = {"prompt": "a photo of sks dog", "steps": 2, "size": "32x32"}
            answers = list(pool.map(lambda model: client.post("/v1/images/generations", headers=AUTH, json={**body, "model": model}),
                                    ["broken", "rex", "broken", "mia"]))
        assert [answer.status_code for answer in answers] == [503, 200, 503, 200]
        error = answers[0].json()["error"]
        assert "broken" in error["message"] and "cannot be loaded" in error["message"]
    finally:
        write_registry(shared_server.registry, {"mia": shared_server.loras["mia"]})
