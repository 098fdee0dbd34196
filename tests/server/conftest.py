"""Real uvicorn servers on free loopback ports, serving the tiny model on CPU.

`live_server`: the base model alone, open. `shared_server`: the same base model with two LoRA
subjects (one fixed, one from a registry file) behind a bearer token. One of each for the whole
tests/server run: loading and warm-up happen once, and the browser, schemathesis and the
OpenAI SDK talk to them over a real socket like any client would.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

READY_TIMEOUT_S = 120


@dataclass
class LiveServer:
    url: str
    app: object

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v",...}': value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples


def wait_ready(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


@contextmanager
def serving(app: object) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port until the block ends; yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    import torch

    from dreambooth_serving.app import ServerSettings, create_app

    torch.set_num_threads(2)
    # A long-ish batching window makes the concurrency test deterministic on a busy 2-core box.
    app = create_app(ServerSettings(model="tiny", device="cpu", max_batch=8, max_queue=64, max_wait_s=0.1))
    with serving(app) as url:
        wait_ready(url)
        yield LiveServer(url, app)


TOKEN = "test-token-5f1c"


def write_random_lora(folder: Path, seed: int = 0, targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")) -> Path:
    """A LoRA for the tiny model in the trainer's export layout, random A and B (so it visibly
    changes the images); a different seed gives a different subject."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from dreambooth_trainer.export import write_lora_files
    from dreambooth_trainer.tiny import tiny_pipeline

    unet = tiny_pipeline(seed=0).unet
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False))
    finally:
        torch.random.set_rng_state(state)
    write_lora_files(folder, StableDiffusionPipeline, unet, None)
    return folder


def write_registry(path: Path, adapters: dict[str, Path]) -> None:
    """The registry file the operator keeps in a ConfigMap; replaced whole, as the kubelet does."""
    from dreambooth_serving.registry import AdapterEntry, RegistryDocument, registry_json

    document = RegistryDocument(server="test", base_model="tiny", adapters={name: AdapterEntry(uri=str(folder)) for name, folder in adapters.items()})
    staging = path.with_suffix(".new")
    staging.write_text(registry_json(document))
    staging.replace(path)


@dataclass
class SharedServer(LiveServer):
    registry: Path
    loras: dict[str, Path]


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServer]:
    """The tiny base model as `tiny`, subject `rex` fixed on the command line and `mia` registered."""
    from dreambooth_serving.app import ServerSettings, create_app

    root = tmp_path_factory.mktemp("shared")
    loras = {name: write_random_lora(root / name, seed) for seed, name in enumerate(("rex", "mia", "zed"), start=1)}
    registry = root / "registry.json"
    write_registry(registry, {"mia": loras["mia"]})
    settings = ServerSettings(
        model="tiny", device="cpu", max_batch=8, max_wait_s=0.1, api_token=TOKEN,
        adapters=(("rex", str(loras["rex"])),), registry=str(registry), registry_poll_s=0.2,
    )
    app = create_app(settings)
    with serving(app) as url:
        wait_ready(url)
        yield SharedServer(url, app, registry, loras)
