"""Two LoRA jobs share one inference server on the test bed: both train for real, both answer
through the official OpenAI SDK behind a token from a Secret, and deleting one takes its adapter
off the server while the other keeps serving. The NetworkPolicies are checked as objects (the
test bed has no CNI to enforce them)."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import BUCKET, condition, get_job, png_bytes, upload

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.usefixtures("operator")]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "job-tiny.yaml"
SERVER = "pets"
TOKEN = "e2e-token-0b7d"


def lora_job(testbed: Any, minio_client: Any, namespace: str, name: str, photos: int) -> dict[str, Any]:
    """examples/job-tiny.yaml as a short LoRA run on one pod, served by the shared server; `photos`
    picks the subject's photos (training is deterministic: same photos, same adapter)."""
    for index in range(3):
        upload(minio_client, f"subjects/{namespace}-{name}/{index}.png", png_bytes(photos + index))
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["name"] = name
    spec = manifest["spec"]
    spec["storage"]["endpoint"] = testbed.minio.endpoint
    spec["data"]["instanceUri"] = f"s3://{BUCKET}/subjects/{namespace}-{name}"
    spec["prior"] = {"enabled": False}
    spec["training"].update(maxSteps=3, learningRate=1.0e-2, lora={"enabled": True, "rank": 4})
    spec["checkpointing"] = {"everyNSteps": 3, "keepLast": 1}
    spec["validation"]["everyNSteps"] = 0
    spec["resources"]["nodes"] = 1
    spec["serving"].update(server=SERVER, auth={"tokenSecretRef": {"name": "api-token", "key": "token"}})
    # The installation's images: the operator fixture's defaults are this checkout's builds.
    del spec["resources"]["image"], spec["serving"]["image"]
    return manifest


def sdk(url: str, token: str = TOKEN) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=120)


def model_ids(url: str) -> set[str]:
    return {model.id for model in sdk(url).models.list()}


def image_bytes(url: str, model: str) -> bytes:
    result = sdk(url).images.generate(model=model, prompt="a photo of sks dog", size="32x32", response_format="b64_json",
                                      extra_body={"seed": 5, "steps": 2})
    data = base64.b64decode(result.data[0].b64_json)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def server_url(testbed: Any, namespace: str) -> str:
    ips = [pod["status"]["podIP"] for pod in testbed.items("pods", namespace, f"dreambooth.dev/server={SERVER}") if pod["status"].get("phase") == "Running" and pod["status"].get("podIP")]
    assert ips, "the shared server has no running pod"
    return f"http://{ips[0]}:8080"


def test_two_lora_jobs_share_one_server_and_leave_it_one_by_one(testbed: Any, minio_client: Any, namespace: str, s3_secret: str) -> None:
    from openai import AuthenticationError, NotFoundError

    testbed.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "api-token", "namespace": namespace},
                   "stringData": {"token": TOKEN}})
    for name, photos in (("rex", 0), ("mia", 10)):
        testbed.apply(lora_job(testbed, minio_client, namespace, name, photos), namespace)

    def serving_ready(name: str) -> bool:
        job = get_job(testbed, namespace, name)
        if (job.get("status") or {}).get("phase") == "Failed":
            raise AssertionError(f"{name} failed: {json.dumps(job['status'], indent=1)}")
        return (condition(job, "ServingReady") or {}).get("status") == "True"

    for name in ("rex", "mia"):
        testbed.wait_for(f"{name} ServingReady", lambda name=name: serving_ready(name), timeout=900, interval=2)
    rex = get_job(testbed, namespace, "rex")["status"]
    assert rex["phase"] == "Succeeded"
    assert rex["serving"] == {"url": f"http://{SERVER}-shared.{namespace}.svc:8080", "model": "rex", "server": SERVER}
    deployments = json.loads(testbed.kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout)["items"]
    assert [d["metadata"]["name"] for d in deployments] == [f"{SERVER}-shared"], "one server, no Deployment per job"

    policies = {p["metadata"]["name"]: p for p in json.loads(testbed.kubectl("get", "networkpolicies", "-n", namespace, "-o", "json").stdout)["items"]}
    assert {"rex-network", "mia-network", f"{SERVER}-shared"} <= set(policies)
    assert policies["rex-network"]["spec"]["ingress"][0]["from"] == [  # this job's trainers only, by uid (a same-name re-create is another job)
        {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "trainer", "dreambooth.dev/job-name": "rex",
                                         "dreambooth.dev/job-uid": get_job(testbed, namespace, "rex")["metadata"]["uid"]}}}]
    assert policies[f"{SERVER}-shared"]["spec"]["ingress"] == [{"from": [{"podSelector": {}}], "ports": [{"port": 8080, "protocol": "TCP"}]}]

    url = server_url(testbed, namespace)
    assert {SERVER, "rex", "mia"} <= model_ids(url)
    rex_png, mia_png = image_bytes(url, "rex"), image_bytes(url, "mia")
    assert rex_png != mia_png, "two subjects drew the same image"
    with pytest.raises(AuthenticationError):
        sdk(url, token="not-the-token").models.list()

    testbed.kubectl("delete", "dreamboothjob", "rex", "-n", namespace, timeout=120)
    testbed.wait_for("rex off the server", lambda: "rex" not in model_ids(url), timeout=120, interval=1)
    with pytest.raises(NotFoundError):
        image_bytes(url, "rex")
    assert image_bytes(url, "mia") == mia_png, "the other subject keeps serving, unchanged"
    registry = json.loads(testbed.get("configmap", f"{SERVER}-registry", namespace)["data"]["registry.json"])
    assert sorted(registry["adapters"]) == ["mia"]
    assert serving_ready("mia")
