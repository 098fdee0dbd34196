"""`POST /v1/images/edits` with the official OpenAI SDK: img2img and inpainting with the subject's
LoRA ("put sks dog in this photo"), batched like generations, refusing what it cannot use by name.
(Every other family's edits: test_families.py.)"""
from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server.conftest import TOKEN, SharedServer

ROUNDING = 2


def sdk(server: SharedServer) -> object:
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo(width: int = 40, height: int = 32) -> bytes:
    """A photo with something in it: a gradient and a square."""
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (height, 1)), np.full((height, width), 90, np.uint8), np.tile(ramp[::-1], (height, 1))], -1)
    pixels[8:24, 10:26] = (240, 220, 40)
    return png(Image.fromarray(pixels))


def hole_mask(width: int = 40, height: int = 32) -> bytes:
    """OpenAI's mask: opaque everywhere but a transparent square, where to paint."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 8, 32, 24))
    return png(mask)


def edited(result: object, index: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[index].b64_json))), dtype=np.int16)


def edit(server: SharedServer, model: str = "rex", mask: bytes | None = None, **arguments: object) -> object:
    extra = {"seed": 5, "steps": 4, **arguments.pop("extra_body", {})}
    files = {"mask": ("mask.png", mask, "image/png")} if mask else {}
    return sdk(server).images.edit(image=("photo.png", photo(), "image/png"), prompt="a photo of sks dog", model=model,
                                   response_format="b64_json", extra_body=extra, **files, **arguments)


def distance(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_img2img_draws_the_photo_again_with_the_subject(shared_server: SharedServer) -> None:
    rex = edit(shared_server)
    assert rex.size == "40x32" and edited(rex).shape == (32, 40, 3), "auto: the photo's own size"
    assert distance(edited(rex), edited(edit(shared_server))) == 0, "a seed edits the same way again"
    assert distance(edited(rex), edited(edit(shared_server, model="tiny"))) > 10, "the subject's LoRA took part"
    assert distance(edited(rex), edited(edit(shared_server, extra_body={"strength": 0.3}))) > 0
    sized = edit(shared_server, size="32x32", n=2)
    assert [item.model_extra["seed"] for item in sized.data] == [5, 6] and edited(sized, 1).shape == (32, 32, 3)


def test_inpainting_paints_where_the_mask_is_transparent(shared_server: SharedServer) -> None:
    painted = edit(shared_server, mask=hole_mask())
    assert edited(painted).shape == (32, 40, 3)
    assert distance(edited(painted), edited(edit(shared_server))) > 10, "inpainting is not img2img"
    other_hole = Image.new("RGBA", (40, 32), (0, 0, 0, 255))
    other_hole.paste((0, 0, 0, 0), (0, 0, 8, 8))
    assert distance(edited(painted), edited(edit(shared_server, mask=png(other_hole)))) > 0, "the mask decides where"
    # dall-e's rule: an image with transparent pixels and no mask is inpainted there.
    see_through = Image.open(io.BytesIO(photo())).convert("RGBA")
    see_through.paste((0, 0, 0, 0), (16, 8, 32, 24))
    own = sdk(shared_server).images.edit(image=("photo.png", png(see_through), "image/png"), prompt="a photo of sks dog",
                                         model="rex", response_format="b64_json", extra_body={"seed": 5, "steps": 4})
    assert edited(own).shape == (32, 40, 3)


def test_edits_of_several_subjects_share_a_batch(shared_server: SharedServer) -> None:
    before = shared_server.metrics()["dreambooth_batch_images_count"]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda model: edit(shared_server, model=model), ["rex", "mia", "rex", "tiny"]))
    batches = shared_server.metrics()["dreambooth_batch_images_count"] - before
    assert batches < 4, f"{batches} batches for 4 concurrent edits"
    for model, result in zip(["rex", "mia", "rex", "tiny"], together):
        assert distance(edited(result), edited(edit(shared_server, model=model))) <= ROUNDING, model


def test_what_an_edit_cannot_use_is_refused_by_name(shared_server: SharedServer) -> None:
    from openai import BadRequestError

    url = f"{shared_server.url}/v1/images/edits"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        ({"files": {"image": ("x.png", b"not an image", "image/png")}, "data": {"prompt": "a dog"}}, "image"),
        ({"files": {"image": ("x.png", photo(), "image/png"), "mask": ("m.png", hole_mask(8, 8), "image/png")},
          "data": {"prompt": "a dog"}}, "mask"),
        ({"files": {"mask": ("m.png", hole_mask(), "image/png")}, "data": {"prompt": "a dog"}}, "image"),
        ({"files": {"image": ("x.png", photo(), "image/png")}, "data": {"prompt": "a dog", "strength": "2"}}, "strength"),
        ({"files": {"image": ("x.png", photo(), "image/png"), "markup": ("m.png", photo(), "image/png")}, "data": {"prompt": "a dog"}}, "markup"),
        ({"files": {"image": ("x.png", photo(), "image/png")}, "data": {"prompt": "a dog", "colour": "red"}}, "colour"),
    ]
    for request, param in cases:
        answer = httpx.post(url, headers=auth, timeout=60, **request)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (param, answer.text)
        if param == "markup":  # the SDK sends a file: refused by name, not as a file in a value's place
            assert answer.json()["error"]["message"].startswith("markup is not supported"), answer.text
    as_json = httpx.post(url, headers=auth, json={"prompt": "a dog"}, timeout=60)
    assert as_json.status_code == 415
    with pytest.raises(BadRequestError) as caught:
        sdk(shared_server).images.edit(image=[("a.png", photo(), "image/png"), ("b.png", photo(), "image/png")], prompt="a dog")
    assert caught.value.param == "image" and "exactly one" in caught.value.message
