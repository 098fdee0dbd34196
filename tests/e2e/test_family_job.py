"""A tiny-sdxl LoRA job on the test bed: trains for real in the trainer image, reaches Succeeded
and ServingReady, and its subject is drawn by the family's shared server (the base tiny-sdxl
plus the job's adapter) as a PNG of the requested size."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.conftest import BUCKET, condition, get_job, png_bytes, upload

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.usefixtures("operator")]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "job-tiny.yaml"
SERVER = "sdxl-pets"


def sdxl_lora_job(testbed: Any, minio_client: Any, namespace: str, name: str) -> dict[str, Any]:
    """examples/job-tiny.yaml on tiny-sdxl: a 3-step LoRA run on one pod, served by the SDXL server."""
    for index in range(3):
        upload(minio_client, f"subjects/{namespace}-{name}/{index}.png", png_bytes(index))
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["name"] = name
    spec = manifest["spec"]
    spec["model"] = {"source": "tiny-sdxl", "family": "sdxl", "tinyResolution": 32}
    spec["storage"]["endpoint"] = testbed.minio.endpoint
    spec["data"]["instanceUri"] = f"s3://{BUCKET}/subjects/{namespace}-{name}"
    spec["prior"] = {"enabled": False}
    spec["training"].update(maxSteps=3, learningRate=1.0e-2, lora={"enabled": True, "rank": 4})
    spec["checkpointing"] = {"everyNSteps": 3, "keepLast": 1}
    spec["validation"] = {"everyNSteps": 0, "fidelity": {"enabled": False}}
    spec["resources"]["nodes"] = 1
    spec["serving"]["server"] = SERVER
    del spec["resources"]["image"], spec["serving"]["image"]  # the installation's: this checkout's builds
    return manifest


def test_a_tiny_sdxl_lora_job_is_trained_and_served(testbed: Any, minio_client: Any, namespace: str, s3_secret: str) -> None:
    testbed.apply(sdxl_lora_job(testbed, minio_client, namespace, "rex-xl"), namespace)

    def serving_ready() -> bool:
        job = get_job(testbed, namespace, "rex-xl")
        if (job.get("status") or {}).get("phase") == "Failed":
            raise AssertionError(f"rex-xl failed: {json.dumps(job['status'], indent=1)}")
        return (condition(job, "ServingReady") or {}).get("status") == "True"

    testbed.wait_for("rex-xl ServingReady", serving_ready, timeout=600, interval=1)
    status = get_job(testbed, namespace, "rex-xl")["status"]
    assert status["phase"] == "Succeeded" and status["serving"]["model"] == "rex-xl"
    registry = json.loads(testbed.get("configmap", f"{SERVER}-registry", namespace)["data"]["registry.json"])
    assert registry["baseModel"] == "tiny-sdxl" and list(registry["adapters"]) == ["rex-xl"]

    ips = [pod["status"]["podIP"] for pod in testbed.items("pods", namespace, f"dreambooth.dev/server={SERVER}") if pod["status"].get("phase") == "Running" and pod["status"].get("podIP")]
    assert ips, "the SDXL server has no running pod"
    url = f"http://{ips[0]}:8080"
    body = {"model": "rex-xl", "prompt": "a photo of sks dog", "width": 32, "height": 32, "steps": 2, "seed": 3}
    subject = httpx.post(f"{url}/v1/generate", json=body, timeout=120)
    assert subject.status_code == 200 and subject.content[:8] == b"\x89PNG\r\n\x1a\n", subject.text[:300]
    base = httpx.post(f"{url}/v1/generate", json={**body, "model": SERVER}, timeout=120)
    assert base.status_code == 200 and base.content != subject.content, "the adapter changed nothing"
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert {m["id"] for m in models["data"]} >= {SERVER, "rex-xl"}
