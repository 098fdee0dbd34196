"""The server serves every family: tiny SDXL, SD3 and Flux servers (the built-in tiny models) answer
with their native size and their own guidance default, refuse what their family cannot draw
naming the field (Flux: sides not a multiple of 16, a negative prompt), draw a subject with its
own adapter, and refuse an adapter trained for another family by name."""
from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from dreambooth_serving.app import create_app
from dreambooth_serving.settings import ServerSettings

SIDE = 32


def write_lora(source: str, folder: Path, seed: int) -> Path:
    """A random LoRA for a tiny model (diffusers layout, as the trainer exports), non-zero so it shows."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dreambooth_trainer.models import load_pipeline

    pipeline = load_pipeline(source, tiny_resolution=SIDE)
    model = getattr(pipeline, "unet", None) or pipeline.transformer
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    key = "unet_lora_layers" if hasattr(pipeline, "unet") and pipeline.unet is not None else "transformer_lora_layers"
    type(pipeline).save_lora_weights(str(folder), **{key: layers})
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-adapters")
    return {name: write_lora(source, root / name, seed)
            for name, source, seed in (("sd-rex", "tiny", 1), ("xl-rex", "tiny-sdxl", 2), ("flux-rex", "tiny-flux", 3))}


def client_for(source: str, adapters: dict[str, Path]) -> Iterator[TestClient]:
    torch.set_num_threads(2)
    fixed = tuple((name, str(path)) for name, path in adapters.items())
    app = create_app(ServerSettings(model=source, device="cpu", max_wait_s=0.05, warmup_steps=1, tiny_resolution=SIDE, adapters=fixed))
    with TestClient(app, base_url="http://localhost") as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            import time

            time.sleep(0.05)
        assert client.get("/readyz").status_code == 200, client.get("/readyz").text
        yield client


@pytest.fixture(scope="module")
def sdxl(adapters: dict[str, Path]) -> Iterator[TestClient]:
    yield from client_for("tiny-sdxl", adapters)


@pytest.fixture(scope="module")
def sd3(adapters: dict[str, Path]) -> Iterator[TestClient]:
    yield from client_for("tiny-sd3", adapters)


@pytest.fixture(scope="module")
def flux(adapters: dict[str, Path]) -> Iterator[TestClient]:
    yield from client_for("tiny-flux", adapters)


def generate(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/generate", json={"prompt": "a photo of sks dog", "steps": 2, "seed": 7, "num_images": 2, **body})
    assert response.status_code == 200, response.text
    return response.json()


def pixels(result: dict, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(result["images"][index]["png_base64"])))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_each_family_draws_its_native_size_with_its_own_guidance(request: pytest.FixtureRequest, family: str) -> None:
    client = request.getfixturevalue(family)
    result = generate(client)
    assert (result["width"], result["height"]) == (SIDE, SIDE) and pixels(result).size == (SIDE, SIDE)
    assert result["guidance_scale"] == {"sdxl": 5.0, "sd3": 7.0, "flux": 3.5}[family], "the family's default guidance"
    assert generate(client)["images"] == result["images"], "a seed draws the same image again"


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_each_subject_draws_with_its_own_adapter_and_a_foreign_one_is_refused(request: pytest.FixtureRequest, family: str) -> None:
    client = request.getfixturevalue(family)
    own = "xl-rex" if family == "sdxl" else "flux-rex"
    base, subject = generate(client), generate(client, model=own)
    assert subject["images"][0]["png_base64"] != base["images"][0]["png_base64"], "the adapter changed nothing"
    foreign = "flux-rex" if family == "sdxl" else "sd-rex"
    refused = client.post("/v1/generate", json={"prompt": "a dog", "model": foreign, "steps": 1})
    assert refused.status_code == 503 and foreign in refused.text and "trained for" in refused.text, refused.text
    assert generate(client, model=own)["images"] == subject["images"], "a refused adapter leaves the others as they were"


def test_flux_refuses_what_it_cannot_draw_naming_the_field(flux: TestClient) -> None:
    response = flux.post("/v1/generate", json={"prompt": "a dog", "width": 40, "steps": 1})
    assert response.status_code == 422 and ["body", "width"] in [e["loc"] for e in response.json()["detail"]], response.text
    response = flux.post("/v1/generate", json={"prompt": "a dog", "negative_prompt": "blurry", "steps": 1})
    assert response.status_code == 422 and ["body", "negative_prompt"] in [e["loc"] for e in response.json()["detail"]]
    response = flux.post("/v1/images/generations", json={"prompt": "a dog", "size": "40x48", "steps": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "size", response.text
    response = flux.post("/v1/images/generations", json={"prompt": "a dog", "size": "48x32", "steps": 1, "seed": 1})
    assert response.status_code == 200 and response.json()["size"] == "48x32"


def edit(client: TestClient, mask: bool = False, **fields: object) -> tuple[int, object]:
    """POST /v1/images/edits as the OpenAI SDK sends it (a multipart form); (status, image or body)."""
    photo = Image.new("RGB", (SIDE, SIDE), (200, 120, 40))
    photo.paste((20, 60, 220), (8, 8, 24, 24))
    files = {"image": ("photo.png", png_bytes(photo), "image/png")}
    if mask:
        hole = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 255))
        hole.paste((0, 0, 0, 0), (8, 8, 24, 24))
        files["mask"] = ("mask.png", png_bytes(hole), "image/png")
    data = {"prompt": "a photo of sks dog", "steps": "3", "seed": "7", "response_format": "b64_json", **{k: str(v) for k, v in fields.items()}}
    response = client.post("/v1/images/edits", files=files, data=data)
    if response.status_code != 200:
        return response.status_code, response.json()
    return 200, Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("family,subject", [("sdxl", "xl-rex"), ("flux", "flux-rex")])
@pytest.mark.parametrize("mask", [False, True], ids=["img2img", "inpaint"])
def test_edits_draw_with_the_subjects_lora_in_every_family(request: pytest.FixtureRequest, family: str, subject: str, mask: bool) -> None:
    client = request.getfixturevalue(family)
    status, own = edit(client, mask, model=subject)
    assert status == 200, own
    status, base = edit(client, mask)
    assert status == 200 and own.size == base.size == (SIDE, SIDE)
    assert own.tobytes() != base.tobytes(), "the subject's LoRA took part in the edit"


def test_sd3_edits_and_says_why_its_tiny_model_cannot_inpaint(sd3: TestClient) -> None:
    status, image = edit(sd3)
    assert status == 200 and image.size == (SIDE, SIDE)
    status, body = edit(sd3, mask=True)  # diffusers' SD3 inpainting takes 16 latent channels; the tiny model has 4
    assert status == 400 and body["error"]["param"] == "mask" and "latent channels" in body["error"]["message"], body
