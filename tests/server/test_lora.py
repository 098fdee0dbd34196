"""`--lora`: LoRA weights written by the trainer's export are applied on top of the base model."""
from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tests.server.conftest import LiveServer
from tests.server.test_readiness import wait_ready_in


def write_random_lora(folder: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from dreambooth_trainer.export import write_lora_files
    from dreambooth_trainer.tiny import tiny_pipeline

    unet = tiny_pipeline(seed=0).unet
    # init_lora_weights=False: random A and B, so the adapter visibly changes the output
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    write_lora_files(folder, StableDiffusionPipeline, unet, None)


def test_lora_weights_change_the_image(tmp_path: Path, live_server: LiveServer) -> None:
    import httpx

    from dreambooth_trainer.server import ServerSettings, create_app

    write_random_lora(tmp_path / "lora")
    body = {"prompt": "a photo of sks dog", "steps": 2, "seed": 11}
    app = create_app(ServerSettings(model="tiny", device="cpu", lora=str(tmp_path / "lora")))
    with TestClient(app) as client:
        wait_ready_in(client)
        with_lora = client.post("/v1/generate", json=body)
        assert with_lora.status_code == 200
        assert client.post("/v1/generate", json=body).content == with_lora.content
    without_lora = httpx.post(f"{live_server.url}/v1/generate", json=body, timeout=60)
    assert without_lora.status_code == 200
    assert without_lora.content != with_lora.content
