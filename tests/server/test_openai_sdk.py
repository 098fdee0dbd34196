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


def test_url_responses_are_refused_with_a_clear_message(shared_server: SharedServer) -> None:
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="b64_json") as caught:
        client(shared_server).images.generate(model="rex", prompt="a dog", response_format="url")
    assert caught.value.param == "response_format"


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
