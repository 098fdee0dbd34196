"""The official `openai` Python SDK as the client: images, models, and its errors."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.server.conftest import TOKEN, SharedServer


def client(server: SharedServer, api_key: str = TOKEN) -> object:
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def test_images_generate_returns_b64_pngs_of_the_subject(shared_server: SharedServer) -> None:
    result = client(shared_server).images.generate(
        model="rex", prompt="a photo of sks dog on the moon", n=2, size="48x32", response_format="b64_json",
        extra_body={"seed": 7, "steps": 2, "guidance_scale": 5.0},
    )
    assert isinstance(result.created, int) and len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert all(image.format == "PNG" and image.size == (48, 32) for image in images)
    assert [item.model_extra["seed"] for item in result.data] == [7, 8]
    assert result.size == "48x32" and result.output_format == "png"


def test_models_list_and_retrieve(shared_server: SharedServer) -> None:
    sdk = client(shared_server)
    assert {"tiny", "rex", "mia"} <= {model.id for model in sdk.models.list()}
    assert sdk.models.retrieve("rex").id == "rex"


def test_a_bad_size_is_a_bad_request_naming_size(shared_server: SharedServer) -> None:
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as caught:
        client(shared_server).images.generate(model="rex", prompt="a dog", size="100x1000")
    error = caught.value
    assert error.status_code == 400 and error.param == "size" and error.code == "invalid_size"
    assert "100x1000" in error.message


def test_url_is_a_data_url_and_both_come_when_no_format_is_asked(shared_server: SharedServer) -> None:
    sdk = client(shared_server)
    body = {"model": "rex", "prompt": "a dog", "size": "32x32", "extra_body": {"seed": 3, "steps": 1}}
    linked = sdk.images.generate(**body, response_format="url").data[0]
    assert linked.b64_json is None and linked.url.startswith("data:image/png;base64,")
    png = base64.b64decode(linked.url.removeprefix("data:image/png;base64,"))
    assert Image.open(io.BytesIO(png)).size == (32, 32)
    both = sdk.images.generate(**body).data[0]  # what clients written for dall-e (url) and gpt-image (b64_json) read
    assert both.url == linked.url and base64.b64decode(both.b64_json) == png
    assert sdk.images.generate(**body, response_format="b64_json").data[0].url is None


def test_a_bad_or_missing_token_is_an_authentication_error(shared_server: SharedServer) -> None:
    import httpx
    from openai import AuthenticationError

    sdk = client(shared_server, api_key="wrong")
    with pytest.raises(AuthenticationError) as caught:
        sdk.images.generate(model="rex", prompt="a dog")
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with pytest.raises(AuthenticationError):
        sdk.models.list()
    # the SDK insists on some key; a client without one gets the same answer in the same shape
    bare = httpx.post(f"{shared_server.url}/v1/images/generations", json={"prompt": "a dog"}, timeout=30)
    assert bare.status_code == 401 and set(bare.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{shared_server.url}/readyz", timeout=10).status_code == 200  # probes stay open


def test_an_unknown_subject_is_not_found(shared_server: SharedServer) -> None:
    from openai import NotFoundError

    with pytest.raises(NotFoundError) as caught:
        client(shared_server).images.generate(model="nobody", prompt="a dog")
    assert caught.value.code == "model_not_found" and "rex" in caught.value.message


def test_the_extensions_take_the_names_other_servers_use(shared_server: SharedServer) -> None:
    result = client(shared_server).images.generate(
        model="rex", prompt="a dog", size="32x32", extra_body={"seed": 1, "num_inference_steps": 1, "guidance": 2.0})
    assert len(result.data) == 1 and result.data[0].model_extra["seed"] == 1


def test_n_none_as_the_sdk_sends_it_draws_one_image(shared_server: SharedServer) -> None:
    result = client(shared_server).images.generate(model="rex", prompt="a dog", n=None, size="32x32", extra_body={"steps": 1})
    assert len(result.data) == 1


def test_fields_other_image_servers_take_are_decided(shared_server: SharedServer) -> None:
    """width/height and cfg_scale do what they say; a sampler choice is refused naming it."""
    from openai import BadRequestError

    sdk = client(shared_server)
    sized = sdk.images.generate(model="rex", prompt="a dog", response_format="b64_json",
                                extra_body={"width": 48, "height": 32, "cfg_scale": 3.0, "seed": 4, "steps": 1})
    assert Image.open(io.BytesIO(base64.b64decode(sized.data[0].b64_json))).size == (48, 32) and sized.size == "48x32"
    same = sdk.images.generate(model="rex", prompt="a dog", size="48x32", response_format="b64_json",
                               extra_body={"guidance_scale": 3.0, "seed": 4, "steps": 1})
    assert same.data[0].b64_json == sized.data[0].b64_json, "cfg_scale is guidance_scale"
    for extra, param in (({"sampler": "euler_a"}, "sampler"), ({"sampler_name": "DPM++ 2M"}, "sampler_name"),
                         ({"width": 48, "height": 32, "size": "32x32"}, "size"), ({"steps": 1, "hires_fix": True}, "hires_fix")):
        with pytest.raises(BadRequestError) as caught:
            sdk.images.generate(model="rex", prompt="a dog", extra_body=extra)
        assert caught.value.param == param, (extra, caught.value.message)


def test_what_openai_offers_but_this_server_does_not_is_refused_by_name(shared_server: SharedServer) -> None:
    from openai import BadRequestError

    sdk = client(shared_server)
    for arguments, param in (({"output_format": "gif"}, "output_format"), ({"background": "transparent"}, "background"),
                             ({"extra_body": {"frame_count": 4}}, "frame_count"), ({"extra_body": {"svg": {"model": "x"}}}, "svg")):
        with pytest.raises(BadRequestError) as caught:
            sdk.images.generate(model="rex", prompt="a dog", **arguments)
        assert caught.value.param == param
    accepted = sdk.images.generate(model="rex", prompt="a dog", size="32x32", quality="xhigh", complexity="low",
                                   safety_identifier="user-1", moderation="low", style="natural", extra_body={"steps": 1})
    assert len(accepted.data) == 1
    with pytest.raises(BadRequestError) as caught:
        sdk.images.create_variation(image=b"\x89PNG", model="rex")
    assert caught.value.code == "unsupported_endpoint" and "/v1/images/edits" in caught.value.message
