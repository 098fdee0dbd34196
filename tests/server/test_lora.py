"""`--lora`: LoRA weights written by the trainer's export are applied on top of the base model."""
from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tests.server.conftest import LiveServer, write_random_lora
from tests.server.test_readiness import wait_ready_in


def test_lora_weights_change_the_image(tmp_path: Path, live_server: LiveServer) -> None:
    import httpx

    from dreambooth_serving.app import ServerSettings, create_app

    write_random_lora(tmp_path / "lora")
    body = {"prompt": "a photo of sks dog", "steps": 2, "seed": 11}
    app = create_app(ServerSettings(model="tiny", device="cpu", lora=str(tmp_path / "lora")))
    with TestClient(app, base_url="http://localhost") as client:
        wait_ready_in(client)
        with_lora = client.post("/v1/generate", json=body)
        assert with_lora.status_code == 200
        assert client.post("/v1/generate", json=body).content == with_lora.content
    without_lora = httpx.post(f"{live_server.url}/v1/generate", json=body, timeout=60)
    assert without_lora.status_code == 200
    assert without_lora.content != with_lora.content
