"""Every subject draws what it says: the queue bound holds before any adapter is loaded, a subject
that cannot be loaded fails only its own rows, a name re-pointed at new weights draws them, a
fixed `--lora` stays on whatever adapters load, lora_B biases are served, reported seeds can be
asked for again, and a batch holds no per-row copies of the adapters' weights."""
from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.server.conftest import TOKEN, LiveServer, SharedServer, serving, wait_ready, write_random_lora, write_registry
from tests.server.test_readiness import wait_ready_in

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUNDING = 2  # as in test_many_subjects: batched CPU kernels may round a pixel value by one or two


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def distance(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def openai_png(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["data"][0]["b64_json"])


def hold(app: object) -> threading.Event:
    """Keep the generation thread busy until the returned event is set."""
    release = threading.Event()
    app.state.runtime.batcher.executor.submit(release.wait, 60)
    return release


def test_the_queue_bound_holds_before_any_adapter_is_loaded(shared_server: SharedServer) -> None:
    """max queue 3, ten requests for five subjects not loaded: seven are refused at once, and at
    most the three admitted subjects are ever loaded."""
    from dreambooth_serving.app import ServerSettings, create_app

    folders = shared_server.loras
    # Five subjects of distinct weights files (a folder and its file are two URIs).
    subjects = {"s1": folders["rex"], "s2": folders["mia"], "s3": folders["zed"],
                "s4": folders["rex"] / "pytorch_lora_weights.safetensors", "s5": folders["mia"] / "pytorch_lora_weights.safetensors"}
    app = create_app(ServerSettings(model="tiny", device="cpu", max_queue=3, max_wait_s=0.05,
                                    adapters=tuple((name, str(path)) for name, path in subjects.items())))
    with serving(app) as url:
        wait_ready(url)
        server = LiveServer(url, app)
        release = hold(app)
        answers: list[tuple[int, float]] = []
        try:
            started = time.monotonic()

            def ask(model: str) -> None:
                response = httpx.post(f"{url}/v1/images/generations", timeout=120,
                                      json={"model": model, "prompt": "a dog", "steps": 1, "size": "32x32"})
                answers.append((response.status_code, time.monotonic() - started))

            with ThreadPoolExecutor(10) as pool:
                futures = [pool.submit(ask, model) for model in [*subjects, *subjects]]
                deadline = time.monotonic() + 30
                while sum(1 for status, _ in answers if status == 429) < 7 and time.monotonic() < deadline:
                    time.sleep(0.05)
                refused_while_busy = sum(1 for status, _ in answers if status == 429)
                release.set()
                for future in futures:
                    future.result()
        finally:
            release.set()
        statuses = sorted(status for status, _ in answers)
        assert refused_while_busy == 7, f"{refused_while_busy} refused while the thread was busy"
        assert statuses == [200] * 3 + [429] * 7, statuses
        assert server.metrics()["dreambooth_adapter_loads_total"] <= 3, "adapters were loaded for refused requests"


def test_a_subject_that_cannot_be_loaded_fails_only_its_rows(shared_server: SharedServer, tmp_path: Path) -> None:
    """One batch: the base model, a fixed subject, a subject unregistered while it waited (drawn
    with the weights it was admitted with) and a broken one; only the broken one fails."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    loras = shared_server.loras
    write_registry(shared_server.registry, {"mia": loras["mia"], "kim": loras["zed"], "broken": broken})
    time.sleep(0.5)  # the registry is followed every 0.2 s
    before = shared_server.metrics()
    release = hold(shared_server.app)
    try:
        with httpx.Client(base_url=shared_server.url, headers=AUTH, timeout=120) as client, ThreadPoolExecutor(4) as pool:
            body = {"prompt": "a photo of sks dog", "steps": 2, "size": "32x32", "seed": 21}
            futures = [pool.submit(client.post, "/v1/images/generations", json={**body, "model": model})
                       for model in ("tiny", "rex", "kim", "broken")]
            deadline = time.monotonic() + 30
            while shared_server.app.state.runtime.batcher.waiting < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            write_registry(shared_server.registry, {"mia": loras["mia"]})  # kim is gone while it waits
            time.sleep(0.6)
            release.set()
            answers = [future.result() for future in futures]
    finally:
        release.set()
        write_registry(shared_server.registry, {"mia": shared_server.loras["mia"]})
    assert [answer.status_code for answer in answers] == [200, 200, 200, 503], [a.text[:200] for a in answers]
    error = answers[3].json()["error"]
    assert "broken" in error["message"] and str(broken) not in error["message"], "the subject is named, its path is not"
    assert shared_server.metrics()["dreambooth_batch_images_count"] - before["dreambooth_batch_images_count"] == 1, "one batch"


def test_a_name_re_pointed_at_new_weights_draws_them(shared_server: SharedServer) -> None:
    loras = shared_server.loras
    body = {"prompt": "a photo of sks dog", "steps": 2, "size": "32x32", "seed": 9}
    try:
        with httpx.Client(base_url=shared_server.url, headers=AUTH, timeout=120) as client:
            write_registry(shared_server.registry, {"mia": loras["mia"], "pat": loras["mia"]})
            first = pixels(openai_png(client.post("/v1/images/generations", json={**body, "model": "pat"})))
            write_registry(shared_server.registry, {"mia": loras["mia"], "pat": loras["zed"], "zed": loras["zed"]})
            time.sleep(0.5)
            second = pixels(openai_png(client.post("/v1/images/generations", json={**body, "model": "pat"})))
            zed = pixels(openai_png(client.post("/v1/images/generations", json={**body, "model": "zed"})))
    finally:
        write_registry(shared_server.registry, {"mia": loras["mia"]})
    assert distance(first, second) > 10, "pat kept its old weights"
    assert distance(second, zed) <= ROUNDING


def test_a_fixed_lora_stays_on_after_adapters_load(shared_server: SharedServer, live_server: LiveServer) -> None:
    from dreambooth_serving.app import ServerSettings, create_app

    loras = shared_server.loras
    body = {"prompt": "a photo of sks dog", "steps": 2, "seed": 5}
    app = create_app(ServerSettings(model="tiny", device="cpu", lora=str(loras["rex"]), adapters=(("mia", str(loras["mia"])),)))
    with TestClient(app, base_url="http://localhost") as client:
        wait_ready_in(client)
        fixed = client.post("/v1/generate", json=body).content
        assert client.post("/v1/generate", json={**body, "model": "mia"}).status_code == 200  # mia is loaded now
        again = client.post("/v1/generate", json=body).content
    plain = httpx.post(f"{live_server.url}/v1/generate", json=body, timeout=60).content
    assert distance(pixels(fixed), pixels(plain)) > 10, "the fixed LoRA changes the base model"
    assert distance(pixels(again), pixels(fixed)) <= ROUNDING, "the fixed LoRA went away when an adapter loaded"


def write_biased_lora(folder: Path, seed: int) -> Path:
    """A LoRA whose lora_B layers carry a bias (peft's lora_bias), in the diffusers layout."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dreambooth_trainer.tiny import tiny_pipeline

    unet = tiny_pipeline(seed=0).unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False, lora_bias=True))
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape) * 0.5)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert any(key.endswith("lora_B.bias") or "lora.up.bias" in key for key in state), sorted(state)[:4]
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state)
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_b_biases_are_served(tmp_path: Path) -> None:
    """A biased adapter drawn through the routed rows equals diffusers' own load of it."""
    from dreambooth_serving.adapters import AdapterLimits, ResidentAdapters
    from dreambooth_serving.batcher import BASE
    from dreambooth_trainer.generate import ImageRequest, generate_images
    from dreambooth_trainer.tiny import tiny_pipeline

    path = write_biased_lora(tmp_path / "biased", seed=4)
    requests = [ImageRequest("a photo of sks dog", "", 60), ImageRequest("a photo of sks dog", "", 61)]
    reference = tiny_pipeline(seed=0)
    reference.load_lora_weights(str(path.parent), weight_name=path.name)
    expected = generate_images(reference, requests[:1], steps=2)[0]
    pipeline = tiny_pipeline(seed=0)
    resident = ResidentAdapters(pipeline, AdapterLimits())
    resident.ensure(["biased"], lambda key: path)
    with resident.routing(["biased", BASE]):
        served, base = generate_images(pipeline, requests, steps=2)
    with resident.routing(["biased"]):
        alone = generate_images(pipeline, requests[:1], steps=2)[0]
    assert distance(pixels_of(alone), pixels_of(expected)) <= ROUNDING, "the bias was left out"
    assert distance(pixels_of(served), pixels_of(expected)) <= ROUNDING
    plain = generate_images(tiny_pipeline(seed=0), requests[1:], steps=2)[0]
    assert distance(pixels_of(base), pixels_of(plain)) <= ROUNDING, "the base row got none of it"


def pixels_of(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_every_reported_seed_can_be_asked_for(live_server: LiveServer) -> None:
    from dreambooth_serving.settings import MAX_SEED

    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        two = client.post("/v1/generate", json={"prompt": "a dog", "steps": 2, "seed": MAX_SEED, "num_images": 2})
        assert two.status_code == 200, two.text
        images = two.json()["images"]
        assert [image["seed"] for image in images] == [MAX_SEED, 0]
        again = client.post("/v1/generate", json={"prompt": "a dog", "steps": 2, "seed": images[1]["seed"]})
        assert again.status_code == 200 and distance(pixels(again.content), pixels(base64.b64decode(images[1]["png_base64"]))) <= ROUNDING


def held_tensor_bytes(value: object, weights: set[int], seen: set[int] | None = None) -> int:
    """Bytes of tensors reachable from `value` (dicts, lists, tuples, objects) that are not weights."""
    import torch

    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return 0 if value.data_ptr() in weights else value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(held_tensor_bytes(item, weights, seen) for pair in value.items() for item in pair)
    if isinstance(value, (list, tuple, set)):
        return sum(held_tensor_bytes(item, weights, seen) for item in value)
    return 0


@pytest.mark.parametrize("rows", [["a"] * 8, ["a", "b"] * 4, ["a", "b", "__base__", "a"] * 2])
def test_a_batch_holds_no_per_row_copies_of_adapter_weights(tmp_path: Path, rows: list[str]) -> None:
    """What the adapters keep for a batch of 8 rows stays under a tenth of one adapter's size
    (row copies would be 8 adapters' worth, whatever the mix)."""
    from dreambooth_serving.adapters import AdapterLimits, ResidentAdapters
    from dreambooth_serving.family import denoiser
    from dreambooth_trainer.generate import ImageRequest, generate_images
    from dreambooth_trainer.tiny import tiny_pipeline

    files = {name: write_random_lora(tmp_path / name, seed) / "pytorch_lora_weights.safetensors" for seed, name in enumerate("ab", 1)}
    pipeline = tiny_pipeline(seed=0)
    resident = ResidentAdapters(pipeline, AdapterLimits())
    resident.ensure(list(files), files.__getitem__)
    weights = {parameter.data_ptr() for parameter in pipeline.unet.parameters()}
    held: list[int] = []
    hook = denoiser(pipeline).register_forward_hook(lambda *_: held.append(held_tensor_bytes(vars(resident), weights)))
    with resident.routing(rows):
        generate_images(pipeline, [ImageRequest("a dog", "", seed) for seed in range(len(rows))], steps=2)
    hook.remove()
    one_adapter = resident.sizes["a"]
    assert held and max(held) < one_adapter / 10, f"{max(held)} bytes held for a batch; one adapter is {one_adapter}"
